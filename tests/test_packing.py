"""Bit packing: round trips, sizes, the exact byte layout a kernel relies on, and bad inputs."""

from __future__ import annotations

import pytest
import torch

from kvbench.packing import SUPPORTED_BITS, pack, packed_nbytes, unpack

SHAPES = [(8,), (1, 16), (3, 5, 48), (2, 1, 7, 64), (4, 128)]


def _random_codes(shape: tuple[int, ...], bits: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, shape, generator=gen, dtype=torch.uint8)
    # Make sure both ends of the range appear.
    codes.view(-1)[:2] = torch.tensor([0, (1 << bits) - 1], dtype=torch.uint8)
    return codes


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("shape", SHAPES)
def test_round_trip(bits: int, shape: tuple[int, ...]):
    codes = _random_codes(shape, bits, seed=bits)
    n = shape[-1]
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (*shape[:-1], n * bits // 8) == (*shape[:-1], packed_nbytes(n, bits))
    unpacked = unpack(packed, bits, n)
    assert unpacked.dtype == torch.uint8 and torch.equal(unpacked, codes)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_plane_layout_formula(bits: int):
    # Code i lives in byte i % P at shift (i // P) * bits.
    codes = _random_codes((3, 64), bits)
    packed = pack(codes, bits)
    nbytes = packed.shape[-1]
    i = torch.arange(64)
    read = (packed[:, i % nbytes].int() >> ((i // nbytes) * bits)) & ((1 << bits) - 1)
    assert torch.equal(read.to(torch.uint8), codes)


def test_3bit_layout_formula():
    # Code 8g + t is bits [3t, 3t + 3) of the little-endian 24-bit word in bytes 3g .. 3g + 2.
    codes = _random_codes((3, 32), 3)
    packed = pack(codes, 3).long()
    words = packed[:, 0::3] | packed[:, 1::3] << 8 | packed[:, 2::3] << 16  # [3, 4 groups]
    i = torch.arange(32)
    read = (words[:, i // 8] >> (3 * (i % 8))) & 7
    assert torch.equal(read.to(torch.uint8), codes)


def test_2bit_layout_by_hand():
    # n = 8, P = 2: byte 0 holds codes 0, 2, 4, 6 and byte 1 codes 1, 3, 5, 7, at shifts 0, 2, 4, 6.
    codes = torch.tensor([1, 2, 3, 0, 1, 2, 3, 0], dtype=torch.uint8)
    expected = [
        1 | 3 << 2 | 1 << 4 | 3 << 6,  # 0b11_01_11_01 = 221
        2 | 0 << 2 | 2 << 4 | 0 << 6,  # 0b00_10_00_10 = 34
    ]
    assert expected == [221, 34]
    assert pack(codes, 2).tolist() == expected


def test_4bit_layout_by_hand():
    # n = 4, P = 2: [a, b, c, d] -> [a | c << 4, b | d << 4]. Two rows pack independently.
    codes = torch.tensor([[1, 2, 3, 4], [15, 0, 0, 15]], dtype=torch.uint8)
    assert pack(codes, 4).tolist() == [[0x31, 0x42], [0x0F, 0xF0]]


def test_3bit_layout_by_hand():
    # w = 1 | 2<<3 | 3<<6 | 4<<9 | 5<<12 | 6<<15 | 7<<18 | 0<<21 = 0x1F58D1, little-endian bytes.
    codes = torch.tensor([1, 2, 3, 4, 5, 6, 7, 0], dtype=torch.uint8)
    assert pack(codes, 3).tolist() == [0xD1, 0x58, 0x1F]


def test_8bit_is_identity_copy():
    codes = _random_codes((2, 16), 8)
    packed = pack(codes, 8)
    assert torch.equal(packed, codes) and packed.data_ptr() != codes.data_ptr()


def test_non_contiguous_and_empty_inputs():
    codes = _random_codes((32, 6), 4).T  # [6, 32], not contiguous
    assert torch.equal(unpack(pack(codes, 4), 4, 32), codes)
    empty = torch.zeros(0, 16, dtype=torch.uint8)
    assert pack(empty, 2).shape == (0, 4)
    assert unpack(pack(empty, 3), 3, 16).shape == (0, 16)


def test_packed_nbytes():
    assert [packed_nbytes(128, bits) for bits in SUPPORTED_BITS] == [32, 48, 64, 128]
    with pytest.raises(ValueError, match="multiple of 8"):
        packed_nbytes(12, 3)
    with pytest.raises(ValueError, match="multiple of 4"):
        packed_nbytes(6, 2)
    with pytest.raises(ValueError, match="bits"):
        packed_nbytes(8, 5)


def test_bad_inputs_raise():
    codes = torch.zeros(2, 16, dtype=torch.uint8)
    with pytest.raises(ValueError, match="bits"):
        pack(codes, 1)
    with pytest.raises(ValueError, match="uint8"):
        pack(codes.to(torch.int64), 4)
    with pytest.raises(ValueError, match="multiple of 2"):
        pack(torch.zeros(2, 5, dtype=torch.uint8), 4)
    with pytest.raises(ValueError, match="multiple of 8"):
        pack(torch.zeros(2, 12, dtype=torch.uint8), 3)
    with pytest.raises(ValueError, match="out of range"):
        pack(torch.full((2, 16), 4, dtype=torch.uint8), 2)
    with pytest.raises(ValueError, match="out of range"):
        pack(torch.full((2, 16), 8, dtype=torch.uint8), 3)
    with pytest.raises(ValueError, match="at least one dim"):
        pack(torch.tensor(3, dtype=torch.uint8), 2)
    # check=False skips the range check (it syncs on CUDA); in-range codes pack the same.
    assert torch.equal(pack(codes, 2, check=False), pack(codes, 2))

    packed = pack(codes, 4)
    with pytest.raises(ValueError, match="last dim"):
        unpack(packed, 4, 32)
    with pytest.raises(ValueError, match="uint8"):
        unpack(packed.to(torch.int32), 4, 16)
    with pytest.raises(ValueError, match="bits"):
        unpack(packed, 6, 16)
    with pytest.raises(ValueError, match="multiple of 8"):
        unpack(torch.zeros(2, 3, dtype=torch.uint8), 3, 7)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_cuda_matches_cpu(bits: int):
    codes = _random_codes((3, 5, 128), bits)
    packed = pack(codes.cuda(), bits)
    assert packed.is_cuda and torch.equal(packed.cpu(), pack(codes, bits))
    assert torch.equal(unpack(packed, bits, 128).cpu(), codes)
