"""Plain-torch references for the Triton kernels, with the same contracts (arguments and
results), written for clarity: unpack with kvbench.packing, dequantize with kvbench.quant, then
dense attention in float32. They run on any device and are what tests compare the kernels to.

Partial-attention contract: a decode kernel returns (o [B, Hq, S, D] float32, lse [B, Hq, S]
float32) over S context splits; o is each split's softmax-weighted output, lse its natural
log-sum-exp of scaled scores (-inf and o = 0 for an empty split). `merge_partials` combines
partials exactly; the references return one split (S = 1).
"""

from __future__ import annotations

import math

import torch

from kvbench.packing import unpack
from kvbench.quant import QuantSpec, Quantized, dequantize


def fp_partial(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor, scaling: float):
    """Partial attention of q [B, Hq, D] over full-precision k, v [B, Hkv, S, D] where valid [B, S]."""
    b, hq, d = q.shape
    hkv = k.shape[1]
    qg = q.float().reshape(b, hkv, hq // hkv, d)
    scores = torch.einsum("bhgd,bhsd->bhgs", qg, k.float()) * scaling
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(scores, -1)  # [B, Hkv, g]
    p = torch.exp(scores - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    p = torch.where(valid[:, None, None, :], p, 0.0)
    o = torch.einsum("bhgs,bhsd->bhgd", p, v.float())
    return o.reshape(b, hq, 1, d), lse.reshape(b, hq, 1)


def merge_partials(parts) -> torch.Tensor:
    """Exact log-sum-exp merge of partials [(o [B, Hq, S_i, D], lse [B, Hq, S_i]), ...] -> [B, Hq, D]."""
    o = parts[0][0] if len(parts) == 1 else torch.cat([p[0] for p in parts], 2)
    lse = parts[0][1] if len(parts) == 1 else torch.cat([p[1] for p in parts], 2)
    # w_s = exp(lse_s - logsumexp(lse)); exp(-inf) = 0 for empty splits; a row with no keys at
    # all gets NaN weights, zeroed. Few kernels: this runs at every decode step.
    w = torch.softmax(lse, -1).nan_to_num_(0.0)
    return torch.einsum("bhsd,bhs->bhd", o, w)


def _dense(q, k, v, valid, scaling):
    return fp_partial(q, k, v, valid, scaling)


def unpack_per_token(codes, scale, zero, bits, group_size, integer_zero=True):
    """[B, S, cap, n*bits/8] codes + [B, S, cap, n/G] scale/zero -> float32 [B, S, cap, n]."""
    n = codes.shape[-1] * 8 // bits
    spec = QuantSpec(bits, group_size, integer_zero=integer_zero)
    return dequantize(Quantized(unpack(codes, bits, n), scale, zero), spec)


def _length_mask(lengths, cap, device):
    return torch.arange(cap, device=device)[None] < lengths[:, None]


def ref_decode_per_token(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, lengths, scaling, *,
                         bits, group_size, integer_zero=True, **_):
    k = unpack_per_token(k_codes, k_scale, k_zero, bits, group_size, integer_zero)
    v = unpack_per_token(v_codes, v_scale, v_zero, bits, group_size, integer_zero)
    return _dense(q, k, v, _length_mask(lengths, k.shape[2], q.device), scaling)


def ref_decode_kivi(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, nq, scaling, *, bits, group_size, **_):
    b, h, ng, d, _ = k_codes.shape
    g = group_size
    spec = QuantSpec(bits, g, integer_zero=False)
    kc = unpack(k_codes, bits, g)  # [B, H, ng, D, G]
    k = dequantize(Quantized(kc, k_scale[..., None], k_zero[..., None]), spec)
    k = k.transpose(-1, -2).reshape(b, h, ng * g, d)
    v = unpack_per_token(v_codes, v_scale, v_zero, bits, g, integer_zero=False)
    s = min(k.shape[2], v.shape[2])
    return _dense(q, k[:, :, :s], v[:, :, :s], _length_mask(nq, s, q.device), scaling)


def ref_decode_rotatekv(q, k_codes, k_scale, k_zero, gid, v_codes, v_scale, v_zero, lengths, positions, cos, sin,
                        scaling, *, bits, group_size, head_group, pre_rope=True, **_):
    """Keys: dequantize rotated rows (scale of channel c = the token's scale[gid[c]]), undo the
    grouped Hadamard, RoPE at each key's position (pre_rope); values stay H_D-rotated (as the
    kernel's partials are)."""
    from kvbench.hadamard import hadamard_matrix
    from kvbench.rope import apply_rope

    b, ngrp, cap, _ = k_codes.shape
    hkv, d = v_codes.shape[1], v_codes.shape[-1] * 8 // bits
    n = head_group * d
    codes = unpack(k_codes, bits, n).float()  # [B, NG, cap, n]
    g = gid.long().reshape(ngrp, n)
    sc = k_scale[:, 0].float()[:, None, :, :]  # [B, 1, cap, NQ]
    zc = k_zero[:, 0].float()[:, None, :, :]
    idx = g[None, :, None, :].expand(b, ngrp, cap, n)
    s_full = torch.gather(sc.expand(b, ngrp, cap, sc.shape[-1]), 3, idx)
    z_full = torch.gather(zc.expand(b, ngrp, cap, zc.shape[-1]), 3, idx)
    x = (codes - z_full) * s_full
    k = x @ hadamard_matrix(n, torch.float32, q.device)  # H symmetric: inverse = itself
    k = k.reshape(b, ngrp, cap, head_group, d).transpose(2, 3).reshape(b, hkv, cap, d)
    if pre_rope:
        p = positions.clamp_min(0).long()
        k = apply_rope(k, cos[p].float(), sin[p].float())
    v = unpack_per_token(v_codes, v_scale, v_zero, bits, group_size, True)
    return _dense(q, k, v, _length_mask(lengths, cap, q.device), scaling)


def sdpa_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float | None = None) -> torch.Tensor:
    """fp16 baseline: q [B, Hq, D] over k, v [B, Hkv, S, D] with torch SDPA (GQA natively)."""
    import torch.nn.functional as F

    scaling = 1 / math.sqrt(q.shape[-1]) if scaling is None else scaling
    return F.scaled_dot_product_attention(q[:, :, None], k, v, scale=scaling,
                                          enable_gqa=q.shape[1] != k.shape[1])[:, :, 0]
