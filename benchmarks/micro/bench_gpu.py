"""The same primitives on a CUDA GPU, plus the Triton Hadamard kernel. Skipped without a GPU.

Each round runs REPEAT calls and ends with torch.cuda.synchronize(): times are per round of
REPEAT calls, and measure the kernels rather than one launch.
Refresh the GPU baseline on the GPU: `BASELINE=benchmarks/micro/baseline/h100.json benchmarks/micro/run.sh save -k gpu`.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from shapes import BATCH, CONTEXT, HEAD_DIM, KV_HEADS, Q_HEADS, ROWS

pytestmark = pytest.mark.cuda


#: Calls per timed round. A single call of these kernels takes tens of microseconds, about what
#: the launch and the synchronize cost, so one call per round times mostly Python and jitter;
#: a round of REPEAT calls and one synchronize times the kernels. Reported times are per round.
REPEAT = 20


def _synced(fn, *args, **kwargs):
    def run():
        for _ in range(REPEAT):
            out = fn(*args, **kwargs)
        torch.cuda.synchronize()
        return out

    # One round first: Triton compiles and cuBLAS/cuDNN pick kernels on the first call, which
    # would otherwise land in pytest-benchmark's calibration and cut the rounds to 5.
    run()
    return run


@pytest.mark.benchmark(group="gpu-quant")
@pytest.mark.requires("kvbench.quant", "quantize", "dequantize", "QuantSpec")
@pytest.mark.parametrize("bits", [2, 4])
def bench_gpu_quantize_dequantize(benchmark, bits):
    from kvbench.quant import QuantSpec, fake_quantize

    spec = QuantSpec(bits, 32)
    x = torch.randn(BATCH, KV_HEADS, CONTEXT, HEAD_DIM, device="cuda", dtype=torch.float16)
    out = benchmark(_synced(fake_quantize, x, spec))
    assert out.shape == x.shape


@pytest.mark.benchmark(group="gpu-pack")
@pytest.mark.requires("kvbench.packing", "pack", "unpack")
@pytest.mark.parametrize("bits", [2, 4])
def bench_gpu_unpack(benchmark, bits):
    from kvbench.packing import pack, unpack

    codes = torch.randint(0, 1 << bits, (ROWS, HEAD_DIM), dtype=torch.uint8, device="cuda")
    packed = pack(codes, bits)
    out = benchmark(_synced(unpack, packed, bits, HEAD_DIM))
    assert torch.equal(out, codes)


@pytest.mark.benchmark(group="gpu-hadamard")
@pytest.mark.requires("kvbench.hadamard", "hadamard_transform")
@pytest.mark.parametrize("backend", ["torch", "triton"])
def bench_gpu_hadamard(benchmark, backend):
    if backend == "triton":
        pytest.importorskip("triton", reason="triton is not installed (pip install 'kvbench[cuda]')")
    from kvbench.hadamard import hadamard_transform

    x = torch.randn(ROWS, HEAD_DIM, device="cuda", dtype=torch.float16)
    out = benchmark(_synced(hadamard_transform, x, backend=backend))
    assert out.shape == x.shape


@pytest.mark.benchmark(group="gpu-attention")
@pytest.mark.parametrize("context", [4096, 32768])
def bench_gpu_sdpa_decode(benchmark, context):
    q = torch.randn(BATCH, Q_HEADS, 1, HEAD_DIM, device="cuda", dtype=torch.float16)
    k = torch.randn(BATCH, KV_HEADS, context, HEAD_DIM, device="cuda", dtype=torch.float16)
    v = torch.randn_like(k)
    out = benchmark(_synced(F.scaled_dot_product_attention, q, k, v, enable_gqa=True))
    assert out.shape == q.shape
