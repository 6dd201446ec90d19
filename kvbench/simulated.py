"""Simulated-mode storage: caches that keep dequantized keys and values (fake quantization).

The numbers attention sees are exactly what a packed cache would decode to (scales rounded to
fp16 included), but the memory is not saved: reports mark these results "simulated".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvbench.method import LayerCache, NewTokens


def causal_mask(q_positions: torch.Tensor, k_positions: torch.Tensor) -> torch.Tensor:
    """[B, Tq, S] bool: query may see key (key not padding, key position <= query position).

    Padding queries see every real key, so their (discarded) outputs stay finite.
    """
    k_real = (k_positions >= 0)[:, None, :]
    allowed = (k_positions[:, None, :] <= q_positions[:, :, None]) & k_real
    return allowed | ((q_positions < 0)[:, :, None] & k_real)


def _is_plain_causal(q_positions: torch.Tensor, k_positions: torch.Tensor) -> bool:
    """True when no row is padded and the queries are the last Tq keys in order."""
    if bool((k_positions < 0).any()):
        return False
    tq, s = q_positions.shape[1], k_positions.shape[1]
    return bool((q_positions == k_positions[:, s - tq :]).all()) and bool(
        (k_positions == torch.arange(s, device=k_positions.device)).all()
    )


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_positions: torch.Tensor,
    k_positions: torch.Tensor,
    scaling: float,
    allowed: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of q [B, H, Tq, D] over k, v [B, H_kv, S, D] (GQA by head groups).

    Without `allowed` the mask is causal by position; with it, `allowed` [B, Tq, S] is used as is.
    """
    kwargs = dict(scale=scaling, enable_gqa=q.shape[1] != k.shape[1])
    if allowed is None:
        if _is_plain_causal(q_positions, k_positions):
            tq, s = q.shape[2], k.shape[2]
            if tq == 1:  # one decode query sees every key: no mask at all
                return F.scaled_dot_product_attention(q, k, v, **kwargs)
            if tq == s:
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, **kwargs)
        allowed = causal_mask(q_positions, k_positions)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None], **kwargs)


class SimulatedCache(LayerCache):
    """Stores every token's keys (after RoPE) and values as the method's round trip returns them.

    Subclasses override `compress` (the quantize-dequantize round trip of new tokens) and may
    override `exact_tokens` (tokens kept in full precision for good, such as attention sinks).
    """

    def __init__(self) -> None:
        self.k: torch.Tensor | None = None  # [B, H_kv, S, D] after RoPE, dequantized
        self.v: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None  # [B, S]

    def compress(self, new: NewTokens) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys (after RoPE) and values of the new tokens as attention should see them."""
        return new.k, new.v

    def exact_tokens(self, new: NewTokens) -> torch.Tensor | None:
        """[B, T] bool of new tokens to keep in full precision, or None."""
        return None

    def append(self, new: NewTokens) -> None:
        k, v = self.compress(new)
        exact = self.exact_tokens(new)
        if exact is not None:
            keep = exact[:, None, :, None]
            k = torch.where(keep, new.k.to(k.dtype), k)
            v = torch.where(keep, new.v.to(v.dtype), v)
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        self.positions = (
            new.positions if self.positions is None else torch.cat([self.positions, new.positions], 1)
        )

    def attend(self, q: torch.Tensor, q_positions: torch.Tensor, scaling: float) -> torch.Tensor:
        assert self.k is not None and self.v is not None and self.positions is not None
        return attention(q, self.k.to(q.dtype), self.v.to(q.dtype), q_positions, self.positions, scaling)

    def nbytes(self) -> int:
        # Simulated storage saves nothing: report what an fp16 cache would hold.
        return 0 if self.k is None else 2 * self.k.numel() * 2
