"""rotatekv: outlier-aware rotation for 2-bit KV caches (Su et al., arXiv 2501.16383).

Three switchable ideas, on top of per-token asymmetric quantization:
- grouped-head rotation of keys **before RoPE**: an orthonormal Hadamard over `head_group`
  consecutive KV heads (`pre_rope: false` rotates after RoPE instead, QuaRot-style);
- outlier-aware reordering: a calibrated per-layer permutation of all KV channels, sorting them by
  their mean so each quantization group holds channels of similar range (`reorder`);
- attention-sink awareness: at prefill, the tokens holding the `sinks` largest activations of the
  layer's input residual stream keep full-precision K and V (`sinks: 0` turns it off).
Values are rotated by a Hadamard per head. Read path: dequantize, undo P, apply H, then RoPE at
each key's own position. Differences from the authors' code, which we do not copy: the 3-bit
scale divides by 7 (not 8); batched decode quantizes each token once; the no-sink ablation runs;
calibration uses held-out text, never the evaluation split.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from kvbench.calibration import CALIBRATION_SOURCES
from kvbench.hadamard import is_supported_size
from kvbench.method import KVGeometry, KVMethod, LayerCache, NewTokens, fp_bits_mix
from kvbench.params import check
from kvbench.quant import QuantSpec, fake_quantize
from kvbench.rope import apply_rope
from kvbench.rotation import (
    grouped_hadamard,
    heads_to_tokens,
    inverse_permutation,
    reorder_from_means,
    sink_tokens,
    tokens_to_heads,
)
from kvbench.simulated import SimulatedCache

_F = dataclasses.field


@dataclass
class RotateKV(KVMethod):
    name = "rotatekv"
    description = "Pre-RoPE grouped-head Hadamard + channel reordering + sink-aware 2-bit KV."
    modes = ("simulated", "packed")

    bits: int = _F(default=2, metadata={"choices": (2, 3, 4, 8), "help": "bits per code"})
    group_size: int | None = _F(default=None, metadata={"help": "channels sharing a scale (null: head_dim)"})
    clip_ratio: float | None = _F(default=None, metadata={"help": "null: 0.8 at 2 bits, 1.0 otherwise"})
    head_group: int | None = _F(default=None, metadata={"help": "KV heads per Hadamard (null: min(4, kv heads))"})
    reorder: bool = _F(default=True, metadata={"help": "calibrated outlier-aware channel reordering"})
    pre_rope: bool = _F(default=True, metadata={"help": "rotate keys before RoPE (false: after)"})
    sinks: int = _F(default=20, metadata={"help": "largest layer-input activations whose tokens stay exact"})
    calib_source: str = _F(default="pg-essays", metadata={"choices": CALIBRATION_SOURCES, "help": "held-out text"})
    calib_samples: int = _F(default=8, metadata={"help": "calibration sequences"})
    calib_seq_len: int = _F(default=512, metadata={"help": "tokens per calibration sequence"})

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.group_size is None or self.group_size >= 1, "group_size", "must be positive")
        check(self.clip_ratio is None or 0.0 < self.clip_ratio <= 1.0, "clip_ratio", "must be in (0, 1]")
        check(self.head_group is None or self.head_group >= 1, "head_group", "must be positive")
        check(self.sinks >= 0, "sinks", f"{self.sinks} must be >= 0")
        check(self.calib_samples >= 1 and self.calib_seq_len >= 2, "calib_samples", "need samples >= 1, seq_len >= 2")
        self._perms: dict[int, torch.Tensor] = {}
        self._sums: dict[int, torch.Tensor] = {}
        self._counts: dict[int, int] = {}

    # -- resolved parameters ------------------------------------------------------------

    @property
    def needs_calibration(self) -> bool:  # type: ignore[override]
        return self.reorder

    @property
    def needs_layer_input(self) -> bool:  # type: ignore[override]
        return self.sinks > 0

    def resolved_clip(self) -> float:
        return self.clip_ratio if self.clip_ratio is not None else (0.8 if self.bits == 2 else 1.0)

    def resolved_group(self, g: KVGeometry) -> int:
        return self.group_size or g.head_dim

    def resolved_head_group(self, g: KVGeometry) -> int:
        return self.head_group or min(4, g.num_kv_heads)

    def spec(self, g: KVGeometry) -> QuantSpec:
        return QuantSpec(self.bits, self.resolved_group(g), self.resolved_clip())

    def check_geometry(self, g: KVGeometry) -> None:
        heads = self.resolved_head_group(g)
        check(g.num_kv_heads % heads == 0, "head_group", f"{heads} does not divide {g.num_kv_heads} KV heads")
        check(is_supported_size(heads * g.head_dim), "head_group",
              f"no Hadamard of size {heads} x {g.head_dim}; pick another head_group")
        check(is_supported_size(g.head_dim), "head_group", f"no Hadamard of size head_dim {g.head_dim}")
        check(g.kv_channels % self.resolved_group(g) == 0, "group_size",
              f"{self.resolved_group(g)} does not divide the {g.kv_channels} KV channels of a token")

    def avg_bits(self, geometry: KVGeometry, context_len: int) -> float:
        # Upper bound: every sink value in its own token (fewer tokens are kept in practice).
        return fp_bits_mix(self.spec(geometry).bits_per_element(), self.sinks, context_len)

    # -- the transform --------------------------------------------------------------------

    def rotated_keys(self, new: NewTokens, g: KVGeometry) -> torch.Tensor:
        """[B, T, C]: H-rotated keys (before or after RoPE), before the permutation."""
        keys = new.k_pre if self.pre_rope else new.k
        return grouped_hadamard(heads_to_tokens(keys.float()), self.resolved_head_group(g) * g.head_dim)

    def permutation(self, layer_idx: int, g: KVGeometry, device) -> torch.Tensor:
        if not self.reorder:
            return torch.arange(g.kv_channels, device=device)
        if layer_idx not in self._perms:
            raise RuntimeError("rotatekv with reorder needs calibration first (kvbench calibrate)")
        return self._perms[layer_idx].to(device)

    def new_cache(self, layer_idx: int, geometry: KVGeometry) -> LayerCache:
        if self.mode == "packed":
            from kvbench.packed_cache import RotateKVPackedCache

            return RotateKVPackedCache(self, layer_idx, geometry)
        return RotateKVCache(self, layer_idx, geometry)

    # -- calibration ------------------------------------------------------------------------

    def calibration_params(self) -> dict:
        return {"source": self.calib_source, "samples": self.calib_samples, "seq_len": self.calib_seq_len,
                "pre_rope": self.pre_rope, "head_group": self.head_group}

    def observe(self, layer_idx: int, new: NewTokens) -> None:
        g = _geometry_of(new)
        rotated = self.rotated_keys(new, g)[new.valid]  # [N, C]
        self._sums[layer_idx] = self._sums.get(layer_idx, 0) + rotated.double().sum(0).cpu()
        self._counts[layer_idx] = self._counts.get(layer_idx, 0) + rotated.shape[0]

    def calibration_state(self) -> dict[str, torch.Tensor]:
        return {f"perm.{i}": reorder_from_means(s / self._counts[i]) for i, s in self._sums.items()}

    def load_calibration_state(self, state: dict[str, torch.Tensor]) -> None:
        self._perms = {int(k.split(".")[1]): v for k, v in state.items()}


def _geometry_of(new: NewTokens) -> KVGeometry:
    # Only the KV shapes matter to the transform; observe() gets no geometry of its own.
    b, h, t, d = new.k.shape
    return KVGeometry(num_layers=0, num_heads=h, num_kv_heads=h, head_dim=d, hidden_size=0, rope_theta=0.0)


class RotateKVCache(SimulatedCache):
    def __init__(self, method: RotateKV, layer_idx: int, geometry: KVGeometry):
        super().__init__()
        self.m, self.g = method, geometry
        self.spec = method.spec(geometry)
        self.layer_idx = layer_idx
        self.key_block = method.resolved_head_group(geometry) * geometry.head_dim

    def compress(self, new: NewTokens) -> tuple[torch.Tensor, torch.Tensor]:
        m, g = self.m, self.g
        perm = m.permutation(self.layer_idx, g, new.k.device)
        stored = m.rotated_keys(new, g)[..., perm]
        restored = fake_quantize(stored, self.spec)[..., inverse_permutation(perm)]
        k = tokens_to_heads(grouped_hadamard(restored, self.key_block, inverse=True), g.num_kv_heads)
        if m.pre_rope:
            k = apply_rope(k, new.cos, new.sin)
        v = grouped_hadamard(heads_to_tokens(new.v.float()), g.head_dim)
        v = tokens_to_heads(grouped_hadamard(fake_quantize(v, self.spec), g.head_dim, inverse=True), g.num_kv_heads)
        return k.to(new.k.dtype), v.to(new.v.dtype)

    def exact_tokens(self, new: NewTokens) -> torch.Tensor | None:
        if self.m.sinks == 0 or not new.is_prefill or new.layer_input is None:
            return None  # decode tokens are always quantized
        return sink_tokens(new.layer_input, new.valid, self.m.sinks)
