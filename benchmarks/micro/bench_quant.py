"""Group-wise quantize / dequantize of one layer's K cache (kvbench.quant)."""

from __future__ import annotations

import pytest
import torch

from shapes import BATCH, CONTEXT, HEAD_DIM, KV_HEADS

pytestmark = pytest.mark.requires("kvbench.quant", "quantize", "dequantize", "QuantSpec")

CASES = [(2, 32, True), (4, 64, True), (2, 32, False), (8, 64, True)]  # bits, group, integer_zero
IDS = [f"b{b}-g{g}-{'int' if z else 'float'}zero" for b, g, z in CASES]


def _cache() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(BATCH, KV_HEADS, CONTEXT, HEAD_DIM)


@pytest.mark.benchmark(group="quantize")
@pytest.mark.parametrize("bits, group_size, integer_zero", CASES, ids=IDS)
def bench_quantize(benchmark, bits, group_size, integer_zero):
    from kvbench.quant import QuantSpec, quantize

    spec = QuantSpec(bits, group_size, clip_ratio=1.0, integer_zero=integer_zero)
    x = _cache()
    q = benchmark(quantize, x, spec)
    assert q.codes.shape == x.shape


@pytest.mark.benchmark(group="dequantize")
@pytest.mark.parametrize("bits, group_size, integer_zero", CASES, ids=IDS)
def bench_dequantize(benchmark, bits, group_size, integer_zero):
    from kvbench.quant import QuantSpec, dequantize, quantize

    spec = QuantSpec(bits, group_size, clip_ratio=1.0, integer_zero=integer_zero)
    q = quantize(_cache(), spec)
    out = benchmark(dequantize, q, spec)
    assert out.shape == q.codes.shape
