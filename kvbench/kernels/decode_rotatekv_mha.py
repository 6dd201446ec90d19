"""RotateKV's decode read for one query head per KV head (MHA), keys decoded once per byte.

`decode_attention.decode_rotatekv` stacks the head group into the rows of tensor-core products
and loads every key byte once per head (its 26 instructions a code: docs/kernel-notes.md). Here
the layout is used the other way round. When head_group * bits == 8 (4 heads at 2 bits, the
Llama-2 default; 2 at 4 bits; 1 at 8 bits) byte j of a key row holds channel j of every head of
the group, one head a bit plane. So a tile is one [tokens, D] byte load, and each head's codes
are a shift and a mask of it:

* each channel half of the tile separately (fewer live registers): dequantize per head (the
  calibrated permutation: each element's scale and scale * zero are picked from the tile's fp32
  scale rows by `tl.gather`, a warp shuffle an element, no address arithmetic), then mix the heads
  with H_hg in-thread (adds: all heads of a (token, channel) sit in one thread);
* post-RoPE keys: the caller's query is H_D q, so a score is a CUDA-core dot of the mixed tile;
* pre-RoPE keys: H_D = [[H', H'], [H', -H']] with H' = H_{D/2}, so each head takes one
  [tokens, D/2] x [D/2, D/2] tensor-core product a half (`stack_heads`: the four heads as the
  rows of one [4 tokens, D/2] product, 7% faster with the permutation, slower without), the two
  combine by an add and a subtract into the rotate-half pairs, RoPE at each key's position
  (cos/sin rows loaded once a tile, shared by the heads), then the dot; the heads' score terms
  are reduced in one pass;
* values per head as `decode_mha` reads them (codes unpacked in place, the scale on the
  probabilities, per-token products summed after the loop);
* the next tile's key bytes, scale rows and cos/sin rows are loaded before this tile's arithmetic.

Two ways to run it. **Two passes** (the default): a scores pass writes the scores to a scratch row
(4 bytes a token, L2-resident), then a values pass reads the values per head with the exact
maximum: `values_cuda` (hand-laid CUDA on the tensor cores, 0.048 ms at B8 x 8192, ninth session)
where it applies, else `decode_mha.values_from_scores` (Triton, 0.08 ms). The scores pass is
`rotatekv_scores_cuda` (hand-laid CUDA, compiled by NVRTC) where it applies (4-head groups of 128
at 2 bits: pre-RoPE 0.197 ms against 0.43 at B8 x 8192, eighth session; post-RoPE since the
fifteenth), else
`_rotatekv_scores_kernel` (Triton). **Fused** (`two_pass=False`, the fifth session's kernel): one
online softmax per head with its state per row slot and lazy rescaling, the values read in the same
loop. The fused kernel holds four heads' value accumulators and softmax state beside the key tile
(255 registers, spills); each pass alone holds only its own.

Measured on an H100 (docs/kernel-notes.md, sixth and seventh sessions), batch 8 x 8192, Llama-2
default (pre-RoPE, permuted): 0.52 ms in two passes against 0.80 fused (first tensor-core kernel
0.95), 0.50 with the seventh session's leaner gathered key path; 0.34 / 0.22 ms with post-RoPE keys
(permuted / per-head groups).

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

from kvbench.kernels import decode_mha, rotatekv_scores_cuda, values_cuda
from kvbench.kernels.decode_mha import LOG2E


def supports(gq: int, head_dim: int, bits: int, value_group: int, head_group: int) -> bool:
    """One query head per KV head, a byte holding one channel of every head of the group, and
    values the MHA kernel can read."""
    return (gq == 1 and head_group * bits == 8 and head_group in (1, 2, 4) and head_dim & (head_dim - 1) == 0
            and head_dim >= 32 and decode_mha.supports(1, head_dim, bits, value_group))


if triton is not None:
    from kvbench.kernels.decode_mha import (_accumulate, _load_rows, _rescale, _slot_state, _split_range,
                                            _store_slots, _word_tiles)

    @triton.jit
    def _deq_head(kraw, hp: tl.constexpr, s_row, zs_row, gi, srow, ks_ptr, kz_ptr, tmask,
                  BITS: tl.constexpr, GATHER: tl.constexpr, F16: tl.constexpr, ASM: tl.constexpr):
        """Dequantized keys of head slot hp of the group from a byte tile [BN, DH] (int32): fp32,
        or fp16 with F16 ((c - z) * s, one rounding). GATHER: s_row / zs_row are the tile's rows
        [BN, NQ] of scales and -scale * zero (fp32; F16: scales and zeros, fp16), indexed by each
        channel's quantization group (gi [DH], this slot's channels' groups, loaded once before the
        loop: one warp shuffle an element); otherwise one group per (token, head), loaded here
        ([BN], gi the column of head slot 0).
        With GATHER in fp32 the code is read in place, as code * 2**(hp*BITS) (decode_mha's
        one-LOP3 unpack), and the power of two goes into the gathered scale row: exactly the same
        products, ~100 fewer instructions a tile-thread in the scores kernel. (Measured with the
        seventh session's other two changes: the two-pass read 2.6% faster, the fused one 12%;
        in the fifth session's fused kernel the in-place read alone had measured 6-12% slower.)"""
        if GATHER and not F16:
            c = decode_mha._codes(kraw, tl.full([1, 1], ((1 << BITS) - 1) << (hp * BITS), tl.int32), ASM)
            s_row = s_row * (1.0 / (1 << (hp * BITS)))  # exact: a power of two
        else:
            x = (kraw >> (hp * BITS)) & ((1 << BITS) - 1)
            if F16:  # (c - z) * s in fp16: c - z exact, one rounding (s_row, zs_row: the fp16 scales and zeros)
                c = (x | 0x6400).to(tl.int16).to(tl.float16, bitcast=True) - 1024.0  # exact: code < 2**10
            else:
                c = (x | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0  # exact: code < 2**23
        if GATHER:
            idx = tl.broadcast_to(gi[None, :], kraw.shape)
            if F16:
                y = (c - tl.gather(zs_row, idx, 1)) * tl.gather(s_row, idx, 1)
            else:
                y = c * tl.gather(s_row, idx, 1) + tl.gather(zs_row, idx, 1)  # zs_row holds -s * z
        else:
            off = srow + gi + hp
            s = tl.load(ks_ptr + off, mask=tmask, other=0.0)
            z = tl.load(kz_ptr + off, mask=tmask, other=0.0)
            if F16:
                y = (c - z[:, None]) * s[:, None]
            else:
                y = c * s[:, None].to(tl.float32) - (z.to(tl.float32) * s.to(tl.float32))[:, None]
        return y

    @triton.jit
    def _slot_groups(gid_ptr, goff, DH: tl.constexpr, HG: tl.constexpr, GATHER: tl.constexpr):
        """Per head slot of the group, what `_deq_head` takes as gi for one channel half: the
        channels' quantization groups (GATHER; [DH] int32 each, slot h' at goff + h' * D), loaded
        once before the loop (loaded in the loop they cost ~100 instructions a tile-thread on
        sm_90); otherwise the column offset goff for every slot. Slots past HG repeat slot 0."""
        if GATHER:
            g0 = tl.load(gid_ptr + goff)
            g1 = g0
            g2 = g0
            g3 = g0
            if HG >= 2:
                g1 = tl.load(gid_ptr + goff + 2 * DH)
            if HG >= 4:
                g2 = tl.load(gid_ptr + goff + 4 * DH)
                g3 = tl.load(gid_ptr + goff + 6 * DH)
        else:
            g0 = goff
            g1 = goff
            g2 = goff
            g3 = goff
        return g0, g1, g2, g3

    @triton.jit
    def _mixed(kraw, s_row, zs_row, g0, g1, g2, g3, srow, ks_ptr, kz_ptr, tmask, HG: tl.constexpr,
               BITS: tl.constexpr, GATHER: tl.constexpr, F16: tl.constexpr, ASM: tl.constexpr):
        """H_hg across the group's heads of one channel half, in-thread: y_h = sum_h' H[h, h'] x_h'
        (a butterfly). g0..g3: the slots' `_slot_groups`."""
        x0 = _deq_head(kraw, 0, s_row, zs_row, g0, srow, ks_ptr, kz_ptr, tmask, BITS, GATHER, F16, ASM)
        y0 = x0
        y1 = x0
        y2 = x0
        y3 = x0
        if HG == 2:
            x1 = _deq_head(kraw, 1, s_row, zs_row, g1, srow, ks_ptr, kz_ptr, tmask, BITS, GATHER, F16, ASM)
            y0 = x0 + x1
            y1 = x0 - x1
        if HG == 4:
            x1 = _deq_head(kraw, 1, s_row, zs_row, g1, srow, ks_ptr, kz_ptr, tmask, BITS, GATHER, F16, ASM)
            e0 = x0 + x1
            e1 = x0 - x1
            x2 = _deq_head(kraw, 2, s_row, zs_row, g2, srow, ks_ptr, kz_ptr, tmask, BITS, GATHER, F16, ASM)
            x3 = _deq_head(kraw, 3, s_row, zs_row, g3, srow, ks_ptr, kz_ptr, tmask, BITS, GATHER, F16, ASM)
            e2 = x2 + x3
            e3 = x2 - x3
            y0 = e0 + e2
            y1 = e1 + e3
            y2 = e0 - e2
            y3 = e1 - e3
        return y0, y1, y2, y3  # slots past HG are unused (and dead code)

    @triton.jit
    def _dot_rows(y, q):
        return tl.sum(y * q[None, :].to(tl.float32), 1)

    @triton.jit
    def _rope_terms(a, bb, cs, sn, qa, qb):
        """Score terms [BN, DH] of pre-RoPE keys from the halves' products a = y_lo H', bb = y_hi H'
        (H_D = [[H', H'], [H', -H']]): k = [a + bb, a - bb], RoPE at the keys' positions, times q
        (qa, qb: the query halves, broadcastable to the tile)."""
        u_lo = a + bb
        u_hi = a - bb
        r_lo = u_lo * cs - u_hi * sn
        r_hi = u_hi * cs + u_lo * sn
        return r_lo * qa.to(tl.float32) + r_hi * qb.to(tl.float32)

    @triton.jit
    def _row_sums(t0, t1, t2, t3, HG: tl.constexpr):
        """Row sums of the heads' score terms as one reduction (the rows are split over warps: one
        shared-memory round trip instead of one a head)."""
        if HG == 1:
            s0 = tl.sum(t0, 1)
            s1 = s0
            s2 = s0
            s3 = s0
        elif HG == 2:
            s0, s1 = tl.split(tl.sum(tl.join(t0, t1), 1))
            s2 = s0
            s3 = s0
        else:
            r = tl.sum(tl.join(tl.join(t0, t1), tl.join(t2, t3)), 1)  # [BN, 2 (t0|t1), 2 (first|second pair)]
            p01, p23 = tl.split(r)
            s0, s1 = tl.split(p01)
            s2, s3 = tl.split(p23)
        return s0, s1, s2, s3

    @triton.jit
    def _stack4(a, b, c, d):
        """Four [BN, X] tiles as the rows of one [4 BN, X] tile (row h * BN + t is tile h's row t)."""
        j = tl.join(tl.join(a, b), tl.join(c, d))  # [BN, X, 2 (a|b, c|d), 2 (first pair|second)]
        j = tl.permute(j, (3, 2, 0, 1))  # [pair, member, BN, X]: tile 2 * pair + member
        return tl.reshape(j, (4 * a.shape[0], a.shape[1]))

    @triton.jit
    def _unstack4(s, BN: tl.constexpr):
        """[4 BN] -> the four [BN] pieces (inverse of _stack4's row order)."""
        x = tl.permute(tl.reshape(s, (2, 2, BN)), (2, 1, 0))  # [BN, member, pair]
        p0, p1 = tl.split(x)
        s0, s1 = tl.split(p0)
        s2, s3 = tl.split(p1)
        return s0, s1, s2, s3

    @triton.jit
    def _load_keys(kc_ptr, ks_ptr, kz_ptr, pos_ptr, cos_ptr, sin_ptr, kbase, sbase, t0, end, dh, D: tl.constexpr,
                   NQ: tl.constexpr, NQP: tl.constexpr, BN: tl.constexpr, PRE_ROPE: tl.constexpr,
                   GATHER: tl.constexpr):
        """A tile's key bytes (two channel halves, raw), its scale rows (GATHER) and cos/sin rows."""
        DH: tl.constexpr = D // 2
        # Rows past the end read the range's last slot again (their scores are masked later): the
        # loads need no masks and no fill values.
        tok = tl.minimum(t0 + tl.arange(0, BN), tl.maximum(end - 1, 0))
        kp = kc_ptr + (kbase + tok)[:, None] * D + dh[None, :]
        k_lo = tl.load(kp)
        k_hi = tl.load(kp + DH)
        if GATHER:  # NQP: NQ padded to a power of two >= 8 (Triton 3.6 failed to compile narrower gathers)
            col = tl.arange(0, NQP)
            soff = (sbase + tok)[:, None] * NQ + col[None, :]
            s_row = tl.load(ks_ptr + soff, mask=(col < NQ)[None, :], other=0.0)
            z_row = tl.load(kz_ptr + soff, mask=(col < NQ)[None, :], other=0.0)
        else:
            s_row = 0.0
            z_row = 0.0
        if PRE_ROPE:  # (an empty range's slot 0 may be unfilled, position -1: read as position 0)
            p_ = tl.maximum(tl.load(pos_ptr + sbase + tok), 0).to(tl.int64) * D
            cs = tl.load(cos_ptr + p_[:, None] + dh[None, :])
            sn = tl.load(sin_ptr + p_[:, None] + dh[None, :])
        else:
            cs = 0.0
            sn = 0.0
        return k_lo, k_hi, s_row, z_row, cs, sn

    @triton.jit
    def _query_halves(q_ptr, h_ptr, b, grp, NGRP: tl.constexpr, HG: tl.constexpr, D: tl.constexpr,
                      BN: tl.constexpr, PRE_ROPE: tl.constexpr, STACK: tl.constexpr):
        """H_{D/2} (pre-RoPE) and the group's query halves: H_D q (post-RoPE) or q (pre-RoPE), fp16;
        heads past HG repeat head 0. STACK: the halves also as the rows of [4 BN, DH] fp32 tiles."""
        DH: tl.constexpr = D // 2
        dh = tl.arange(0, DH)
        if PRE_ROPE:  # H_{D/2} (+-1, fp16): H_D = [[H', H'], [H', -H']] takes it twice a head
            h_half = tl.load(h_ptr + dh[:, None] * DH + dh[None, :])
        else:
            h_half = 0
        qrow = (b * NGRP * HG + grp * HG).to(tl.int64) * D
        qa0 = tl.load(q_ptr + qrow + dh)
        qb0 = tl.load(q_ptr + qrow + DH + dh)
        qa1 = qa0
        qb1 = qb0
        qa2 = qa0
        qb2 = qb0
        qa3 = qa0
        qb3 = qb0
        if HG >= 2:
            qa1 = tl.load(q_ptr + qrow + D + dh)
            qb1 = tl.load(q_ptr + qrow + D + DH + dh)
        if HG >= 4:
            qa2 = tl.load(q_ptr + qrow + 2 * D + dh)
            qb2 = tl.load(q_ptr + qrow + 2 * D + DH + dh)
            qa3 = tl.load(q_ptr + qrow + 3 * D + dh)
            qb3 = tl.load(q_ptr + qrow + 3 * D + DH + dh)
        if STACK:  # the four heads' query halves as the rows of [4 BN, DH] tiles (STACK needs HG == 4)
            qa4 = _stack4(tl.broadcast_to(qa0[None, :], (BN, DH)), tl.broadcast_to(qa1[None, :], (BN, DH)),
                          tl.broadcast_to(qa2[None, :], (BN, DH)), tl.broadcast_to(qa3[None, :], (BN, DH))).to(tl.float32)
            qb4 = _stack4(tl.broadcast_to(qb0[None, :], (BN, DH)), tl.broadcast_to(qb1[None, :], (BN, DH)),
                          tl.broadcast_to(qb2[None, :], (BN, DH)), tl.broadcast_to(qb3[None, :], (BN, DH))).to(tl.float32)
        else:
            qa4 = 0
            qb4 = 0
        return h_half, qa0, qb0, qa1, qb1, qa2, qb2, qa3, qb3, qa4, qb4

    @triton.jit
    def _tile_scores(k_lo, k_hi, s_row, z_row, cs, sn, tmask, srow, glo, ghi, ks_ptr, kz_ptr,
                     h_half, qa0, qb0, qa1, qb1, qa2, qb2, qa3, qb3, qa4, qb4, sm_scale, DH: tl.constexpr,
                     HG: tl.constexpr, BITS: tl.constexpr, BN: tl.constexpr, PRE_ROPE: tl.constexpr,
                     GATHER: tl.constexpr, STACK: tl.constexpr, F16: tl.constexpr, ASM: tl.constexpr):
        """The group's heads' scores of one key tile, times sm_scale (log2 domain), -inf past the
        end; heads past HG repeat head 0."""
        if F16:
            s_f = s_row
            zs_f = z_row
        elif GATHER:
            s_f = s_row.to(tl.float32)
            zs_f = -(z_row.to(tl.float32) * s_f)  # negated once a row: the FMA then takes it as is
        else:
            s_f = 0.0
            zs_f = 0.0
        # low channel half, then high: the group's heads mixed in-thread
        y0, y1, y2, y3 = _mixed(k_lo.to(tl.int32), s_f, zs_f, glo[0], glo[1], glo[2], glo[3], srow, ks_ptr, kz_ptr,
                                tmask, HG, BITS, GATHER, F16, ASM)
        if PRE_ROPE and STACK:  # one [4 BN, DH] x [DH, DH] product for the four heads
            pst = tl.dot(_stack4(y0, y1, y2, y3).to(tl.float16), h_half)
        elif PRE_ROPE:
            p0 = tl.dot(y0.to(tl.float16), h_half)
            if HG >= 2:
                p1 = tl.dot(y1.to(tl.float16), h_half)
            if HG >= 4:
                p2 = tl.dot(y2.to(tl.float16), h_half)
                p3 = tl.dot(y3.to(tl.float16), h_half)
        else:
            s0 = _dot_rows(y0, qa0)
            s1 = s0
            s2 = s0
            s3 = s0
            if HG >= 2:
                s1 = _dot_rows(y1, qa1)
            if HG >= 4:
                s2 = _dot_rows(y2, qa2)
                s3 = _dot_rows(y3, qa3)
        y0, y1, y2, y3 = _mixed(k_hi.to(tl.int32), s_f, zs_f, ghi[0], ghi[1], ghi[2], ghi[3], srow, ks_ptr, kz_ptr,
                                tmask, HG, BITS, GATHER, F16, ASM)
        if PRE_ROPE and STACK:
            c4 = cs.to(tl.float32)
            s4 = sn.to(tl.float32)
            terms = _rope_terms(pst, tl.dot(_stack4(y0, y1, y2, y3).to(tl.float16), h_half), _stack4(c4, c4, c4, c4),
                                _stack4(s4, s4, s4, s4), qa4, qb4)
            s0, s1, s2, s3 = _unstack4(tl.sum(terms, 1), BN)
        elif PRE_ROPE:
            csf = cs.to(tl.float32)
            snf = sn.to(tl.float32)
            sc0 = _rope_terms(p0, tl.dot(y0.to(tl.float16), h_half), csf, snf, qa0[None, :], qb0[None, :])
            sc1 = sc0
            sc2 = sc0
            sc3 = sc0
            if HG >= 2:
                sc1 = _rope_terms(p1, tl.dot(y1.to(tl.float16), h_half), csf, snf, qa1[None, :], qb1[None, :])
            if HG >= 4:
                sc2 = _rope_terms(p2, tl.dot(y2.to(tl.float16), h_half), csf, snf, qa2[None, :], qb2[None, :])
                sc3 = _rope_terms(p3, tl.dot(y3.to(tl.float16), h_half), csf, snf, qa3[None, :], qb3[None, :])
            s0, s1, s2, s3 = _row_sums(sc0, sc1, sc2, sc3, HG)
        else:
            s0 += _dot_rows(y0, qb0)
            if HG >= 2:
                s1 += _dot_rows(y1, qb1)
            if HG >= 4:
                s2 += _dot_rows(y2, qb2)
                s3 += _dot_rows(y3, qb3)
        s0 = tl.where(tmask, s0 * sm_scale, float("-inf"))
        s1 = tl.where(tmask, s1 * sm_scale, float("-inf"))
        s2 = tl.where(tmask, s2 * sm_scale, float("-inf"))
        s3 = tl.where(tmask, s3 * sm_scale, float("-inf"))
        return s0, s1, s2, s3

    @triton.jit
    def _rotatekv_mha_kernel(
        q_ptr, kc_ptr, ks_ptr, kz_ptr, gid_ptr, vw_ptr, vs_ptr, vz_ptr, len_ptr, pos_ptr, cos_ptr, sin_ptr, h_ptr,
        o_ptr, lse_ptr, sm_scale, cap, vs_b, vs_h, vs_t,
        NIT: tl.constexpr, NGRP: tl.constexpr, HG: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr,
        NQ: tl.constexpr, NQP: tl.constexpr, G: tl.constexpr, PRE_ROPE: tl.constexpr, BN: tl.constexpr,
        NS: tl.constexpr, GATHER: tl.constexpr, TAU: tl.constexpr, ASM: tl.constexpr, STACK: tl.constexpr = False,
    ):
        HKV: tl.constexpr = NGRP * HG
        DH: tl.constexpr = D // 2
        # values: decode_mha's word tiles [BN, NG, KG, W]
        W: tl.constexpr = D * BITS // 32
        b, grp, split, start, end = _split_range(len_ptr, NGRP, NIT, BN)
        dh = tl.arange(0, DH)
        w4, mask4, inv_pos, chan_lo, g2 = _word_tiles(D, BITS, G)
        chan_hi = chan_lo + 2
        h_half, qa0, qb0, qa1, qb1, qa2, qb2, qa3, qb3, qa4, qb4 = _query_halves(q_ptr, h_ptr, b, grp, NGRP, HG, D, BN,
                                                                                 PRE_ROPE, STACK)
        h0 = grp * HG
        # gid offsets of the low half of head slot 0 (slot h' adds h' * D, the high half DH)
        # each channel half's quantization groups per head slot (or, without GATHER, the column)
        goff_lo = grp * HG * D + dh if GATHER else grp * HG
        glo = _slot_groups(gid_ptr, goff_lo, DH, HG, GATHER)
        ghi = _slot_groups(gid_ptr, goff_lo + DH if GATHER else goff_lo, DH, HG, GATHER)
        kbase = (b * NGRP + grp).to(tl.int64) * cap
        sbase = b.to(tl.int64) * cap
        vb = (b * HKV + h0).to(tl.int64) * cap

        # Softmax state per row slot of the tile (decode_mha's scheme), per head (slots past HG unused).
        m0, l0, a_lo0, a_hi0, c0 = _slot_state(BN, D, BITS, G)
        m1, l1, a_lo1, a_hi1, c1 = _slot_state(BN, D, BITS, G)
        m2, l2, a_lo2, a_hi2, c2 = _slot_state(BN, D, BITS, G)
        m3, l3, a_lo3, a_hi3, c3 = _slot_state(BN, D, BITS, G)

        # register double-buffering, as decode_mha: the next tile's loads are issued first
        k_lo, k_hi, s_row, z_row, cs, sn = _load_keys(kc_ptr, ks_ptr, kz_ptr, pos_ptr, cos_ptr, sin_ptr, kbase, sbase,
                                                      start, end, dh, D, NQ, NQP, BN, PRE_ROPE, GATHER)
        for it in range(NIT):
            t0 = start + it * BN
            tok = t0 + tl.arange(0, BN)
            tmask = tok < end
            nk = _load_keys(kc_ptr, ks_ptr, kz_ptr, pos_ptr, cos_ptr, sin_ptr, kbase, sbase, t0 + BN, end, dh,
                            D, NQ, NQP, BN, PRE_ROPE, GATHER)
            s0, s1, s2, s3 = _tile_scores(k_lo, k_hi, s_row, z_row, cs, sn, tmask, (sbase + tok) * NQ, glo, ghi,
                                          ks_ptr, kz_ptr, h_half, qa0, qb0, qa1, qb1, qa2, qb2, qa3,
                                          qb3, qa4, qb4, sm_scale, DH, HG, BITS, BN, PRE_ROPE, GATHER, STACK, False,
                                          ASM)
            gap = s0 - m0
            if HG >= 2:
                gap = tl.maximum(gap, s1 - m1)
            if HG >= 4:
                gap = tl.maximum(gap, tl.maximum(s2 - m2, s3 - m3))
            if tl.max(gap, 0) > TAU:  # raise the slots' reference maxima (rare after the first tiles)
                m0, l0, a_lo0, a_hi0, c0 = _rescale(s0, m0, l0, a_lo0, a_hi0, c0)
                if HG >= 2:
                    m1, l1, a_lo1, a_hi1, c1 = _rescale(s1, m1, l1, a_lo1, a_hi1, c1)
                if HG >= 4:
                    m2, l2, a_lo2, a_hi2, c2 = _rescale(s2, m2, l2, a_lo2, a_hi2, c2)
                    m3, l3, a_lo3, a_hi3, c3 = _rescale(s3, m3, l3, a_lo3, a_hi3, c3)

            vw, vsc, vzp = _load_rows(vw_ptr, vs_ptr, vz_ptr, b, h0, vb, t0, end, vs_b, vs_h, vs_t, w4, g2, BN, W)
            l0, a_lo0, a_hi0, c0 = _accumulate(tl.exp2(s0 - m0), l0, a_lo0, a_hi0, c0, vw, vsc, vzp,
                                              mask4, True, ASM)
            if HG >= 2:
                vw, vsc, vzp = _load_rows(vw_ptr, vs_ptr, vz_ptr, b, h0 + 1, vb + cap, t0, end, vs_b, vs_h, vs_t, w4,
                                          g2, BN, W)
                l1, a_lo1, a_hi1, c1 = _accumulate(tl.exp2(s1 - m1), l1, a_lo1, a_hi1, c1, vw, vsc, vzp,
                                                  mask4, True, ASM)
            if HG >= 4:
                vw, vsc, vzp = _load_rows(vw_ptr, vs_ptr, vz_ptr, b, h0 + 2, vb + 2 * cap, t0, end, vs_b, vs_h, vs_t,
                                          w4, g2, BN, W)
                l2, a_lo2, a_hi2, c2 = _accumulate(tl.exp2(s2 - m2), l2, a_lo2, a_hi2, c2, vw, vsc, vzp,
                                                  mask4, True, ASM)
                vw, vsc, vzp = _load_rows(vw_ptr, vs_ptr, vz_ptr, b, h0 + 3, vb + 3 * cap, t0, end, vs_b, vs_h, vs_t,
                                          w4, g2, BN, W)
                l3, a_lo3, a_hi3, c3 = _accumulate(tl.exp2(s3 - m3), l3, a_lo3, a_hi3, c3, vw, vsc, vzp,
                                                  mask4, True, ASM)
            k_lo, k_hi, s_row, z_row, cs, sn = nk

        row0 = b * HKV + h0
        _store_slots(o_ptr, lse_ptr, row0, split, m0, l0, a_lo0, a_hi0, c0, inv_pos, chan_lo, chan_hi, NS, D)
        if HG >= 2:
            _store_slots(o_ptr, lse_ptr, row0 + 1, split, m1, l1, a_lo1, a_hi1, c1, inv_pos, chan_lo, chan_hi, NS, D)
        if HG >= 4:
            _store_slots(o_ptr, lse_ptr, row0 + 2, split, m2, l2, a_lo2, a_hi2, c2, inv_pos, chan_lo, chan_hi, NS, D)
            _store_slots(o_ptr, lse_ptr, row0 + 3, split, m3, l3, a_lo3, a_hi3, c3, inv_pos, chan_lo, chan_hi, NS, D)


    @triton.jit
    def _rotatekv_scores_kernel(
        q_ptr, kc_ptr, ks_ptr, kz_ptr, gid_ptr, len_ptr, pos_ptr, cos_ptr, sin_ptr, h_ptr, scr_ptr, sm_scale, cap,
        NIT: tl.constexpr, NGRP: tl.constexpr, HG: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr,
        NQ: tl.constexpr, NQP: tl.constexpr, PRE_ROPE: tl.constexpr, BN: tl.constexpr, GATHER: tl.constexpr,
        STACK: tl.constexpr, F16: tl.constexpr, ASM: tl.constexpr,
    ):
        """Key pass of the two-pass read: the group's heads' log2-domain scores of tokens
        [split * NIT * BN, ...) into scr [B, H, cap] (no softmax state, no value registers)."""
        DH: tl.constexpr = D // 2
        b, grp, split, start, end = _split_range(len_ptr, NGRP, NIT, BN)
        dh = tl.arange(0, DH)
        h_half, qa0, qb0, qa1, qb1, qa2, qb2, qa3, qb3, qa4, qb4 = _query_halves(q_ptr, h_ptr, b, grp, NGRP, HG, D, BN,
                                                                                 PRE_ROPE, STACK)
        # each channel half's quantization groups per head slot (or, without GATHER, the column)
        goff_lo = grp * HG * D + dh if GATHER else grp * HG
        glo = _slot_groups(gid_ptr, goff_lo, DH, HG, GATHER)
        ghi = _slot_groups(gid_ptr, goff_lo + DH if GATHER else goff_lo, DH, HG, GATHER)
        kbase = (b * NGRP + grp).to(tl.int64) * cap
        sbase = b.to(tl.int64) * cap
        orow = (b * NGRP * HG + grp * HG).to(tl.int64) * cap  # scores of head slot 0; slot h' adds h' * cap
        k_lo, k_hi, s_row, z_row, cs, sn = _load_keys(kc_ptr, ks_ptr, kz_ptr, pos_ptr, cos_ptr, sin_ptr, kbase, sbase,
                                                      start, end, dh, D, NQ, NQP, BN, PRE_ROPE, GATHER)
        for it in range(NIT):
            tok = start + it * BN + tl.arange(0, BN)
            tmask = tok < end
            nk = _load_keys(kc_ptr, ks_ptr, kz_ptr, pos_ptr, cos_ptr, sin_ptr, kbase, sbase, start + (it + 1) * BN,
                            end, dh, D, NQ, NQP, BN, PRE_ROPE, GATHER)
            s0, s1, s2, s3 = _tile_scores(k_lo, k_hi, s_row, z_row, cs, sn, tmask, (sbase + tok) * NQ, glo, ghi,
                                          ks_ptr, kz_ptr, h_half, qa0, qb0, qa1, qb1, qa2, qb2, qa3,
                                          qb3, qa4, qb4, sm_scale, DH, HG, BITS, BN, PRE_ROPE, GATHER, STACK, F16,
                                          ASM)
            tl.store(scr_ptr + orow + tok, s0, mask=tmask)
            if HG >= 2:
                tl.store(scr_ptr + orow + cap + tok, s1, mask=tmask)
            if HG >= 4:
                tl.store(scr_ptr + orow + 2 * cap + tok, s2, mask=tmask)
                tl.store(scr_ptr + orow + 3 * cap + tok, s3, mask=tmask)
            k_lo, k_hi, s_row, z_row, cs, sn = nk


# The values pass of the two-pass read: decode_mha's launch settings for its values (H100).
VALUE_LAUNCH = dict(block_n=64, num_warps=4, splits_per_sm=8)  # 0.073 ms alone, against 0.085 at 4 an SM


def _values_pass(scores, v_codes, v_scale, v_zero, lengths, bits, group_size, max_len, num_splits, value_launch,
                 values_impl, rotate_out=False):
    """The second pass of the two-pass read: `values_cuda` (tensor cores, U tiles of loads in flight a
    warp) where it fits and NVRTC works, unless `values_impl="triton"` asks for
    `decode_mha.values_from_scores` (CUDA cores; `value_launch` is its launch settings).
    `rotate_out`: the partials rotated back by the per-head Hadamard (in `values_cuda`'s epilogue,
    else by `rotate_partials`)."""
    from kvbench.kernels import nvrtc
    from kvbench.kernels.decode_attention import interpreting, rotate_partials

    if values_impl not in (None, "triton", "cuda"):
        raise ValueError(f"decode_rotatekv_mha: values_impl must be 'triton', 'cuda' or None, not {values_impl!r}")
    d = v_codes.shape[-1] * 8 // bits
    cuda_ok = (values_cuda.supports(d, bits, group_size) and scores.is_cuda and not interpreting()
               and v_scale.dtype == torch.float16)
    if values_impl == "cuda" and not cuda_ok:
        raise ValueError("decode_rotatekv_mha: the CUDA values pass needs 2-bit values of 128 channels in groups "
                         "of 32, 64 or 128, fp16 scales and a CUDA device")
    if cuda_ok and values_impl != "triton" and (values_impl == "cuda" or nvrtc.available()):
        return values_cuda.values_from_scores(scores, v_codes, v_scale, v_zero, lengths, group_size=group_size,
                                              max_len=max_len, num_splits=num_splits, rotate_out=rotate_out)
    o, lse = decode_mha.values_from_scores(scores, v_codes, v_scale, v_zero, lengths, bits=bits, group_size=group_size,
                                           max_len=max_len, num_splits=num_splits, **(value_launch or VALUE_LAUNCH))
    return (rotate_partials(o) if rotate_out else o), lse


def decode_rotatekv_mha(q, k_codes, k_scale, k_zero, gid, v_codes, v_scale, v_zero, lengths, positions, cos, sin,
                        scaling, *, bits, group_size, head_group, pre_rope=True, max_len=None, num_splits=None,
                        block_n=16, num_warps=4, num_stages=2, splits_per_sm=2, stack_heads=None, two_pass=True,
                        value_launch=None, f16_dequant=None, maxnreg=None, scores_impl=None, values_impl=None,
                        rotate_out=False):
    """`decode_attention.decode_rotatekv`'s contract for shapes `supports` accepts: q [B, H, D]
    after RoPE and unrotated; partials whose outputs are in the value-rotated space. Queries and
    the pre-RoPE products' operands are fp16 whatever q's dtype (bf16 queries are converted).
    `two_pass` (default): scores first (`_rotatekv_scores_kernel`, this launch's settings) into a
    scratch row [B, H, cap] fp32, then the values (`decode_mha.values_from_scores`,
    `value_launch`'s settings) with the exact maximum: each pass holds only its own registers.
    On the H100 it is faster for every 2-bit, 4-head-group variant measured (Llama-2 default
    0.52 ms against the fused kernel's 0.80; docs/kernel-notes.md, sixth session); the 4- and
    8-bit shapes (2- and 1-head groups) take it too, checked but not timed. `stack_heads` (pre-RoPE, 4-head
    groups): one product for the group's heads a channel half; None picks what measured faster:
    stacked only for the fused kernel's permuted read (0.80 vs 0.86 ms; two passes 0.58 vs 0.53).
    `f16_dequant` (two passes, pre-RoPE): the keys dequantized and mixed in fp16 arithmetic,
    (c - z) * s with one rounding and the H_hg adds in fp16, as the product's operands are. None
    picks what measured faster: on without reordering (0.38 vs 0.43 ms), off with it (0.55 vs
    0.53: the gathered fp16 scales cost byte moves). `maxnreg` (two passes): a register cap for
    the scores kernel (more programs an SM, some spills; not faster for the default).
    `scores_impl` (two passes): "triton" (`_rotatekv_scores_kernel`) or "cuda" (the hand-laid
    `rotatekv_scores_cuda` kernel: 4-head groups of 128 at 2 bits, pre- or post-RoPE keys, compiled
    by NVRTC at first use); None takes "cuda" where it applies and compiles, else "triton". `values_impl`
    (two passes): "cuda" (`values_cuda`, tensor cores; 2-bit values of 128 channels in groups of
    32, 64 or 128) or "triton" (`decode_mha.values_from_scores`); None takes "cuda" where it applies
    and compiles. `rotate_out`: partials in the model's value space (the per-head Hadamard undone,
    in the CUDA values pass's epilogue where it runs)."""
    from kvbench.kernels.decode_attention import (_out, _pow2, _require_triton, _sign_matrix_on, interpreting,
                                                   rotate_partials, split_plan)

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
    if not two_pass and (f16_dequant or maxnreg):
        raise ValueError("decode_rotatekv_mha: f16_dequant and maxnreg apply to the two-pass read's scores kernel")
    if f16_dequant and not pre_rope:
        raise ValueError("decode_rotatekv_mha: f16_dequant needs pre-RoPE keys (it feeds the H_{D/2} products)")
    # The hand-laid CUDA scores pass: where its shape and dtypes fit and no Triton-only option is set.
    if scores_impl not in (None, "triton", "cuda"):
        raise ValueError(f"decode_rotatekv_mha: scores_impl must be 'triton', 'cuda' or None, not {scores_impl!r}")
    cuda_fits = (two_pass and not f16_dequant and not stack_heads and not maxnreg
                 and rotatekv_scores_cuda.supports(hq // hkv, d, bits, hg, nq, pre_rope)
                 and (cos.dtype == torch.float16 or not pre_rope) and k_scale.dtype == torch.float16
                 and q.is_cuda and not interpreting())
    if scores_impl == "cuda" and not cuda_fits:
        raise ValueError("decode_rotatekv_mha: the CUDA scores kernel needs two passes, 4-head groups of 128 "
                         "at 2 bits, key groups a multiple of 8 (at most 64), fp16 scales (and fp16 cos/sin "
                         "for pre-RoPE keys), a CUDA device, and none of f16_dequant / stack_heads / maxnreg")
    use_cuda_scores = cuda_fits and scores_impl != "triton" and (scores_impl == "cuda"
                                                                 or rotatekv_scores_cuda.available())
    if f16_dequant is None:  # (the Triton scores pass's choice; the CUDA pass has its own fp16 path)
        f16_dequant = two_pass and pre_rope and not gather and not use_cuda_scores
    if stack_heads is None:
        stack_heads = gather and pre_rope and hg == 4 and not two_pass
    if stack_heads and (hg != 4 or not pre_rope):
        raise ValueError("decode_rotatekv_mha: stack_heads needs pre-RoPE keys and a 4-head group")
    max_len = cap if max_len is None else max_len
    ns, nit = split_plan(max_len, block_n, b * ngrp, q.device, per_sm=splits_per_sm, num_splits=num_splits)
    sm_scale = scaling * LOG2E / math.sqrt(hg * d)
    if pre_rope:  # the kernel's H_{D/2}, +-1 in fp16
        hsign = _sign_matrix_on(d // 2, torch.float16, q.device)
    elif use_cuda_scores:  # post-RoPE keys: the CUDA key pass applies H_D to the queries itself
        hsign = None
    else:  # H_D q for each head (H_D symmetric): the key path is then dequantize + dot
        hsign = _sign_matrix_on(d, torch.float32, q.device)
        q = q.float() @ hsign
    q = q.to(torch.float16)
    if use_cuda_scores:
        scores = torch.empty(b, hkv, cap, dtype=torch.float32, device=q.device)
        # the CUDA kernel's programs take whole splits of 32-token steps (4 warps x 8 tokens)
        ns_c, nit_c = split_plan(max_len, 32, b * ngrp, q.device, per_sm=splits_per_sm, num_splits=num_splits)
        rotatekv_scores_cuda.rotatekv_scores(q.contiguous(), k_codes, k_scale, k_zero, gid, lengths, positions, cos,
                                             sin, sm_scale, scores, split_len=nit_c * 32, num_splits=ns_c,
                                             pre_rope=pre_rope)
        return _values_pass(scores, v_codes, v_scale, v_zero, lengths, bits, group_size, max_len, num_splits,
                            value_launch, values_impl, rotate_out)
    if two_pass:
        scores = torch.empty(b, hkv, cap, dtype=torch.float32, device=q.device)
        _rotatekv_scores_kernel[(b * ngrp, ns)](
            q.contiguous(), k_codes, k_scale, k_zero, gid if gather else k_scale, lengths, positions, cos, sin, hsign,
            scores, sm_scale, cap, NIT=nit, NGRP=ngrp, HG=hg, D=d, BITS=bits, NQ=nq, NQP=max(8, _pow2(nq)),
            PRE_ROPE=pre_rope, BN=block_n, GATHER=gather, STACK=stack_heads, F16=f16_dequant,
            ASM=not interpreting(),
            num_warps=num_warps, num_stages=num_stages, **({"maxnreg": maxnreg} if maxnreg else {}),
        )  # fmt: skip
        return _values_pass(scores, v_codes, v_scale, v_zero, lengths, bits, group_size, max_len, num_splits,
                            value_launch, values_impl, rotate_out)
    o, lse = _out(q, ns)
    v_strides = (v_scale.stride(0), v_scale.stride(1), v_scale.stride(2))
    _rotatekv_mha_kernel[(b * ngrp, ns)](
        q.contiguous(), k_codes, k_scale, k_zero, gid if gather else k_scale, v_codes.view(torch.int32), v_scale,
        v_zero, lengths, positions, cos, sin, hsign, o, lse, sm_scale, cap, *v_strides,
        NIT=nit, NGRP=ngrp, HG=hg, D=d, BITS=bits, NQ=nq, NQP=max(8, _pow2(nq)), G=group_size, PRE_ROPE=pre_rope, BN=block_n, NS=ns,
        GATHER=gather, TAU=8.0, ASM=not interpreting(), STACK=stack_heads, num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return (rotate_partials(o) if rotate_out else o), lse
