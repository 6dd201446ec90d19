"""quarot: an orthonormal Hadamard rotation per head on keys (after RoPE) and values, then
per-token RTN. The rotation spreads outlier channels over the head before quantization.

Queries would be rotated by the same matrix so that q.k is unchanged; attention here reads the
keys rotated back instead, which is the same product up to rounding.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from kvbench.hadamard import hadamard_transform, inverse_hadamard_transform, is_supported_size
from kvbench.method import KVGeometry, KVMethod, LayerCache, NewTokens
from kvbench.params import check
from kvbench.quant import QuantSpec, fake_quantize
from kvbench.simulated import SimulatedCache


@dataclass
class QuaRot(KVMethod):
    name = "quarot"
    description = "Hadamard per head on keys (after RoPE) and values, then per-token RTN."
    modes = ("simulated", "packed")

    bits: int = dataclasses.field(default=4, metadata={"choices": (2, 3, 4, 8), "help": "bits per code"})
    group_size: int = dataclasses.field(default=64, metadata={"help": "channels of one head sharing a scale"})
    clip_ratio: float = dataclasses.field(default=1.0, metadata={"help": "shrinks min and max before scaling"})

    def __post_init__(self) -> None:
        super().__post_init__()
        check(0.0 < self.clip_ratio <= 1.0, "clip_ratio", f"{self.clip_ratio} must be in (0, 1]")
        check(self.group_size >= 1, "group_size", f"{self.group_size} must be positive")

    def check_geometry(self, geometry: KVGeometry) -> None:
        check(geometry.head_dim % self.group_size == 0, "group_size",
              f"{self.group_size} does not divide head_dim {geometry.head_dim}")
        check(is_supported_size(geometry.head_dim), "mode", f"no Hadamard of size head_dim {geometry.head_dim}")

    def new_cache(self, layer_idx: int, geometry: KVGeometry) -> LayerCache:
        if self.mode == "packed":
            from kvbench.packed_cache import QuaRotPackedCache

            spec = QuantSpec(self.bits, self.group_size, self.clip_ratio)
            return QuaRotPackedCache(spec, geometry.num_kv_heads, geometry.head_dim)
        return QuaRotCache(QuantSpec(self.bits, self.group_size, self.clip_ratio))

    def avg_bits(self, geometry: KVGeometry, context_len: int) -> float:
        return QuantSpec(self.bits, self.group_size).bits_per_element()


def rotated_round_trip(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Rotate each head by H, quantize, dequantize, rotate back."""
    return inverse_hadamard_transform(fake_quantize(hadamard_transform(x), spec))


class QuaRotCache(SimulatedCache):
    def __init__(self, spec: QuantSpec):
        super().__init__()
        self.spec = spec

    def compress(self, new: NewTokens) -> tuple[torch.Tensor, torch.Tensor]:
        return rotated_round_trip(new.k, self.spec), rotated_round_trip(new.v, self.spec)
