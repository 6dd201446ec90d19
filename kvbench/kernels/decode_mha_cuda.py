"""Decode attention over per-token packed K/V (rtn, quarot), for MHA and grouped queries (a KV
head's query heads share one program where they fit the products' columns), in two hand-laid CUDA
passes on the tensor cores:
`token_scores_cuda` writes the scores (4 bytes a token, L2-resident), `values_cuda` reads the
values with each split's exact maximum.

Same contract as `decode_mha.decode_per_token_mha` (partials o [B, H, S, D] fp32, lse [B, H, S]);
`fits` says which calls it takes (2-bit codes of 128 channels, integer zero points, fp16 scales,
groups of 32, 64 or 128, a CUDA device with NVRTC). `decode_mha.decode_per_token_mha` routes here by
default where it fits (its `impl` argument)."""

from __future__ import annotations

import torch

from kvbench.kernels import nvrtc, token_scores_cuda, values_cuda
from kvbench.kernels.decode_mha import LOG2E


def fits(q, k_scale, v_scale, bits: int, group_size: int, integer_zero: bool) -> bool:
    """The shapes and dtypes both passes take (not whether NVRTC works here: `nvrtc.available`)."""
    from kvbench.kernels.decode_attention import interpreting

    d = q.shape[-1]
    return (token_scores_cuda.supports(1, d, bits, group_size) and values_cuda.supports(d, bits, group_size)
            and integer_zero and q.is_cuda and not interpreting() and k_scale.dtype == torch.float16
            and v_scale.dtype == torch.float16)


def decode_per_token_mha_cuda(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, lengths, scaling, *,
                              group_size, max_len=None, num_splits=None, splits_per_sm=None,
                              k_scale_heads_last=False, hadamard=False):
    """Partials of q [B, H, 128] over per-token packed 2-bit K/V (the `decode_mha` layouts) of H / gq
    KV heads (query head h reads KV head h // gq).
    `k_scale_heads_last`: key scales/zeros are [B, 1, cap, H] (one group a head). `splits_per_sm`:
    None takes each pass's own (measured) setting, else both passes take it. `hadamard`: K and V were
    stored rotated by the 128-point Hadamard (quarot): q is rotated in the key pass's prologue and
    each partial output back in the values pass's epilogue (no torch ops around the kernels)."""
    from kvbench.kernels.decode_attention import split_plan

    b, h, _ = q.shape
    cap = k_codes.shape[2]
    if k_scale_heads_last:  # a [B, H, cap, 1] view: the kernel reads the scales through strides
        k_scale, k_zero = k_scale.permute(0, 3, 2, 1), k_zero.permute(0, 3, 2, 1)
    max_len = cap if max_len is None else max_len
    scores = torch.empty(b, h, cap, dtype=torch.float32, device=q.device)
    tile_max = torch.empty(b, h, -(-cap // 16), dtype=torch.float32, device=q.device)  # the values pass's maxima
    step = token_scores_cuda.STEP
    gq = h // k_codes.shape[1]
    # the key pass's programs: one a query head, or one a KV head where its query heads share the codes
    programs = b * h // (gq if token_scores_cuda.shares_kv_rows(gq, 128 // group_size) else 1)
    ns, nit = split_plan(max_len, step, programs, q.device, per_sm=splits_per_sm or token_scores_cuda.SPLITS_PER_SM,
                         num_splits=num_splits)
    token_scores_cuda.token_scores(q, k_codes, k_scale, k_zero, lengths, scaling * LOG2E, scores,
                                   group_size=group_size, split_len=nit * step, num_splits=ns, tile_max=tile_max,
                                   rotate_q=hadamard)
    return values_cuda.values_from_scores(scores, v_codes, v_scale, v_zero, lengths, group_size=group_size,
                                          max_len=max_len, num_splits=num_splits,
                                          splits_per_sm=splits_per_sm or values_cuda.SPLITS_PER_SM, tile_max=tile_max,
                                          rotate_out=hadamard)


def use_cuda(impl, q, k_scale, v_scale, bits, group_size, integer_zero, where: str) -> bool:
    """Resolve an `impl` argument ("cuda", "triton" or None: CUDA where it fits and NVRTC works);
    asking for "cuda" where it does not fit is refused in one line naming `where`."""
    if impl not in (None, "triton", "cuda"):
        raise ValueError(f"{where}: impl must be 'triton', 'cuda' or None, not {impl!r}")
    ok = fits(q, k_scale, v_scale, bits, group_size, integer_zero)
    if impl == "cuda" and not ok:
        raise ValueError(f"{where}: the CUDA read needs 2-bit K/V of 128 channels in groups of 32, 64 or 128, integer "
                         "zero points, fp16 scales and a CUDA device")
    return ok and impl != "triton" and (impl == "cuda" or nvrtc.available())
