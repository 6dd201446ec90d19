"""Group-wise asymmetric round-to-nearest quantization: the primitive every quantizing method shares.

Groups run along the last dimension. A method that groups along another axis (KIVI's keys are
quantized per channel over groups of tokens) transposes first.

Scales and zero points are rounded to fp16 here, in simulated mode too, because that is what the
packed cache stores: simulated and packed modes then agree exactly, and `avg_bits` counts 16 bits
for each of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: Bits of metadata stored per group: an fp16 scale and an fp16 zero point (or minimum).
METADATA_BITS_PER_GROUP = 32
SUPPORTED_BITS = (2, 3, 4, 8)

# fp16's smallest normal number: a scale below it would underflow when stored.
_MIN_SCALE = 2.0**-14


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize one tensor: `bits` per code, `group_size` elements share a scale and zero.

    `clip_ratio` shrinks both the group's min and max before the scale is computed (values beyond
    are clamped). `integer_zero` stores the zero point as an integer code (QuaRot, RotateKV);
    otherwise the group's minimum is stored as a float (KIVI).
    """

    bits: int
    group_size: int
    clip_ratio: float = 1.0
    integer_zero: bool = True

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits={self.bits} is not one of {SUPPORTED_BITS}")
        if self.group_size < 1:
            raise ValueError(f"group_size={self.group_size} must be positive")
        if not 0.0 < self.clip_ratio <= 1.0:
            raise ValueError(f"clip_ratio={self.clip_ratio} must be in (0, 1]")

    @property
    def max_code(self) -> int:
        return (1 << self.bits) - 1

    def bits_per_element(self) -> float:
        """Storage cost per element: the code plus its share of the group's scale and zero."""
        return self.bits + METADATA_BITS_PER_GROUP / self.group_size


@dataclass
class Quantized:
    """Unpacked codes (uint8, one per element) with per-group fp16 `scale` and `zero`."""

    codes: torch.Tensor  # [..., n]
    scale: torch.Tensor  # [..., n // group_size], fp16
    zero: torch.Tensor  # [..., n // group_size], fp16: an integer code, or the group minimum


def _grouped(x: torch.Tensor, group_size: int) -> torch.Tensor:
    n = x.shape[-1]
    if n % group_size:
        raise ValueError(f"last dimension {n} is not a multiple of group_size {group_size}")
    return x.reshape(*x.shape[:-1], n // group_size, group_size)


def quantize(x: torch.Tensor, spec: QuantSpec) -> Quantized:
    """Quantize `x` (any float dtype) group-wise along its last dimension."""
    g = _grouped(x.float(), spec.group_size)
    xmax = g.amax(dim=-1, keepdim=True) * spec.clip_ratio
    xmin = g.amin(dim=-1, keepdim=True) * spec.clip_ratio
    # Divided by a 0-d tensor on x's device, not by a Python number: on CUDA, torch turns division
    # by a host scalar into multiplication by its reciprocal (not correctly rounded; on CPU it
    # divides), so the same inputs gave other fp16 scales on the GPU than here and than the fused
    # write kernels' IEEE division (1e-4 of the groups on SmolLM2).
    max_code = torch.full((), float(spec.max_code), device=g.device)
    scale = ((xmax - xmin) / max_code).clamp_min(_MIN_SCALE).half().float()
    if spec.integer_zero:
        zero = torch.round(-xmin / scale).half().float()
        codes = torch.round(g / scale) + zero
    else:
        zero = xmin.half().float()
        codes = torch.round((g - zero) / scale)
    codes = codes.clamp_(0, spec.max_code).to(torch.uint8)
    return Quantized(
        codes=codes.reshape(x.shape),
        scale=scale.squeeze(-1).half(),
        zero=zero.squeeze(-1).half(),
    )


def dequantize(q: Quantized, spec: QuantSpec, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    codes = _grouped(q.codes.float(), spec.group_size)
    scale = q.scale.float().unsqueeze(-1)
    zero = q.zero.float().unsqueeze(-1)
    if spec.integer_zero:
        out = (codes - zero) * scale
    else:
        out = codes * scale + zero
    return out.reshape(q.codes.shape).to(dtype)


def fake_quantize(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Quantize then dequantize, returning `x`'s dtype: the simulated-mode round trip."""
    return dequantize(quantize(x, spec), spec, dtype=x.dtype)


def fake_quantize_reference(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Float64 reference for `fake_quantize`: the same arithmetic, written for clarity.

    Only the stored scale and zero are rounded to fp16, as the real cache stores them.
    """
    x64 = x.double()
    n = x64.shape[-1]
    g = x64.reshape(-1, n // spec.group_size, spec.group_size)
    out = torch.empty_like(g)
    for row in range(g.shape[0]):
        for grp in range(g.shape[1]):
            v = g[row, grp]
            hi, lo = v.max() * spec.clip_ratio, v.min() * spec.clip_ratio
            s = max(float((hi - lo) / spec.max_code), _MIN_SCALE)
            s = float(torch.tensor(s).half())
            if spec.integer_zero:
                z = float(torch.tensor(round(float(-lo / s))).half())
                c = torch.clamp(torch.round(v / s) + z, 0, spec.max_code)
                out[row, grp] = (c - z) * s
            else:
                z = float(lo.half())
                c = torch.clamp(torch.round((v - z) / s), 0, spec.max_code)
                out[row, grp] = c * s + z
    return out.reshape(x.shape)
