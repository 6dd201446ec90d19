"""rtn: per-token asymmetric round-to-nearest of keys and values, in groups of channels."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from kvbench.method import KVGeometry, KVMethod, LayerCache, NewTokens
from kvbench.params import check
from kvbench.quant import QuantSpec, fake_quantize
from kvbench.rope import apply_rope
from kvbench.simulated import SimulatedCache


@dataclass
class RTN(KVMethod):
    name = "rtn"
    description = "Per-token asymmetric round-to-nearest; keys before or after RoPE."
    modes = ("simulated", "packed")

    bits: int = dataclasses.field(default=4, metadata={"choices": (2, 3, 4, 8), "help": "bits per code"})
    group_size: int = dataclasses.field(default=64, metadata={"help": "channels of one head sharing a scale"})
    clip_ratio: float = dataclasses.field(default=1.0, metadata={"help": "shrinks min and max before scaling"})
    keys: str = dataclasses.field(
        default="post_rope", metadata={"choices": ("post_rope", "pre_rope"), "help": "quantize keys after or before RoPE"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check(0.0 < self.clip_ratio <= 1.0, "clip_ratio", f"{self.clip_ratio} must be in (0, 1]")
        check(self.group_size >= 1, "group_size", f"{self.group_size} must be positive")

    def check_geometry(self, geometry: KVGeometry) -> None:
        check(
            geometry.head_dim % self.group_size == 0,
            "group_size",
            f"{self.group_size} does not divide head_dim {geometry.head_dim}",
        )

    @property
    def spec(self) -> QuantSpec:
        return QuantSpec(self.bits, self.group_size, self.clip_ratio)

    def new_cache(self, layer_idx: int, geometry: KVGeometry) -> LayerCache:
        if self.mode == "packed":
            from kvbench.packed_cache import RTNPackedCache

            return RTNPackedCache(self.spec, self.keys == "pre_rope", geometry.num_kv_heads, geometry.head_dim)
        return RTNCache(self.spec, pre_rope=self.keys == "pre_rope")

    def avg_bits(self, geometry: KVGeometry, context_len: int) -> float:
        return self.spec.bits_per_element()


class RTNCache(SimulatedCache):
    def __init__(self, spec: QuantSpec, pre_rope: bool):
        super().__init__()
        self.spec, self.pre_rope = spec, pre_rope

    def compress(self, new: NewTokens) -> tuple[torch.Tensor, torch.Tensor]:
        if self.pre_rope:  # stored before RoPE; RoPE at each key's own position on read
            k = apply_rope(fake_quantize(new.k_pre, self.spec), new.cos, new.sin)
        else:
            k = fake_quantize(new.k, self.spec)
        return k, fake_quantize(new.v, self.spec)
