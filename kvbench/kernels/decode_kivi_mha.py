"""KIVI decode attention for one query per KV head (MHA), on CUDA cores, in two passes.

KIVI's keys are quantized per channel over groups of G tokens and stored channel-major (a 32-bit
word holds up to 16 tokens of one channel, `kvbench.packed_cache.KIVIPackedCache`), so a token's
score is a reduction over channels that sit in different words. The tensor-core kernel
(`decode_attention._decode_kivi_kernel`) unpacks every code to fp16 and moves it through shared
memory into a 16-row product of which one row is used. Here:

* **keys, pass 1**: each thread owns D / CT channels of one word position of a group, so the
  channel reduction is an in-thread FMA chain (one LOP3 + FADD + FFMA a code, the 2**23 unpack of
  `decode_mha`) and only CT lanes are summed across threads. The per-channel scale goes into
  the query (q_c * s_gc, once a group and channel) and the zero points into one bias a group
  (sum_c q_c z_gc). Scores go to a scratch row in global memory (L2-resident: 4 bytes a token
  against the 0.56 bytes of its 2-bit K and V) and their maximum is kept.
* **values, pass 2**: per-token codes as in `decode_mha` (deferred reduction over the tile's
  tokens, register double-buffering), with the probabilities exp2(s - max) read back: the
  maximum is exact, so nothing is ever rescaled.

Same contract as `decode_attention.decode_kivi` (partials o [B, Hq, S, D] fp32, lse [B, Hq, S]
over the quantized tokens [0, nq[b])); `supports` says which shapes take it.
"""

from __future__ import annotations

import math

import torch

from kvbench.kernels.decode_mha import LOG2E

try:  # torchao-style guard: importable without triton
    import triton
    import triton.language as tl

    from kvbench.kernels.decode_mha import _codes, _value_pass
except ImportError:  # pragma: no cover
    triton = None
    tl = None

KEY_LANES = 4  # CT: threads that share one word position of a group (the rest of the sum is in-thread)


def supports(gq: int, head_dim: int, bits: int, group_size: int) -> bool:
    """One query head per KV head; key words of whole 32-bit (G * bits >= 32); values in the
    plane layout `decode_mha` reads (groups of whole planes)."""
    from kvbench.kernels import decode_mha

    return (gq == 1 and bits in (2, 4, 8) and group_size * bits % 32 == 0 and head_dim % KEY_LANES == 0
            and decode_mha.supports(1, head_dim, bits, group_size))


if triton is not None:

    @triton.jit
    def _kivi_mha_kernel(
        q_ptr, kw_ptr, ks_ptr, kz_ptr, vw_ptr, vs_ptr, vz_ptr, nq_ptr, scr_ptr, o_ptr, lse_ptr,
        sm_scale, capg, capt, vs_b, vs_h, vs_t,
        NIT: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr, G: tl.constexpr,
        GT: tl.constexpr, CT: tl.constexpr, BN: tl.constexpr, NS: tl.constexpr, ASM: tl.constexpr,
        KEYS_ONLY: tl.constexpr = False,
    ):
        NPL: tl.constexpr = 8 // BITS
        K: tl.constexpr = 2 * NPL  # codes per half-word
        PT: tl.constexpr = G * BITS // 8  # key bytes per (group, channel)
        WK: tl.constexpr = PT // 4  # key words per (group, channel)
        CI: tl.constexpr = D // CT  # channels a thread sums in-thread
        pid = tl.program_id(0)
        split = tl.program_id(1)
        b = pid // HKV
        h = pid % HKV
        row = (b * HKV + h).to(tl.int64)
        ngroups = tl.load(nq_ptr + b).to(tl.int32) // G
        gstart = split * (NIT * GT)
        gend = tl.minimum(gstart + NIT * GT, ngroups)
        tbase = row * capt

        # ---- pass 1: scores of groups [gstart, gend), tiles [GT groups, K codes, CT lanes, WK words]
        k4 = tl.arange(0, K)[None, :, None, None]
        ct4 = tl.arange(0, CT)[None, None, :, None]
        w4 = tl.arange(0, WK)[None, None, None, :]
        pos4 = 8 * (k4 % 2) + BITS * (k4 // 2)  # code k of a half-word: byte k % 2, plane k // 2
        mask4 = ((1 << BITS) - 1) << pos4
        inv_pos = tl.exp2(-tl.reshape(pos4, (1, K, 1)).to(tl.float32))
        # token in group of (k, w), lower half-word (the upper one is 2 tokens further)
        k3 = tl.arange(0, K)[None, :, None]
        tok3 = (k3 // 2) * PT + 4 * tl.arange(0, WK)[None, None, :] + (k3 % 2)
        dch = tl.arange(0, D)[None, :]
        qv = tl.load(q_ptr + row * D + dch).to(tl.float32)  # [1, D]
        m = tl.full([], -1e30, tl.float32)
        for it in range(NIT):
            g0 = gstart + it * GT
            grp4 = g0 + tl.arange(0, GT)[:, None, None, None]
            gm4 = grp4 < gend
            goff4 = (row * capg + grp4) * D
            acc_lo = tl.zeros([GT, K, CT, WK], tl.float32)
            acc_hi = tl.zeros([GT, K, CT, WK], tl.float32)
            for ci in tl.static_range(CI):
                ch = ct4 * CI + ci
                words = tl.load(kw_ptr + (goff4 + ch) * WK + w4, mask=gm4, other=0)  # [GT, 1, CT, WK]
                qs = tl.load(q_ptr + row * D + ch).to(tl.float32) * \
                    tl.load(ks_ptr + goff4 + ch, mask=gm4, other=0.0).to(tl.float32)  # [GT, 1, CT, 1]
                acc_lo += _codes(words, mask4, ASM) * qs
                acc_hi += _codes(words >> 16, mask4, ASM) * qs
            grp2 = g0 + tl.arange(0, GT)[:, None]
            zt = tl.load(kz_ptr + (row * capg + grp2) * D + dch, mask=grp2 < gend, other=0.0).to(tl.float32)
            bias = tl.sum(zt * qv, 1)[:, None, None]  # [GT, 1, 1]: sum_c q_c z_gc
            s_lo = (tl.sum(acc_lo, 2) * inv_pos + bias) * sm_scale  # [GT, K, WK]
            s_hi = (tl.sum(acc_hi, 2) * inv_pos + bias) * sm_scale
            grp3 = g0 + tl.arange(0, GT)[:, None, None]
            gm3 = grp3 < gend
            t3 = grp3 * G + tok3
            tl.store(scr_ptr + tbase + t3, s_lo, mask=gm3)
            tl.store(scr_ptr + tbase + t3 + 2, s_hi, mask=gm3)
            m = tl.maximum(m, tl.max(tl.max(tl.max(tl.where(gm3, tl.maximum(s_lo, s_hi), -1e30), 2), 1), 0))
        if KEYS_ONLY:  # the values pass is `values_cuda`, launched after this kernel
            return
        tl.debug_barrier()  # the scores written by other threads of this program are read below

        # ---- pass 2: values of tokens [gstart * G, gend * G), decode_mha's value read with the exact maximum
        NITV: tl.constexpr = NIT * GT * G // BN
        _value_pass(scr_ptr, m, vw_ptr, vs_ptr, vz_ptr, b, h, row, gstart * G, gend * G, capt, vs_b, vs_h, vs_t,
                    o_ptr, lse_ptr, split, NITV, D, BITS, G, False, BN, NS, ASM)


def _values_cuda_fit(q, v_codes, v_scale, bits, group_size) -> bool:
    """Whether the CUDA values pass (`values_cuda`) takes these values here (not whether NVRTC works)."""
    from kvbench.kernels import values_cuda
    from kvbench.kernels.decode_attention import interpreting

    return (values_cuda.supports(q.shape[-1], bits, group_size) and q.is_cuda and not interpreting()
            and v_scale.dtype == torch.float16 and v_codes.is_contiguous())


def cuda_passes_fit(q, k_scale, v_codes, v_scale, bits, group_size) -> bool:
    """Whether both CUDA passes (`kivi_scores_cuda`, `values_cuda`) take this read here, NVRTC
    included: the only path for grouped queries (`decode_attention.decode_kivi` routes them here)."""
    from kvbench.kernels import kivi_scores_cuda, nvrtc

    return (_values_cuda_fit(q, v_codes, v_scale, bits, group_size)
            and kivi_scores_cuda.supports(1, q.shape[-1], bits, group_size) and k_scale.dtype == torch.float16
            and nvrtc.available())


def decode_kivi_mha(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, nq, scaling, *, bits, group_size,
                    max_len=None, num_splits=None, groups_per_tile=None, block_n=64, num_warps=4, splits_per_sm=4,
                    values_impl=None, scores_impl=None):
    """Partials over KIVI's quantized tokens [0, nq[b]) for q [B, H, D] (one query head per KV
    head; grouped queries through the CUDA passes only); the layouts of
    `decode_attention.decode_kivi`. `values_impl`: "cuda" (this kernel's key pass, then `values_cuda` on the tensor cores: 2-bit values of 128 channels), "triton" (both
    passes in this kernel) or None: "cuda" where it fits and NVRTC works (H100, B8 x 8192: 0.143
    against 0.151 ms with the codes-as-A values pass; ninth session). `scores_impl`: "cuda" (the
    key pass on the tensor cores, `kivi_scores_cuda`: groups of 32 at 2 bits, with the CUDA values
    pass), "triton" (this module's kernel) or None: "cuda" where it fits and NVRTC works."""
    from kvbench.kernels import kivi_scores_cuda, nvrtc, values_cuda
    from kvbench.kernels.decode_attention import _out, _require_triton, interpreting, split_plan

    _require_triton()
    b, hq, d = q.shape
    hkv, capg = k_codes.shape[1], k_codes.shape[2]
    capt = v_codes.shape[2]
    g = group_size
    if hq % hkv or not supports(1, d, bits, g):
        raise ValueError(f"decode_kivi_mha: unsupported shape (heads {hq}/{hkv}, D {d}, bits {bits}, group {g})")
    wk = g * bits // 32
    # one word position of a group per KEY_LANES threads: GT groups fill the program's threads
    gt = groups_per_tile or max(1, 32 * num_warps // (wk * KEY_LANES))
    bn = math.gcd(block_n, gt * g)  # value tiles of a power of two that divides the key tile
    total_groups = -(-(capt if max_len is None else max_len) // g)
    ns, nit = split_plan(total_groups, gt, b * hkv, q.device, per_sm=splits_per_sm, num_splits=num_splits)
    if values_impl not in (None, "triton", "cuda"):
        raise ValueError(f"decode_kivi_mha: values_impl must be 'triton', 'cuda' or None, not {values_impl!r}")
    cuda_fits = _values_cuda_fit(q, v_codes, v_scale, bits, g)
    if values_impl == "cuda" and not cuda_fits:
        raise ValueError("decode_kivi_mha: the CUDA values pass needs 2-bit values of 128 channels in groups of 32, "
                         "64 or 128, fp16 scales and a CUDA device")
    keys_only = cuda_fits and values_impl != "triton" and (values_impl == "cuda" or nvrtc.available())
    if scores_impl not in (None, "triton", "cuda"):
        raise ValueError(f"decode_kivi_mha: scores_impl must be 'triton', 'cuda' or None, not {scores_impl!r}")
    scores_fit = keys_only and kivi_scores_cuda.supports(1, d, bits, g) and k_scale.dtype == torch.float16
    if scores_impl == "cuda" and not scores_fit:
        raise ValueError("decode_kivi_mha: the CUDA key pass needs 2-bit keys in groups of 32 tokens, 128 channels, "
                         "fp16 scales, the CUDA values pass and a CUDA device")
    if hq != hkv and not (scores_fit and scores_impl != "triton"):
        raise ValueError(f"decode_kivi_mha: grouped queries (heads {hq}/{hkv}) need the CUDA passes (2-bit keys in "
                         "groups of 32 tokens, 128 channels, fp16 scales, a CUDA device with NVRTC)")
    if scores_fit and scores_impl != "triton":
        # one row a query head (grouped queries: query head h reads KV head h // (hq / hkv))
        scores = torch.empty(b, hq, capt, dtype=torch.float32, device=q.device)
        tile_max = torch.empty(b, hq, -(-capt // 16), dtype=torch.float32, device=q.device)
        step = kivi_scores_cuda.WARPS * kivi_scores_cuda.GROUPS_PER_WARP  # groups a program takes an iteration
        ns_k, nit_k = split_plan(total_groups, step, b * hq, q.device, per_sm=kivi_scores_cuda.SPLITS_PER_SM,
                                 num_splits=num_splits)
        kivi_scores_cuda.kivi_scores(q, k_codes, k_scale, k_zero, nq, scaling * LOG2E, scores, tile_max,
                                     split_groups=nit_k * step, num_splits=ns_k)
        return values_cuda.values_from_scores(scores, v_codes, v_scale, v_zero, nq, group_size=g, integer_zero=False,
                                              max_len=min(capt, total_groups * g), num_splits=num_splits,
                                              tile_max=tile_max)
    scratch = torch.empty(b * hkv * capt, dtype=torch.float32, device=q.device)  # scores, token by token
    o, lse = (scratch, scratch) if keys_only else _out(q, ns)  # (unwritten with KEYS_ONLY)
    # the key tensors are indexed as contiguous (no-ops for a cache's own tensors)
    k_codes, k_scale, k_zero = k_codes.contiguous(), k_scale.contiguous(), k_zero.contiguous()
    _kivi_mha_kernel[(b * hkv, ns)](
        q.contiguous(), k_codes.view(torch.int32), k_scale, k_zero, v_codes.view(torch.int32), v_scale, v_zero, nq,
        scratch, o, lse, scaling * LOG2E, capg, capt, v_scale.stride(0), v_scale.stride(1), v_scale.stride(2),
        NIT=nit, HKV=hkv, D=d, BITS=bits, G=g, GT=gt, CT=KEY_LANES, BN=bn, NS=ns, ASM=not interpreting(),
        KEYS_ONLY=keys_only, num_warps=num_warps,
    )  # fmt: skip
    if keys_only:
        return values_cuda.values_from_scores(scratch.view(b, hkv, capt), v_codes, v_scale, v_zero, nq, group_size=g,
                                              integer_zero=False, max_len=min(capt, total_groups * g),
                                              num_splits=num_splits)
    return o, lse
