"""Random inputs shared by the method tests: outlier channels, odd lengths, GQA, left padding."""

from __future__ import annotations

import torch

from kvbench.method import KVGeometry, NewTokens
from kvbench.rope import apply_rope, rope_tables

# SmolLM2's KV shape: 3 KV heads of 64 under 9 query heads (GQA).
GEOMETRY = KVGeometry(num_layers=2, num_heads=9, num_kv_heads=3, head_dim=64, hidden_size=96, rope_theta=1e5)


def random_tokens(
    batch: int = 2,
    length: int = 37,
    pads: tuple[int, ...] = (0, 5),
    geometry: KVGeometry = GEOMETRY,
    seed: int = 0,
    start: int = 0,
    prefill: bool = True,
    dtype=torch.float32,
) -> NewTokens:
    """Keys/values with a few outlier channels; row b is left-padded by pads[b] tokens."""
    g = torch.Generator().manual_seed(seed)
    h, d = geometry.num_kv_heads, geometry.head_dim
    k_pre = torch.randn(batch, h, length, d, generator=g)
    v = torch.randn(batch, h, length, d, generator=g)
    k_pre[..., 3] *= 20.0  # outlier channels, as real keys have
    k_pre[..., 40] += 8.0
    v[..., 7] *= 10.0
    positions = torch.arange(length).repeat(batch, 1) + start
    for b, pad in enumerate(pads[:batch]):
        if prefill and pad:
            positions[b] = torch.arange(length) - pad
            positions[b, :pad] = -1
    cos, sin = rope_tables(positions, d, geometry.rope_theta)
    layer_input = torch.randn(batch, length, geometry.hidden_size, generator=g)
    return NewTokens(
        k_pre=k_pre.to(dtype),
        k=apply_rope(k_pre, cos, sin).to(dtype),
        v=v.to(dtype),
        cos=cos,
        sin=sin,
        positions=positions,
        layer_input=layer_input,
        is_prefill=prefill,
    )


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    ref = reference.double()
    return float(10 * torch.log10(ref.pow(2).sum() / (ref - approx.double()).pow(2).sum().clamp_min(1e-300)))


def assert_matches_reference(out: torch.Tensor, ref: torch.Tensor, min_sqnr_db: float = 70.0) -> None:
    """float32 kernels against a float64 reference of the same quantizer.

    Codes can flip where x/scale lands within float32 rounding of a .5 tie; such flips are rare
    (< 0.1% of elements) and cost one step, so we bound the mismatch fraction and the SQNR.
    """
    err = (out.double() - ref.double()).abs()
    tol = 1e-5 * ref.double().abs().max() + 1e-6
    mismatch = float((err > tol).double().mean())
    assert mismatch < 1e-3, f"{mismatch:.2%} of elements differ from the float64 reference"
    assert sqnr_db(ref, out) > min_sqnr_db
