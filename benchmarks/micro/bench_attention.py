"""Reference point: one decode step of SDPA on CPU at SmolLM2-135M's shape.

Not kvbench code: it shows what a quantize or pack costs relative to the attention it serves.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from shapes import BATCH, HEAD_DIM, KV_HEADS, Q_HEADS

CONTEXTS = [1024, 4096]


@pytest.mark.benchmark(group="attention-cpu")
@pytest.mark.parametrize("context", CONTEXTS, ids=[f"ctx{c}" for c in CONTEXTS])
def bench_sdpa_decode(benchmark, context):
    torch.manual_seed(0)
    q = torch.randn(BATCH, Q_HEADS, 1, HEAD_DIM)
    k = torch.randn(BATCH, KV_HEADS, context, HEAD_DIM)
    v = torch.randn(BATCH, KV_HEADS, context, HEAD_DIM)
    out = benchmark(F.scaled_dot_product_attention, q, k, v, enable_gqa=True)
    assert out.shape == q.shape
