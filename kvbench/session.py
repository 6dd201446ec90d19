"""A batch's compressed KV state across all layers, and the attention step that drives it.

The model integration (model.py) calls `KVSession.attention` from each patched attention layer;
the session applies RoPE, hands the new tokens to that layer's cache and returns attention over
it. Nothing here knows transformers.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from kvbench.method import KVGeometry, KVMethod, NewTokens
from kvbench.packed_cache import share_rope_tables
from kvbench.rope import apply_rope

Observer = Callable[[int, NewTokens], None]


class KVSession:
    def __init__(self, method: KVMethod, geometry: KVGeometry, observer: Observer | None = None):
        self.method = method
        self.geometry = geometry
        self.caches = [method.new_cache(i, geometry) for i in range(geometry.num_layers)]
        share_rope_tables(self.caches)
        self.observer = observer
        self.needs_layer_input = method.needs_layer_input
        self.positions: torch.Tensor | None = None  # [B, T] of the forward call in progress
        self._valid: torch.Tensor | None = None  # positions >= 0
        self.is_prefill = True
        self.layer_inputs: dict[int, torch.Tensor] = {}
        # RMSNorm, RoPE and the MLP's SiLU-times-up each in one Triton launch (CUDA speed runs:
        # `kvbench.kernels.glue`; set by kvbench.decode.DecodeEngine, read by the model's attach)
        self.fused_glue = False

    def begin_step(self, positions: torch.Tensor) -> None:
        """Set the positions of the tokens of the next forward call ([B, T], -1 for padding)."""
        self.positions = positions
        self._valid = positions >= 0  # every layer's NewTokens.valid
        self.layer_inputs.clear()

    def end_step(self) -> None:
        self.is_prefill = False
        self.layer_inputs.clear()

    def attention(
        self,
        layer_idx: int,
        q: torch.Tensor,  # [B, H, T, D] before RoPE
        k_pre: torch.Tensor,  # [B, H_kv, T, D] before RoPE
        v: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        scaling: float,
    ) -> torch.Tensor:
        assert self.positions is not None, "begin_step() must set positions before a forward"
        rope = apply_rope
        if self.fused_glue:
            from kvbench.kernels.glue import rope
        new = NewTokens(
            k_pre=k_pre,
            k=rope(k_pre, cos, sin),
            v=v,
            cos=cos,
            sin=sin,
            positions=self.positions,
            layer_input=self.layer_inputs.get(layer_idx),
            is_prefill=self.is_prefill,
            valid_mask=self._valid,
        )
        if self.observer is not None:
            self.observer(layer_idx, new)
        cache = self.caches[layer_idx]
        cache.append(new)
        return cache.attend(rope(q, cos, sin), self.positions, scaling)

    def nbytes(self) -> int:
        return sum(c.nbytes() for c in self.caches)


def left_padded_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions [B, T] from a 0/1 mask of left-padded rows: 0.. for real tokens, -1 for padding."""
    return torch.where(attention_mask.bool(), attention_mask.long().cumsum(-1) - 1, -1)
