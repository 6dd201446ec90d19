"""What a plain streaming read reaches on this GPU at the byte counts the decode reads move.

The kernel targets are stated against the device-to-device copy bandwidth (`gpu_timing.copy_bandwidth`,
2 GiB read plus written). A decode read of one layer moves 84-220 MB in 30-110 us, where a
kernel's start and its last wave cost a larger share than in a 1.4 ms copy. This times the
simplest kernel that reads N bytes (16-byte loads, several in flight a thread, XOR-reduced, nothing
written) over a sweep of grids and with or without a 256-byte L2 fetch hint, at each size the
suite's reads move, within a CUDA graph of 20 calls like `kernels_gpu.py`. The best configuration at a size is the most any read of that many
bytes can be expected to reach here; each pass's figure can be set against it.

    python benchmarks/read_ceiling.py --out read_ceiling.json
"""

from __future__ import annotations

import argparse
import json

import torch

from kvbench.gpu_timing import amortized_ms, copy_bandwidth
from kvbench.kernels import nvrtc

MB = 1 << 20
# bytes a layer's read moves at B8 x 8192 (kernels_gpu.py): one per-token pass (84 MB), KIVI's key
# pass (100 MB), quarot-2's keys and values (168 MB), KIVI-2's (218 MB with its window), fp16 (1 GiB)
SIZES_MB = [80, 96, 160, 208, 1024]

_SOURCE = r"""
#if __HINT__  // a 256-byte L2 fetch for each 16-byte load (ld.global.nc.L2::256B)
__device__ __forceinline__ uint4 LOAD(const uint4* a) {
    uint4 v;
    asm volatile("ld.global.nc.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(a));
    return v;
}
#else
__device__ __forceinline__ uint4 LOAD(const uint4* a) { return *a; }
#endif
extern "C" __global__ void __launch_bounds__(__TPB__)
read_chunks(const uint4* __restrict__ x, long long per_program, unsigned* __restrict__ sink) {
    const uint4* p = x + (long long)blockIdx.x * per_program;
    unsigned acc = 0u;
    for (long long i = threadIdx.x; i < per_program; i += __TPB__ * __UNROLL__) {
        uint4 v[__UNROLL__];
#pragma unroll
        for (int u = 0; u < __UNROLL__; ++u) {  // every load issued before any is used
            const long long j = i + (long long)u * __TPB__;
            v[u] = j < per_program ? LOAD(p + j) : make_uint4(0u, 0u, 0u, 0u);
        }
#pragma unroll
        for (int u = 0; u < __UNROLL__; ++u) acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
    }
    if (acc == 0x9e3779b9u) sink[blockIdx.x] = acc;  // (never true for zeros: keeps the loads)
}
"""


def source(tpb: int, unroll: int, hint: bool) -> str:
    return _SOURCE.replace("__TPB__", str(tpb)).replace("__UNROLL__", str(unroll)).replace("__HINT__", str(int(hint)))


def read_ms(x: torch.Tensor, programs: int, tpb: int, unroll: int, hint: bool, sink: torch.Tensor) -> float:
    kernel = nvrtc.compile_source(source(tpb, unroll, hint), "read_chunks", x.device)
    n16 = x.numel() * x.element_size() // 16
    per = n16 // programs
    return amortized_ms(lambda: kernel(grid=(programs, 1, 1), block=(tpb, 1, 1), args=[x, per, sink]))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("read_ceiling.py: needs a CUDA GPU")
    dev = torch.device("cuda")
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    copy = copy_bandwidth()
    sink = torch.zeros(64 * sms, dtype=torch.int32, device=dev)
    rows = []
    for size in SIZES_MB:
        x = torch.zeros(size * MB // 2, dtype=torch.float16, device=dev)
        configs = []
        for per_sm in (1, 2, 3, 4, 8, 16):
            for tpb in (128, 256):
                for unroll in (1, 2, 4, 8):
                    for hint in (False, True):
                        if per_sm * tpb > 2048:
                            continue
                        ms = read_ms(x, per_sm * sms, tpb, unroll, hint, sink)
                        configs.append({"programs_per_sm": per_sm, "threads": tpb, "unroll": unroll, "l2_256B": hint,
                                        # 16-byte loads in flight an SM when every thread has its unroll out
                                        "kb_in_flight_per_sm": per_sm * tpb * unroll * 16 / 1024,
                                        "ms": ms, "fraction_of_copy_bw": size * MB / ms * 1e3 / copy})
        best = min(configs, key=lambda c: c["ms"])
        gbps = size * MB / best["ms"] / 1e6
        row = {"MB": size, "bytes": size * MB, "best": best, "GBps": gbps, "fraction_of_copy_bw": gbps * 1e9 / copy,
               "configs": configs}
        print({k: v for k, v in row.items() if k != "configs"}, flush=True)
        rows.append(row)
        del x
    out = {"device": torch.cuda.get_device_name(dev), "copy_bandwidth_GBps": copy / 1e9, "reads": rows}
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
