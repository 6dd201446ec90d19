"""Bit packing of one layer's codes (kvbench.packing)."""

from __future__ import annotations

import pytest
import torch

from shapes import HEAD_DIM, ROWS

pytestmark = pytest.mark.requires("kvbench.packing", "pack", "unpack")

BITS = [2, 3, 4]


def _codes(bits: int) -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randint(0, 1 << bits, (ROWS, HEAD_DIM), dtype=torch.uint8)


@pytest.mark.benchmark(group="pack")
@pytest.mark.parametrize("bits", BITS, ids=[f"b{b}" for b in BITS])
def bench_pack(benchmark, bits):
    from kvbench.packing import pack

    codes = _codes(bits)
    packed = benchmark(pack, codes, bits)
    assert packed.shape[-1] == HEAD_DIM * bits // 8


@pytest.mark.benchmark(group="unpack")
@pytest.mark.parametrize("bits", BITS, ids=[f"b{b}" for b in BITS])
def bench_unpack(benchmark, bits):
    from kvbench.packing import pack, unpack

    codes = _codes(bits)
    packed = pack(codes, bits)
    out = benchmark(unpack, packed, bits, HEAD_DIM)
    assert torch.equal(out, codes)
