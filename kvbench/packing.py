"""Bit packing of quantized KV codes along the last dim, for 2, 3, 4 and 8 bits.

Codes are uint8 tensors [..., n] with values in [0, 2^bits); packed tensors are uint8
[..., P] with P = n * bits / 8 bytes. Leading dims are kept as they are; each row of n codes
packs on its own. The layouts, for a kernel author:

2, 4 and 8 bits: "plane" (split-half) layout. Let k = 8 / bits codes per byte (4, 2, 1).

    code i lives in byte (i % P), bits [(i // P) * bits, (i // P) * bits + bits)
    byte j = codes[j] | codes[j + P] << bits | codes[j + 2P] << 2*bits | ...   (k terms)

i.e. the row is cut into k contiguous planes of P codes, and plane s fills bits s*bits.. of
every byte. A decode kernel loads P contiguous bytes and gets plane s with
(byte >> (s * bits)) & (2^bits - 1): contiguous codes, no gather or interleave. Example, 4 bits,
n = 4 (P = 2): codes [a, b, c, d] -> bytes [a | c << 4, b | d << 4].
Requires n % k == 0 (equivalently n * bits % 8 == 0). For 8 bits it is the identity.

3 bits: groups of 8 codes in 3 bytes. Codes 8g..8g+7 form the 24-bit little-endian word
w = sum_t codes[8g + t] << (3 t), stored as bytes 3g, 3g+1, 3g+2 = w & 0xFF, (w >> 8) & 0xFF,
(w >> 16) & 0xFF. So code 8g + t is bits [3t, 3t + 3) of the word; codes t = 2 and t = 5
straddle a byte boundary. Requires n % 8 == 0.
"""

from __future__ import annotations

import torch

__all__ = ["SUPPORTED_BITS", "pack", "packed_nbytes", "unpack"]

SUPPORTED_BITS = (2, 3, 4, 8)
# Codes per 3-bit group and the bytes the group takes.
_GROUP3_CODES, _GROUP3_BYTES = 8, 3


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits} is not one of {SUPPORTED_BITS}")


def packed_nbytes(n: int, bits: int) -> int:
    """Bytes that n codes of `bits` bits pack into (raises ValueError if n does not pack)."""
    _check_bits(bits)
    multiple = _GROUP3_CODES if bits == 3 else 8 // bits
    if n < 0 or n % multiple != 0:
        raise ValueError(f"{bits}-bit packing needs n to be a multiple of {multiple}, got n={n}")
    return n * bits // 8


def _plane_shifts(bits: int, device: torch.device) -> torch.Tensor:
    """Shift of each plane, shaped to broadcast over [..., planes, P]."""
    return torch.arange(0, 8, bits, dtype=torch.uint8, device=device).unsqueeze(-1)


def _group3_shifts(device: torch.device) -> torch.Tensor:
    return torch.arange(0, 3 * _GROUP3_CODES, 3, dtype=torch.int32, device=device)


def pack(codes: torch.Tensor, bits: int, *, check: bool = True) -> torch.Tensor:
    """Pack uint8 codes [..., n] into uint8 [..., n * bits / 8]; layout in the module docstring.

    `check` verifies every code is below 2^bits; it costs a device sync on CUDA, so hot paths
    whose codes come from a clamp can pass check=False (out-of-range codes then corrupt their
    neighbours' bits).
    """
    _check_bits(bits)
    if codes.dtype != torch.uint8:
        raise ValueError(f"codes must be uint8, got {codes.dtype}")
    if codes.dim() == 0:
        raise ValueError("codes must have at least one dim")
    n = codes.shape[-1]
    nbytes = packed_nbytes(n, bits)
    if check and bits < 8 and codes.numel() > 0 and bool((codes >> bits).any()):
        raise ValueError(f"codes out of range for {bits} bits (max {(1 << bits) - 1})")
    lead = codes.shape[:-1]

    if bits == 8:
        return codes.clone()
    if bits == 3:
        groups = codes.reshape(*lead, nbytes // _GROUP3_BYTES, _GROUP3_CODES).to(torch.int32)
        # Bit fields are disjoint, so the sum is their OR.
        shifted = groups << _group3_shifts(codes.device)
        words = shifted.sum(dim=-1, keepdim=True, dtype=torch.int32)
        byte_shifts = torch.arange(0, 8 * _GROUP3_BYTES, 8, dtype=torch.int32, device=codes.device)
        packed = (words >> byte_shifts) & 0xFF
        return packed.to(torch.uint8).reshape(*lead, nbytes)

    planes = codes.reshape(*lead, 8 // bits, nbytes)  # plane s holds codes s*P .. s*P + P - 1
    # Values stay below 256 since the fields are disjoint, so uint8 arithmetic cannot overflow.
    return (planes << _plane_shifts(bits, codes.device)).sum(dim=-2, dtype=torch.uint8)


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of `pack`: uint8 [..., n * bits / 8] -> uint8 codes [..., n]."""
    _check_bits(bits)
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed must be uint8, got {packed.dtype}")
    if packed.dim() == 0:
        raise ValueError("packed must have at least one dim")
    nbytes = packed_nbytes(n, bits)
    if packed.shape[-1] != nbytes:
        raise ValueError(
            f"{n} codes of {bits} bits pack into {nbytes} bytes, but the last dim is "
            f"{packed.shape[-1]}"
        )
    lead = packed.shape[:-1]
    mask = (1 << bits) - 1

    if bits == 8:
        return packed.clone()
    if bits == 3:
        triples = packed.reshape(*lead, nbytes // _GROUP3_BYTES, _GROUP3_BYTES).to(torch.int32)
        byte_shifts = torch.arange(0, 8 * _GROUP3_BYTES, 8, dtype=torch.int32, device=packed.device)
        words = (triples << byte_shifts).sum(dim=-1, keepdim=True, dtype=torch.int32)
        codes = (words >> _group3_shifts(packed.device)) & mask
        return codes.to(torch.uint8).reshape(*lead, n)

    planes = (packed.unsqueeze(-2) >> _plane_shifts(bits, packed.device)) & mask
    return planes.reshape(*lead, n)
