"""Launch sweep of the CUDA scores pass alone (rotatekv_scores_cuda), Llama-2-7B shape, B8 x 8192:
programs an SM the registers are held to (min_blocks) x splits an SM. 20 launches captured in a
CUDA graph (eager launches through ctypes cost more than the kernel), median over 20 replays
(`gpu_timing.amortized_ms`). Usage: python benchmarks/rotatekv_scores_cuda_sweep.py --out F"""

import argparse
import json
import math

import torch

from kvbench.gpu_timing import amortized_ms
from kvbench.kernels import checks, rotatekv_scores_cuda as rc
from kvbench.kernels.decode_attention import split_plan


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    b, hkv, cap = 8, 32, 8192
    kc, ks, kz, gid, *_, pos, cos, sin = checks.rotatekv_inputs(gen, b, hkv, 1, 128, cap, 2, 128, 4, "cuda")
    q = torch.randn(b, hkv, 128, generator=gen).half().cuda()
    lengths = torch.full((b,), cap, device="cuda")
    scr = torch.empty(b, hkv, cap, device="cuda")
    sm = 128**-0.5 * 1.4426950408889634 / math.sqrt(512)
    rows = []
    for minb in (2, 3, 4):
        for per_sm in (2, 3, 4, 6):
            ns, nit = split_plan(cap, 32, b * hkv // 4, "cuda", per_sm=per_sm)

            def run():
                rc.rotatekv_scores(q, kc, ks, kz, gid, lengths, pos, cos, sin, sm, scr, split_len=nit * 32,
                                   num_splits=ns, min_blocks=minb)

            ms = amortized_ms(run, calls=20, reps=20)
            rows.append(dict(min_blocks=minb, splits_per_sm=per_sm, splits=ns, ms_p50=ms))
            print(rows[-1], flush=True)
    json.dump(dict(device=torch.cuda.get_device_name(), shape="B8 x 8192, 32 heads of 128, 4-head groups, 2 bits",
                   rows=rows), open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
