"""Hadamard rotation of one layer's keys (kvbench.hadamard), torch backend on CPU."""

from __future__ import annotations

import pytest
import torch

from shapes import HEAD_DIM, ROWS

pytestmark = pytest.mark.requires("kvbench.hadamard", "hadamard_transform")

SIZES = [HEAD_DIM, 2 * HEAD_DIM]


@pytest.mark.benchmark(group="hadamard")
@pytest.mark.parametrize("n", SIZES, ids=[f"n{n}" for n in SIZES])
def bench_hadamard_transform(benchmark, n):
    from kvbench.hadamard import hadamard_transform

    torch.manual_seed(0)
    x = torch.randn(ROWS * HEAD_DIM // n, n)
    out = benchmark(hadamard_transform, x)
    assert out.shape == x.shape
