"""kivi: keys quantized per channel over groups of G tokens, values per token over groups of G
channels, and the most recent tokens kept in full precision (Liu et al., 2024).

Evaluated faithfully: a key group is quantized only once all its G tokens have left the window
of the R most recent positions, so the query at position t sees positions below
Q(t) = floor((t + 1 - R) / G) * G quantized and everything from Q(t) on exact (between R and
R + G - 1 tokens). Values follow the same boundary, as in KIVI's cache where keys and values
leave the full-precision residual together. Every query of a prefill gets its own boundary.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from kvbench.method import KVGeometry, KVMethod, LayerCache, NewTokens, fp_bits_mix
from kvbench.params import check
from kvbench.quant import QuantSpec, fake_quantize
from kvbench.simulated import attention, causal_mask


@dataclass
class KIVI(KVMethod):
    name = "kivi"
    description = "Per-channel keys and per-token values in groups, with a full-precision recent window."
    modes = ("simulated", "packed")

    bits: int = dataclasses.field(default=2, metadata={"choices": (2, 3, 4, 8), "help": "bits per code"})
    group_size: int = dataclasses.field(
        default=32, metadata={"help": "tokens per key group (per channel) and channels per value group"}
    )
    residual: int = dataclasses.field(default=128, metadata={"help": "recent tokens kept in full precision (R)"})
    clip_ratio: float = dataclasses.field(default=1.0, metadata={"help": "shrinks min and max before scaling"})

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.group_size >= 1, "group_size", f"{self.group_size} must be positive")
        check(self.residual >= 0, "residual", f"{self.residual} must be >= 0")
        check(0.0 < self.clip_ratio <= 1.0, "clip_ratio", f"{self.clip_ratio} must be in (0, 1]")

    def check_geometry(self, geometry: KVGeometry) -> None:
        check(geometry.head_dim % self.group_size == 0, "group_size",
              f"{self.group_size} does not divide head_dim {geometry.head_dim} (value groups)")

    def spec(self) -> QuantSpec:
        return QuantSpec(self.bits, self.group_size, self.clip_ratio, integer_zero=False)

    def new_cache(self, layer_idx: int, geometry: KVGeometry) -> LayerCache:
        if self.mode == "packed":
            from kvbench.packed_cache import KIVIPackedCache

            return KIVIPackedCache(self.spec(), self.residual, geometry.num_kv_heads, geometry.head_dim)
        return KIVICache(self.spec(), self.residual)

    def quantized_tokens(self, context_len: int) -> int:
        """Tokens stored quantized once `context_len` tokens are in the cache."""
        return max(context_len - self.residual, 0) // self.group_size * self.group_size

    def avg_bits(self, geometry: KVGeometry, context_len: int) -> float:
        exact = context_len - self.quantized_tokens(context_len)
        return fp_bits_mix(self.spec().bits_per_element(), exact, context_len)


def quantize_key_groups(k: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """k [H, n*G, D] -> per-channel round trip over consecutive groups of G tokens."""
    h, t, d = k.shape
    grouped = k.reshape(h, t // spec.group_size, spec.group_size, d).transpose(-1, -2)
    return fake_quantize(grouped, spec).transpose(-1, -2).reshape(h, t, d)


class KIVICache(LayerCache):
    def __init__(self, spec: QuantSpec, residual: int):
        self.spec, self.residual = spec, residual
        self.k_exact = self.v_exact = self.k_quant = self.v_quant = None
        self.positions: torch.Tensor | None = None  # [B, S]
        self.pad: torch.Tensor | None = None  # [B] left padding of each row
        self.groups_done: list[int] = []

    def append(self, new: NewTokens) -> None:
        k, v = new.k, new.v
        v_q = fake_quantize(v, self.spec)
        if self.k_exact is None:
            self.k_exact, self.v_exact, self.k_quant, self.v_quant = k, v, k.clone(), v_q
            self.positions = new.positions
            self.pad = (new.positions < 0).sum(1)
            self.groups_done = [0] * k.shape[0]
        else:
            self.k_exact = torch.cat([self.k_exact, k], 2)
            self.v_exact = torch.cat([self.v_exact, v], 2)
            self.k_quant = torch.cat([self.k_quant, k], 2)
            self.v_quant = torch.cat([self.v_quant, v_q], 2)
            self.positions = torch.cat([self.positions, new.positions], 1)
        self._quantize_complete_key_groups()

    def _quantize_complete_key_groups(self) -> None:
        g = self.spec.group_size
        n_tokens = (self.positions >= 0).sum(1).tolist()
        for row, (n, done) in enumerate(zip(n_tokens, self.groups_done)):
            complete = n // g
            if complete > done:
                start = int(self.pad[row]) + done * g
                stop = int(self.pad[row]) + complete * g
                self.k_quant[row, :, start:stop] = quantize_key_groups(self.k_exact[row, :, start:stop], self.spec)
                self.groups_done[row] = complete

    def quantized_below(self, q_positions: torch.Tensor) -> torch.Tensor:
        """Q(t): positions below it are read quantized by the query at position t."""
        g = self.spec.group_size
        return torch.div((q_positions + 1 - self.residual).clamp_min(0), g, rounding_mode="floor") * g

    def attend(self, q: torch.Tensor, q_positions: torch.Tensor, scaling: float) -> torch.Tensor:
        allowed = causal_mask(q_positions, self.positions)
        boundary = self.quantized_below(q_positions)
        if not bool((boundary > 0).any()):  # nothing has left the window yet
            return attention(q, self.k_exact.to(q.dtype), self.v_exact.to(q.dtype), q_positions, self.positions, scaling)
        quantized = self.positions[:, None, :] < boundary[:, :, None]  # [B, Tq, S]
        # Both versions of every key side by side; the mask picks one per (query, key).
        keys = torch.cat([self.k_quant, self.k_exact], 2).to(q.dtype)
        values = torch.cat([self.v_quant, self.v_exact], 2).to(q.dtype)
        mask = torch.cat([allowed & quantized, allowed & ~quantized], -1)
        return attention(q, keys, values, q_positions, self.positions, scaling, allowed=mask)

    def nbytes(self) -> int:
        return 0 if self.k_exact is None else 2 * self.k_exact.numel() * 2
