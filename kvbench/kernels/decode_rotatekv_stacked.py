"""RotateKV's decode read with the head group stacked into the rows of every product.

Same contract and layouts as `decode_attention.decode_rotatekv` (keys: one row of head_group * D
codes per head group and token in rotated, unpermuted order, per-token scales of the calibrated
groups gathered through `gid`; values per head, H_D-rotated; partials o [B, Hq, S, D] still in
the value-rotated space and lse [B, Hq, S]).

What differs from the first kernel, and why (docs/kernel-notes.md has the measurements):

* **one product per step, not one per head.** A tile holds BN tokens of all HG heads of the
  group as RR = HG * BN key rows (head-major). H_D (two halves, which hand RoPE its rotate-half
  pairs), the scores and the values are each one `tl.dot` over all RR rows; the first kernel ran
  HG value products per tile (one per head) over 16-token tiles, i.e. many small products and a
  layout round trip before each.
* **values with the scale on the probabilities.** The block-diagonal probabilities (query row r
  only sees the value rows of its own KV head) times the scale of each value row multiply the
  raw codes read as 1024 + c (exact in fp16); the zero points and the 1024 come off as one
  per-row correction. No per-element dequantization of values.
* **loop-invariant offsets.** Byte offsets, bit shifts and the quantization group of every
  channel are computed once; inside the loop an element costs its loads and the arithmetic.

The head mix H_HG still follows the scores (score_h = sum_h' H_HG[h, h'] q_h . RoPE(H_D x_h'),
H_HG commutes with RoPE), a signed sum over the HG key rows of each token: QN * RR products a
tile, small next to the D * RR of the key path.
"""

from __future__ import annotations

import math

import torch

from kvbench.kernels.decode_attention import LOG2E, _out, _require_triton, _sign_matrix_on, split_plan

try:  # torchao-style guard: importable without triton
    import triton
    import triton.language as tl

    from kvbench.kernels.decode_attention import _parity_sign
except ImportError:  # pragma: no cover
    triton = None
    tl = None


if triton is not None:

    @triton.jit
    def _dot(a, b, EXACT: tl.constexpr):
        if EXACT:
            return tl.dot(a, b, input_precision="ieee")
        return tl.dot(a, b)

    @triton.jit
    def _codes(raw, shift, MASK: tl.constexpr, EXACT: tl.constexpr):
        """Codes at bit `shift` of int32 bytes: exact fp16 (1024 + c read as fp16, minus 1024), or
        float32 for the exact path."""
        c = (raw >> shift) & MASK
        if EXACT:
            out = c.to(tl.float32)
        else:
            out = ((c | 0x6400).to(tl.int16).to(tl.float16, bitcast=True) - 1024.0).to(tl.float16)
        return out

    @triton.jit
    def _rotatekv_stacked_kernel(
        q_ptr, kc_ptr, ks_ptr, kz_ptr, gid_ptr, vc_ptr, vs_ptr, vz_ptr, len_ptr, pos_ptr,
        cos_ptr, sin_ptr, h_ptr, o_ptr, lse_ptr,
        sm_scale, cap,
        NIT: tl.constexpr, NGRP: tl.constexpr, HG: tl.constexpr, GQ: tl.constexpr, D: tl.constexpr,
        BITS: tl.constexpr, NQ: tl.constexpr, G: tl.constexpr, PRE_ROPE: tl.constexpr, QN: tl.constexpr,
        BN: tl.constexpr, NS: tl.constexpr, GATHER: tl.constexpr, EXACT: tl.constexpr,
    ):
        P: tl.constexpr = D * BITS // 8  # value bytes per token and head
        PR: tl.constexpr = HG * D * BITS // 8  # key bytes per token and head group
        RR: tl.constexpr = HG * BN  # key and value rows of a tile: (head in group, token), head-major
        D2: tl.constexpr = D // 2
        NGV: tl.constexpr = D // G  # value groups per head
        HKV: tl.constexpr = NGRP * HG
        HQ: tl.constexpr = HKV * GQ
        MASK: tl.constexpr = (1 << BITS) - 1
        pid = tl.program_id(0)
        split = tl.program_id(1)
        b = pid // NGRP
        grp = pid % NGRP
        length = tl.load(len_ptr + b).to(tl.int32)
        start = split * (NIT * BN)
        end = tl.minimum(start + NIT * BN, length)
        dt = tl.float32 if EXACT else tl.float16

        # query rows: the group's HG * GQ query heads, padded to QN
        r = tl.arange(0, QN)
        rmask = r < HG * GQ
        rhead = r // GQ
        qrow = (b * HQ + grp * HG * GQ + r).to(tl.int64) * D
        d = tl.arange(0, D)
        d2 = tl.arange(0, D2)
        if PRE_ROPE:
            q_lo = tl.load(q_ptr + qrow[:, None] + d2[None, :], mask=rmask[:, None], other=0.0).to(dt)
            q_hi = tl.load(q_ptr + qrow[:, None] + D2 + d2[None, :], mask=rmask[:, None], other=0.0).to(dt)
            # rows 0..D/2-1 and D/2..D-1 of the symmetric +-1 H_D: U^T = H X^T in the two RoPE halves
            h_lo = tl.load(h_ptr + d2[:, None] * D + d[None, :]).to(dt)
            h_hi = tl.load(h_ptr + (D2 + d2[:, None]) * D + d[None, :]).to(dt)
        else:
            q = tl.load(q_ptr + qrow[:, None] + d[None, :], mask=rmask[:, None], other=0.0).to(dt)

        # Codes are read as int32 words and unpacked in the thread that loaded them: tiles are 5-D,
        # keys [plane of the head, word, byte, head, token] and values [head, token, plane, word,
        # byte], loaded as [1, W, 1, HG, BN] / [HG, BN, 1, W, 1] words (the broadcast axes stay in
        # the thread), then reshaped to the 2-D [D, RR] / [RR, D] operands of the products. Every
        # index is a small broadcast vector: a full [D, RR] index tensor would be loop-invariant
        # and live in registers (64 a thread at RR = 64), spilling the kernel.
        NPH: tl.constexpr = D // PR if PR < D else 1  # bit planes a head spans
        WH: tl.constexpr = D // NPH // 4  # key words of a head in one plane
        NPV: tl.constexpr = 8 // BITS
        WV: tl.constexpr = P // 4  # value words a row
        kk = tl.arange(0, 4)
        h5 = tl.arange(0, HG)[None, None, None, :, None]
        tt = tl.arange(0, BN)
        t5 = tt[None, None, None, None, :]
        kp = tl.arange(0, NPH)[:, None, None, None, None]
        kw = tl.arange(0, WH)[None, :, None, None, None]
        k5 = kk[None, None, :, None, None]
        kword = ((h5 * D) % PR) // 4 + kw  # [1, WH, 1, HG, 1] word of the row
        kshift = 8 * k5 + BITS * ((h5 * D) // PR + kp)  # [NPH, 1, 4, HG, 1]
        chan = h5 * D + kp * (WH * 4) + kw * 4 + k5  # [NPH, WH, 4, HG, 1] channel in the group's key row
        if GATHER:  # calibrated permutation: the token's scale of each channel's group
            gcol = tl.load(gid_ptr + grp * HG * D + chan)
        else:  # groups are (token, head)
            gcol = grp * HG + h5
        sign = _parity_sign(rhead[:, None, None], tl.arange(0, HG)[None, :, None])  # [QN, HG, 1] = H_HG[query head, head]
        own = rhead[:, None, None] == tl.arange(0, HG)[None, :, None]  # value rows of each query row's own KV head
        vh = tl.arange(0, HG)[:, None, None, None, None]
        vt = tt[None, :, None, None, None]
        vp = tl.arange(0, NPV)[None, None, :, None, None]
        vw = tl.arange(0, WV)[None, None, None, :, None]
        vk = kk[None, None, None, None, :]
        vshift = 8 * vk + BITS * vp  # [1, 1, NPV, 1, 4]
        vslot = vh * cap + vt  # [HG, BN, 1, 1, 1] slot from the group's first head's row, tile start
        kbase = (b * NGRP + grp).to(tl.int64) * cap
        sbase = b.to(tl.int64) * cap
        vbase = (b * HKV + grp * HG).to(tl.int64) * cap

        m_i = tl.full([QN], float("-inf"), tl.float32)
        l_i = tl.zeros([QN], tl.float32)
        acc = tl.zeros([QN, D], tl.float32)
        for it in range(NIT):
            n0 = start + it * BN
            tok = n0 + tt
            tmask = tok < end
            tm5 = tmask[None, None, None, None, :]
            # scalar row bases (int64) plus int32 offsets: one address op an element
            words = tl.load(kc_ptr + (kbase + n0) * (PR // 4) + (t5 * (PR // 4) + kword), mask=tm5, other=0)
            c = _codes(words, kshift, MASK, EXACT)  # [NPH, WH, 4, HG, BN]
            soff = t5 * NQ + gcol
            sc = tl.load(ks_ptr + (sbase + n0) * NQ + soff, mask=tm5, other=0.0).to(dt)
            zc = tl.load(kz_ptr + (sbase + n0) * NQ + soff, mask=tm5, other=0.0).to(dt)
            x = tl.reshape((c - zc) * sc, (D, RR))  # rotated keys, channel-major, un-mixed across heads
            if PRE_ROPE:
                u_lo = _dot(h_lo, x, EXACT)  # [D/2, RR] float32
                u_hi = _dot(h_hi, x, EXACT)
                p_ = tl.load(pos_ptr + sbase + tok, mask=tmask, other=0) * D
                cs = tl.load(cos_ptr + p_[None, None, :] + d2[:, None, None], mask=tmask[None, None, :], other=0.0)
                sn = tl.load(sin_ptr + p_[None, None, :] + d2[:, None, None], mask=tmask[None, None, :], other=0.0)
                # one table row serves the group's heads
                cs = tl.reshape(tl.broadcast_to(cs.to(tl.float32), (D2, HG, BN)), (D2, RR))
                sn = tl.reshape(tl.broadcast_to(sn.to(tl.float32), (D2, HG, BN)), (D2, RR))
                sfull = (_dot(q_lo, (u_lo * cs - u_hi * sn).to(dt), EXACT)
                         + _dot(q_hi, (u_hi * cs + u_lo * sn).to(dt), EXACT))  # [QN, RR]
            else:
                sfull = _dot(q, x, EXACT)
            if HG == 1:
                s = sfull
            else:
                s = tl.sum(tl.reshape(sfull, (QN, HG, BN)) * sign, 1)  # mix heads: [QN, BN]
            s = tl.where(tmask[None, :], s * sm_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # an all-masked row stays at 0
            alpha = tl.exp2(m_i - m_use)
            pr = tl.exp2(s - m_use[:, None])
            l_i = l_i * alpha + tl.sum(pr, 1)
            acc = acc * alpha[:, None]
            # each query row's probabilities on its own head's value rows, zero elsewhere
            pb = tl.where(own, pr[:, None, :], 0.0)  # [QN, HG, BN]
            vm5 = tmask[None, :, None, None, None]
            vrow = (vbase + n0) + vslot  # [HG, BN, 1, 1, 1] value rows (int64)
            vwords = tl.load(vc_ptr + (vbase + n0) * WV + (vslot * WV + vw), mask=vm5, other=0)  # [HG, BN, 1, WV, 1]
            if NGV == 1 and not EXACT:  # scale onto the probabilities, codes stay 1024 + c
                vsc = tl.load(vs_ptr + vrow, mask=vm5, other=0.0).to(tl.float32)
                vz = tl.load(vz_ptr + vrow, mask=vm5, other=0.0).to(tl.float32)
                ps = pb * tl.reshape(vsc, (HG, BN))[None]
                cv = (((vwords >> vshift) & MASK) | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)
                corr = tl.sum(tl.sum(ps.to(tl.float16).to(tl.float32) * (tl.reshape(vz, (HG, BN)) + 1024.0)[None], 2), 1)
                acc += tl.dot(tl.reshape(ps.to(tl.float16), (QN, RR)), tl.reshape(cv, (RR, D))) - corr[:, None]
            else:
                if NGV == 1:
                    vsc = tl.load(vs_ptr + vrow, mask=vm5, other=0.0).to(dt)
                    vz = tl.load(vz_ptr + vrow, mask=vm5, other=0.0).to(dt)
                else:
                    goff = vrow * NGV + (vp * P + vw * 4 + vk) // G
                    vsc = tl.load(vs_ptr + goff, mask=vm5, other=0.0).to(dt)
                    vz = tl.load(vz_ptr + goff, mask=vm5, other=0.0).to(dt)
                v = (_codes(vwords, vshift, MASK, EXACT) - vz) * vsc  # [HG, BN, NPV, WV, 4]
                acc += _dot(tl.reshape(pb.to(dt), (QN, RR)), tl.reshape(v, (RR, D)), EXACT)
            m_i = m_new

        has = l_i > 0
        inv = tl.where(has, 1.0 / tl.where(has, l_i, 1.0), 0.0)
        orow = ((b * HQ + grp * HG * GQ + r).to(tl.int64) * NS + split) * D
        tl.store(o_ptr + orow[:, None] + d[None, :], acc * inv[:, None], mask=rmask[:, None])
        lse = tl.where(has, (m_i + tl.log2(tl.where(has, l_i, 1.0))) / 1.4426950408889634, float("-inf"))
        tl.store(lse_ptr + (b * HQ + grp * HG * GQ + r) * NS + split, lse, mask=rmask)


def decode_rotatekv_stacked(q, k_codes, k_scale, k_zero, gid, v_codes, v_scale, v_zero, lengths, positions, cos,
                            sin, scaling, *, bits, group_size, head_group, pre_rope=True, max_len=None,
                            num_splits=None, block_n=None, num_warps=4, num_stages=2, splits_per_sm=2, exact=False):
    """Partial attention over RotateKV's packed tokens; the contract of
    `decode_attention.decode_rotatekv` (q [B, Hq, D] after RoPE, unrotated; outputs still in the
    value-rotated space). `exact`: float32 arithmetic (IEEE products), for checking."""
    _require_triton()
    b, hq, d = q.shape
    ngrp, cap = k_codes.shape[1], k_codes.shape[2]
    hkv = v_codes.shape[1]
    gq = hq // hkv
    hg = head_group
    nq = k_scale.shape[-1]
    bn = block_n or max(16, 64 // hg)
    max_len = cap if max_len is None else max_len
    ns, nit = split_plan(max_len, bn, b * ngrp, q.device, per_sm=splits_per_sm, num_splits=num_splits)
    gather = gid is not None
    if not gather:
        if group_size != d or nq != hkv:
            raise ValueError("decode_rotatekv without gid (no channel permutation) needs group_size == head_dim")
        gid = k_scale  # unused
    if exact:
        q = q.float()
    hsign = _sign_matrix_on(d, q.dtype, q.device)
    norm = 1.0 / math.sqrt(hg * d)
    if not pre_rope:
        q = (q.float() @ hsign.float()).to(q.dtype)  # H_D symmetric: (H_D q) for each head
    o, lse = _out(q, ns)
    _rotatekv_stacked_kernel[(b * ngrp, ns)](
        q.contiguous(), k_codes.view(torch.int32), k_scale, k_zero, gid, v_codes.view(torch.int32), v_scale, v_zero,
        lengths, positions,
        cos, sin, hsign, o, lse,
        scaling * LOG2E * norm, cap, NIT=nit, NGRP=ngrp, HG=hg, GQ=gq, D=d, BITS=bits, NQ=nq, G=group_size,
        PRE_ROPE=pre_rope, QN=max(16, 1 << max(0, (hg * gq - 1).bit_length())), BN=bn, NS=ns, GATHER=gather,
        EXACT=exact, num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return o, lse
