"""RotateKV's decode read for one query head per KV head (MHA), keys decoded once per byte.

`decode_attention.decode_rotatekv` stacks the head group into the rows of tensor-core products
and loads every key byte once per head (its 26 instructions a code: docs/kernel-notes.md). Here
the layout is used the other way round. When head_group * bits == 8 (4 heads at 2 bits, the
Llama-2 default; 2 at 4 bits; 1 at 8 bits) byte j of a key row holds channel j of every head of
the group, one head a bit plane. So a tile is one [tokens, D] byte load, and each head's codes
are a shift and a mask of it:

* dequantize per head (the calibrated permutation: each element's scale and zero are gathered
  by the channel's group, `gid`), then mix the heads with H_hg in-thread (adds, all heads of a
  (token, channel) sit in one thread);
* post-RoPE keys: the caller's query is H_D q, so a score is a CUDA-core dot of the mixed tile;
* pre-RoPE keys: one [tokens, D] x [D, D] tensor-core product per head applies H_D (the two
  halves of H_D as two products hand RoPE its rotate-half pairs in one thread), RoPE at each
  key's position (cos/sin rows loaded once a tile, shared by the heads), then the dot;
* values per head as `decode_mha` reads them (codes unpacked in place, the scale on the
  probabilities, per-token products summed after the loop), one online softmax per head with
  lazy rescaling.

Same contract as `decode_attention.decode_rotatekv` (partials o [B, H, S, D] fp32 in the
value-rotated space, lse [B, H, S]); `supports` says which shapes it takes.
"""

from __future__ import annotations

import math

import torch

try:  # torchao-style guard: importable without triton
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None
    tl = None

from kvbench.kernels import decode_mha

LOG2E = 1.4426950408889634


def supports(gq: int, head_dim: int, bits: int, value_group: int, head_group: int) -> bool:
    """One query head per KV head, a byte holding one channel of every head of the group, and
    values the MHA kernel can read."""
    return (gq == 1 and head_group * bits == 8 and head_group in (1, 2, 4) and head_dim & (head_dim - 1) == 0
            and head_dim >= 32 and decode_mha.supports(1, head_dim, bits, value_group))


if triton is not None:
    from kvbench.kernels.decode_mha import _codes, _load_rows

    @triton.jit
    def _deq_head(kraw, hp: tl.constexpr, s_row, zs_row, gid_ptr, gbase, d, D: tl.constexpr,
                  BITS: tl.constexpr, GATHER: tl.constexpr):
        """Dequantized keys [BN, D] (fp32) of head slot hp of the group from the byte tile.
        s_row / zs_row: the tile's scales and scale * zero, [BN, NQ] (GATHER: indexed by each
        channel's quantization group, a warp shuffle an element) or [BN, HG]-wide per-head
        columns picked by hp (one group per (token, head))."""
        x = (kraw >> (hp * BITS)) & ((1 << BITS) - 1)
        c = (x | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0  # exact: code < 2**23
        if GATHER:
            g = tl.load(gid_ptr + gbase + hp * D + d)
            idx = tl.broadcast_to(g[None, :], (kraw.shape[0], D))
            return c * tl.gather(s_row, idx, 1) - tl.gather(zs_row, idx, 1)
        sel = tl.arange(0, s_row.shape[1])[None, :] == hp
        s = tl.sum(tl.where(sel, s_row, 0.0), 1)
        zs = tl.sum(tl.where(sel, zs_row, 0.0), 1)
        return c * s[:, None] - zs[:, None]

    @triton.jit
    def _score(y, q_ptr, qrow, d, d2, cs, sn, h_lo, h_hi, PRE_ROPE: tl.constexpr, D: tl.constexpr):
        """Scores [BN] of one head: y [BN, D] are its mixed (H_hg) dequantized keys."""
        if PRE_ROPE:
            y16 = y.to(tl.float16)
            u_lo = tl.dot(y16, h_lo)  # [BN, D/2] = y @ H_D[:, :D/2]
            u_hi = tl.dot(y16, h_hi)
            q_lo = tl.load(q_ptr + qrow + d2).to(tl.float32)
            q_hi = tl.load(q_ptr + qrow + D // 2 + d2).to(tl.float32)
            r_lo = u_lo * cs - u_hi * sn
            r_hi = u_hi * cs + u_lo * sn
            return tl.sum(r_lo * q_lo[None, :] + r_hi * q_hi[None, :], 1)
        q = tl.load(q_ptr + qrow + d).to(tl.float32)  # H_D q (the caller's)
        return tl.sum(y * q[None, :], 1)

    @triton.jit
    def _head_step(s, m, l, acc_lo, acc_hi, corr, vw, vsc, vzp, mask4, TAU: tl.constexpr, ASM: tl.constexpr):
        """Online softmax and value accumulation of one head over one tile (log2-scaled scores s,
        -inf where masked). The running maximum is raised only when a tile exceeds it by TAU
        (probabilities stay below 2**TAU), so the accumulators are rarely rescaled."""
        mx = tl.max(s, 0)
        if mx - m > TAU:
            alpha = tl.exp2(m - mx)
            acc_lo = acc_lo * alpha
            acc_hi = acc_hi * alpha
            corr = corr * alpha
            l = l * alpha
            m = mx
        p = tl.exp2(s - m)  # [BN]
        l += tl.sum(p, 0)
        ps = p[:, None] * vsc  # [BN, NG]
        corr += ps * vzp
        ps4 = ps[:, :, None, None]
        acc_lo += _codes(vw, mask4, ASM) * ps4
        acc_hi += _codes(vw >> 16, mask4, ASM) * ps4
        return m, l, acc_lo, acc_hi, corr

    @triton.jit
    def _store_head(o_ptr, lse_ptr, row, split, m, l, acc_lo, acc_hi, corr, inv_pos, chan_lo, chan_hi,
                    NS: tl.constexpr, D: tl.constexpr):
        has = l > 0
        inv = tl.where(has, 1.0 / tl.where(has, l, 1.0), 0.0)
        corr4 = tl.sum(corr, 0)[None, :, None, None]
        orow = (row.to(tl.int64) * NS + split) * D
        tl.store(o_ptr + orow + chan_lo, (tl.sum(acc_lo, 0)[None] * inv_pos - corr4) * inv)
        tl.store(o_ptr + orow + chan_hi, (tl.sum(acc_hi, 0)[None] * inv_pos - corr4) * inv)
        lse = tl.where(has, (m + tl.log2(tl.where(has, l, 1.0))) / 1.4426950408889634, float("-inf"))
        tl.store(lse_ptr + row * NS + split, lse)

    @triton.jit
    def _rotatekv_mha_kernel(
        q_ptr, kc_ptr, ks_ptr, kz_ptr, gid_ptr, vw_ptr, vs_ptr, vz_ptr, len_ptr, pos_ptr, cos_ptr, sin_ptr, h_ptr,
        o_ptr, lse_ptr, sm_scale, cap, vs_b, vs_h, vs_t,
        NIT: tl.constexpr, NGRP: tl.constexpr, HG: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr,
        NQ: tl.constexpr, G: tl.constexpr, PRE_ROPE: tl.constexpr, BN: tl.constexpr, NS: tl.constexpr,
        GATHER: tl.constexpr, TAU: tl.constexpr, ASM: tl.constexpr,
    ):
        HKV: tl.constexpr = NGRP * HG
        D2: tl.constexpr = D // 2
        # values: decode_mha's word tiles [BN, NG, KG, W] (see its kernel for the index algebra)
        P: tl.constexpr = D * BITS // 8
        W: tl.constexpr = P // 4
        NPL: tl.constexpr = 8 // BITS
        K: tl.constexpr = 2 * NPL
        NG: tl.constexpr = D // G
        KG: tl.constexpr = K // NG
        pid = tl.program_id(0)
        split = tl.program_id(1)
        b = pid // NGRP
        grp = pid % NGRP
        length = tl.load(len_ptr + b).to(tl.int32)
        start = split * (NIT * BN)
        end = tl.minimum(start + NIT * BN, length)

        d = tl.arange(0, D)
        d2 = tl.arange(0, D2)
        k4 = tl.arange(0, NG)[None, :, None, None] * KG + tl.arange(0, KG)[None, None, :, None]
        w4 = tl.arange(0, W)[None, None, None, :]
        pos4 = 8 * (k4 % 2) + BITS * (k4 // 2)
        mask4 = ((1 << BITS) - 1) << pos4
        chan_lo = (k4 // 2) * P + 4 * w4 + (k4 % 2)
        chan_hi = chan_lo + 2
        inv_pos = tl.exp2(-pos4.to(tl.float32))
        g2 = tl.arange(0, NG)[None, :]
        if PRE_ROPE:  # H_D (symmetric, +-1) split into its two column halves, [D, D/2] each
            h_lo = tl.load(h_ptr + d[:, None] * D + d2[None, :])
            h_hi = tl.load(h_ptr + d[:, None] * D + D2 + d2[None, :])
        else:
            h_lo = 0
            h_hi = 0

        h0 = grp * HG
        q0 = (b * HKV + h0).to(tl.int64) * D
        gbase = grp * HG * D if GATHER else grp * HG
        kbase = (b * NGRP + grp).to(tl.int64) * cap
        sbase = b.to(tl.int64) * cap
        vbase0 = (b * HKV + h0).to(tl.int64) * cap

        m0 = tl.full([], -1e30, tl.float32)
        l0 = tl.full([], 0.0, tl.float32)
        a_lo0 = tl.zeros([BN, NG, KG, W], tl.float32)
        a_hi0 = tl.zeros([BN, NG, KG, W], tl.float32)
        c0 = tl.zeros([BN, NG], tl.float32)
        m1 = tl.full([], -1e30, tl.float32)
        l1 = tl.full([], 0.0, tl.float32)
        a_lo1 = tl.zeros([BN, NG, KG, W], tl.float32)
        a_hi1 = tl.zeros([BN, NG, KG, W], tl.float32)
        c1 = tl.zeros([BN, NG], tl.float32)
        m2 = tl.full([], -1e30, tl.float32)
        l2 = tl.full([], 0.0, tl.float32)
        a_lo2 = tl.zeros([BN, NG, KG, W], tl.float32)
        a_hi2 = tl.zeros([BN, NG, KG, W], tl.float32)
        c2 = tl.zeros([BN, NG], tl.float32)
        m3 = tl.full([], -1e30, tl.float32)
        l3 = tl.full([], 0.0, tl.float32)
        a_lo3 = tl.zeros([BN, NG, KG, W], tl.float32)
        a_hi3 = tl.zeros([BN, NG, KG, W], tl.float32)
        c3 = tl.zeros([BN, NG], tl.float32)

        for it in range(NIT):
            t0 = start + it * BN
            tok = t0 + tl.arange(0, BN)
            tmask = tok < end
            kraw = tl.load(kc_ptr + (kbase + tok)[:, None] * D + d[None, :], mask=tmask[:, None], other=0).to(tl.int32)
            # the tile's key scales and scale * zero in fp32, once a token (GATHER: all NQ groups;
            # else the group's HG heads); each element then picks its own
            if GATHER:
                soff = (sbase + tok)[:, None] * NQ + tl.arange(0, NQ)[None, :]
            else:
                soff = (sbase + tok)[:, None] * NQ + gbase + tl.arange(0, HG)[None, :]
            s_row = tl.load(ks_ptr + soff, mask=tmask[:, None], other=0.0).to(tl.float32)
            zs_row = tl.load(kz_ptr + soff, mask=tmask[:, None], other=0.0).to(tl.float32) * s_row
            if PRE_ROPE:  # cos/sin rows at each key's position, shared by the group's heads
                p_ = tl.load(pos_ptr + sbase + tok, mask=tmask, other=0).to(tl.int64) * D
                cs = tl.load(cos_ptr + p_[:, None] + d2[None, :], mask=tmask[:, None], other=0.0).to(tl.float32)
                sn = tl.load(sin_ptr + p_[:, None] + d2[None, :], mask=tmask[:, None], other=0.0).to(tl.float32)
            else:
                cs = 0.0
                sn = 0.0
            x0 = _deq_head(kraw, 0, s_row, zs_row, gid_ptr, gbase, d, D, BITS, GATHER)
            if HG == 1:
                y0 = x0
            else:
                x1 = _deq_head(kraw, 1, s_row, zs_row, gid_ptr, gbase, d, D, BITS, GATHER)
                if HG == 2:
                    y0 = x0 + x1
                    y1 = x0 - x1
                else:  # H_4 (Sylvester) as a butterfly, in-thread
                    x2 = _deq_head(kraw, 2, s_row, zs_row, gid_ptr, gbase, d, D, BITS, GATHER)
                    x3 = _deq_head(kraw, 3, s_row, zs_row, gid_ptr, gbase, d, D, BITS, GATHER)
                    e0 = x0 + x1
                    e1 = x0 - x1
                    e2 = x2 + x3
                    e3 = x2 - x3
                    y0 = e0 + e2
                    y1 = e1 + e3
                    y2 = e0 - e2
                    y3 = e1 - e3

            s = _score(y0, q_ptr, q0, d, d2, cs, sn, h_lo, h_hi, PRE_ROPE, D)
            s = tl.where(tmask, s * sm_scale, float("-inf"))
            vw, vsc, vzp = _load_rows(vw_ptr, vs_ptr, vz_ptr, b, h0, vbase0, t0, end, vs_b, vs_h, vs_t, w4, g2, BN, W)
            m0, l0, a_lo0, a_hi0, c0 = _head_step(s, m0, l0, a_lo0, a_hi0, c0, vw, vsc, vzp, mask4, TAU, ASM)
            if HG >= 2:
                s = _score(y1, q_ptr, q0 + D, d, d2, cs, sn, h_lo, h_hi, PRE_ROPE, D)
                s = tl.where(tmask, s * sm_scale, float("-inf"))
                vw, vsc, vzp = _load_rows(vw_ptr, vs_ptr, vz_ptr, b, h0 + 1, vbase0 + cap, t0, end, vs_b, vs_h, vs_t,
                                          w4, g2, BN, W)
                m1, l1, a_lo1, a_hi1, c1 = _head_step(s, m1, l1, a_lo1, a_hi1, c1, vw, vsc, vzp, mask4, TAU, ASM)
            if HG >= 4:
                s = _score(y2, q_ptr, q0 + 2 * D, d, d2, cs, sn, h_lo, h_hi, PRE_ROPE, D)
                s = tl.where(tmask, s * sm_scale, float("-inf"))
                vw, vsc, vzp = _load_rows(vw_ptr, vs_ptr, vz_ptr, b, h0 + 2, vbase0 + 2 * cap, t0, end, vs_b, vs_h,
                                          vs_t, w4, g2, BN, W)
                m2, l2, a_lo2, a_hi2, c2 = _head_step(s, m2, l2, a_lo2, a_hi2, c2, vw, vsc, vzp, mask4, TAU, ASM)
                s = _score(y3, q_ptr, q0 + 3 * D, d, d2, cs, sn, h_lo, h_hi, PRE_ROPE, D)
                s = tl.where(tmask, s * sm_scale, float("-inf"))
                vw, vsc, vzp = _load_rows(vw_ptr, vs_ptr, vz_ptr, b, h0 + 3, vbase0 + 3 * cap, t0, end, vs_b, vs_h,
                                          vs_t, w4, g2, BN, W)
                m3, l3, a_lo3, a_hi3, c3 = _head_step(s, m3, l3, a_lo3, a_hi3, c3, vw, vsc, vzp, mask4, TAU, ASM)

        row0 = b * HKV + h0
        _store_head(o_ptr, lse_ptr, row0, split, m0, l0, a_lo0, a_hi0, c0, inv_pos, chan_lo, chan_hi, NS, D)
        if HG >= 2:
            _store_head(o_ptr, lse_ptr, row0 + 1, split, m1, l1, a_lo1, a_hi1, c1, inv_pos, chan_lo, chan_hi, NS, D)
        if HG >= 4:
            _store_head(o_ptr, lse_ptr, row0 + 2, split, m2, l2, a_lo2, a_hi2, c2, inv_pos, chan_lo, chan_hi, NS, D)
            _store_head(o_ptr, lse_ptr, row0 + 3, split, m3, l3, a_lo3, a_hi3, c3, inv_pos, chan_lo, chan_hi, NS, D)


def decode_rotatekv_mha(q, k_codes, k_scale, k_zero, gid, v_codes, v_scale, v_zero, lengths, positions, cos, sin,
                        scaling, *, bits, group_size, head_group, pre_rope=True, max_len=None, num_splits=None,
                        block_n=16, num_warps=4, num_stages=2, splits_per_sm=2):
    """`decode_attention.decode_rotatekv`'s contract for shapes `supports` accepts: q [B, H, D]
    after RoPE and unrotated; partials whose outputs are in the value-rotated space."""
    from kvbench.kernels.decode_attention import _out, _require_triton, _sign_matrix_on, interpreting, split_plan

    _require_triton()
    b, hq, d = q.shape
    ngrp, cap = k_codes.shape[1], k_codes.shape[2]
    hkv = v_codes.shape[1]
    hg = head_group
    if not supports(hq // hkv, d, bits, group_size, hg) or hq != hkv:
        raise ValueError(f"decode_rotatekv_mha: unsupported shape (heads {hq}/{hkv}, D {d}, bits {bits}, "
                         f"group {group_size}, head group {hg})")
    nq = k_scale.shape[-1]
    gather = gid is not None
    if not gather and nq != hkv:
        raise ValueError("decode_rotatekv_mha without gid (no channel permutation) needs one key group a head")
    max_len = cap if max_len is None else max_len
    ns, nit = split_plan(max_len, block_n, b * ngrp, q.device, per_sm=splits_per_sm, num_splits=num_splits)
    hsign = _sign_matrix_on(d, torch.float16, q.device)
    if not pre_rope:  # H_D q for each head (H_D symmetric): the key path is then dequantize + dot
        q = (q.float() @ hsign.float()).to(q.dtype)
    o, lse = _out(q, ns)
    v_strides = (v_scale.stride(0), v_scale.stride(1), v_scale.stride(2))
    _rotatekv_mha_kernel[(b * ngrp, ns)](
        q.contiguous(), k_codes, k_scale, k_zero, gid if gather else k_scale, v_codes.view(torch.int32), v_scale,
        v_zero, lengths, positions, cos, sin, hsign, o, lse, scaling * LOG2E / math.sqrt(hg * d), cap, *v_strides,
        NIT=nit, NGRP=ngrp, HG=hg, D=d, BITS=bits, NQ=nq, G=group_size, PRE_ROPE=pre_rope, BN=block_n, NS=ns,
        GATHER=gather, TAU=8.0, ASM=not interpreting(), num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return o, lse
