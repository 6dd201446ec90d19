"""Fused decode attention over packed KV caches (Triton), split over the context.

One query token per row (decode). Each kernel reads packed codes and fp16 scales/zeros, unpacks
and dequantizes in registers, and runs an online softmax over its slice of the context
(flash-decoding: grid = (batch x KV head [group], splits)); it writes per-split partial outputs
and log-sum-exps, which `merge.merge_partials_fused` (one launch; reference `merge_partials`)
combines exactly, together with the partials of the full-precision tokens (sinks, KIVI's window)
from `fp_partial.fp_partial_fused`. GQA: the query
heads of one KV head are the rows (M) of every `tl.dot` (padded to 16), so a K/V tile is read once.

Layouts are those of `kvbench.packed_cache` (plane layout of `kvbench.packing` for 2/4/8 bits):

* `decode_per_token` (rtn and quarot, keys after RoPE): k/v codes [B, Hkv, cap, D*bits/8],
  scale/zero [B, Hkv, cap, D/G]. A row's plane p (channels p*P .. p*P+P-1, P = D*bits/8) is
  (byte >> p*bits) & mask of the row's P bytes, so the kernel loads the P bytes once and does one
  `tl.dot` per plane against the matching slice of q: no interleave shuffles. quarot stores H.k
  and H.v: the caller rotates q by H (q.k = (Hq).(Hk)) and the output back by H (o = H sum p Hv),
  so no per-key transform runs in the loop.
* `decode_kivi`: keys channel-major per group of G tokens [B, Hkv, groups, D, G*bits/8] with
  per-(group, channel) scale and minimum, values per token. Plane p of a group's bytes holds its
  tokens p*G/planes ..; the kernel treats the tokens of one plane of GT groups as a sub-tile.
* `decode_rotatekv`: keys are rows of head_group*D codes in rotated (unpermuted) order, one row
  per head group and token, with the token's C/G scales/zeros [B, 1, cap, C/G] and the map
  channel -> quantization group (`gid`, the calibrated permutation folded in: nothing is
  permuted at read time, each element's scale is a gathered load). H_{hg*D} = H_hg (x) H_D
  (Sylvester). Pre-RoPE keys: per tile, one tensor-core product X @ H_D (the two halves of H_D
  as two dots, which hands RoPE its rotate-half pairs for free), RoPE from the cache's cos/sin
  table at each key's position, then the head mix H_hg is moved after the score: since it
  commutes with RoPE (same rotation for every head of a token), score_h = sum_h' H_hg[h, h']
  q_h . RoPE(H_D x_h'), computed as one dot of all the group's query heads against the
  un-mixed rows of all its heads, then a signed sum over h' (1/8 op per key element). Post-RoPE
  keys (`pre_rope=False`): the caller passes q @ H_D, and the key path is dequantize + dot.

`triton` is imported behind a guard: this module imports without it (CPU CI); the kernels raise a
clear RuntimeError when called without triton. Tests run them under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import functools
import math

import torch

from kvbench.kernels.fp_partial import fp_partial_fused
from kvbench.kernels.merge import merge_partials_fused

try:  # torchao-style guard
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on machines without triton
    triton = None
    tl = None

LOG2E = 1.4426950408889634


def is_available() -> bool:
    return triton is not None


def _require_triton() -> None:
    if triton is None:
        raise RuntimeError("kvbench.kernels.decode_attention needs triton (pip install triton) and a CUDA GPU, "
                           "or TRITON_INTERPRET=1 for CPU tensors")


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


if triton is not None:
    from kvbench.kernels.decode_mha import _split_range

    @triton.jit
    def _query_planes(q_ptr, qrow, rmask, j, P: tl.constexpr, NPL: tl.constexpr):
        """The query rows' channels as the cache's bit planes: q0 = channels [0, P), q1 = [P, 2P),
        ... (planes past NPL repeat q0), in q's dtype."""
        q0 = tl.load(q_ptr + qrow[:, None] + j[None, :], mask=rmask[:, None], other=0.0)
        q1 = q0
        q2 = q0
        q3 = q0
        if NPL > 1:
            q1 = tl.load(q_ptr + qrow[:, None] + P + j[None, :], mask=rmask[:, None], other=0.0)
        if NPL > 2:
            q2 = tl.load(q_ptr + qrow[:, None] + 2 * P + j[None, :], mask=rmask[:, None], other=0.0)
            q3 = tl.load(q_ptr + qrow[:, None] + 3 * P + j[None, :], mask=rmask[:, None], other=0.0)
        return q0, q1, q2, q3

    @triton.jit
    def _softmax_step(s, m_i, l_i, o0, o1, o2, o3):
        """One online-softmax step over log2-scaled scores s [BM, N] (-inf where masked): the
        tile's probabilities, the new running max and sum, and the accumulators rescaled."""
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # an all-masked row stays at 0
        alpha = tl.exp2(m_i - m_use)
        pr = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(pr, 1)
        a = alpha[:, None]
        return pr, m_new, l_i, o0 * a, o1 * a, o2 * a, o3 * a

    @triton.jit
    def _store_partials(o_ptr, lse_ptr, qrows, rmask, split, m_i, l_i, o0, o1, o2, o3, j,
                        NS: tl.constexpr, D: tl.constexpr, P: tl.constexpr, NPL: tl.constexpr):
        """A split's normalized outputs (planes o0..o3 of P channels) and natural-log LSE for query
        rows `qrows` (global b * Hq + head); empty rows get o = 0 and lse = -inf."""
        has = l_i > 0
        inv = tl.where(has, 1.0 / tl.where(has, l_i, 1.0), 0.0)
        orow = (qrows.to(tl.int64) * NS + split) * D
        omask = rmask[:, None]
        tl.store(o_ptr + orow[:, None] + j[None, :], o0 * inv[:, None], mask=omask)
        if NPL > 1:
            tl.store(o_ptr + orow[:, None] + P + j[None, :], o1 * inv[:, None], mask=omask)
        if NPL > 2:
            tl.store(o_ptr + orow[:, None] + 2 * P + j[None, :], o2 * inv[:, None], mask=omask)
            tl.store(o_ptr + orow[:, None] + 3 * P + j[None, :], o3 * inv[:, None], mask=omask)
        lse = tl.where(has, (m_i + tl.log2(tl.where(has, l_i, 1.0))) / 1.4426950408889634, float("-inf"))
        tl.store(lse_ptr + qrows * NS + split, lse, mask=rmask)

    @triton.jit
    def _plane(raw, p: tl.constexpr, BITS: tl.constexpr):
        """Codes of plane p from int32 bytes."""
        return ((raw >> (p * BITS)) & ((1 << BITS) - 1)).to(tl.float32)

    @triton.jit
    def _deq_rows(raw, rows, s_ptr, z_ptr, p: tl.constexpr, BITS: tl.constexpr, P: tl.constexpr,
                  G: tl.constexpr, NG: tl.constexpr, INT_ZERO: tl.constexpr, rmask):
        """Dequantized plane p [N, P] of per-token rows (row-major groups of G channels)."""
        c = _plane(raw, p, BITS)
        if (G % P) == 0:  # the plane sits inside one group: one scale per row
            off = rows * NG + (p * P) // G
            s = tl.load(s_ptr + off, mask=rmask, other=0.0).to(tl.float32)[:, None]
            z = tl.load(z_ptr + off, mask=rmask, other=0.0).to(tl.float32)[:, None]
        else:
            j = tl.arange(0, P)
            off = rows[:, None] * NG + (p * P + j[None, :]) // G
            s = tl.load(s_ptr + off, mask=rmask[:, None], other=0.0).to(tl.float32)
            z = tl.load(z_ptr + off, mask=rmask[:, None], other=0.0).to(tl.float32)
        if INT_ZERO:
            return (c - z) * s
        return c * s + z

    @triton.jit
    def _codes16(raw, p: tl.constexpr, BITS: tl.constexpr):
        """Plane p of int32 bytes as exact fp16 values, without an int->float instruction:
        (code | 0x6400) read as fp16 is 1024 + code."""
        if p == 0:
            x = raw & ((1 << BITS) - 1)
        else:
            x = (raw >> (p * BITS)) & ((1 << BITS) - 1)
        return ((x | 0x6400).to(tl.int16).to(tl.float16, bitcast=True) - 1024.0).to(tl.float16)

    @triton.jit
    def _codes16_off(raw, p: tl.constexpr, BITS: tl.constexpr):
        """Plane p as fp16 1024 + code (one logic op per element; the caller folds the 1024)."""
        if p == 0:
            x = raw & ((1 << BITS) - 1)
        else:
            x = (raw >> (p * BITS)) & ((1 << BITS) - 1)
        return (x | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)

    @triton.jit
    def _pv_add(pr, vraw, rows, tmask, vs_ptr, vz_ptr, o0, o1, o2, o3, BITS: tl.constexpr, P: tl.constexpr,
                G: tl.constexpr, NG: tl.constexpr, INT_ZERO: tl.constexpr, FOLD: tl.constexpr = False,
                EXACT: tl.constexpr = False):
        """o_p += P.V_p for per-token values with the scale moved onto the probabilities:
        sum_n p_n s_n (c_n - z_n) = (p*s).c - sum_n (p*s)_n z_n (int zero), or
        (p*s).c + sum_n p_n z_n (float zero). One scale load per row and group, codes stay codes."""
        NPL: tl.constexpr = 8 // BITS
        PPG: tl.constexpr = max(G // P, 1)
        for p in tl.static_range(NPL):
            if G % P != 0 and EXACT:  # groups narrower than a plane: dequantize per element
                contrib = tl.dot(pr, _deq_rows(vraw, rows, vs_ptr, vz_ptr, p, BITS, P, G, NG, INT_ZERO, tmask),
                                 input_precision="ieee")
            elif G % P != 0:
                contrib = tl.dot(pr.to(tl.float16),
                                 _deq_rows(vraw, rows, vs_ptr, vz_ptr, p, BITS, P, G, NG, INT_ZERO, tmask).to(tl.float16))
            elif p % PPG == 0:
                off = rows * NG + p // PPG
                sc = tl.load(vs_ptr + off, mask=tmask, other=0.0).to(tl.float32)
                z = tl.load(vz_ptr + off, mask=tmask, other=0.0).to(tl.float32)
                ps = (pr * sc[None, :]).to(tl.float16)
                if INT_ZERO:
                    if FOLD:  # codes come as 1024 + c
                        corr = -tl.sum(ps.to(tl.float32) * (z[None, :] + 1024.0), 1)
                    elif EXACT:
                        corr = -tl.sum(pr * sc[None, :] * z[None, :], 1)
                    else:
                        corr = -tl.sum(ps.to(tl.float32) * z[None, :], 1)
                else:
                    corr = tl.sum(pr * z[None, :], 1)
                    if FOLD:
                        corr -= 1024.0 * tl.sum(ps.to(tl.float32), 1)
            if G % P == 0:
                if EXACT:  # float32 probabilities and codes, IEEE float32 products
                    contrib = tl.dot((pr * sc[None, :]), _codes16(vraw, p, BITS).to(tl.float32),
                                     input_precision="ieee") + corr[:, None]
                elif FOLD:
                    contrib = tl.dot(ps, _codes16_off(vraw, p, BITS)) + corr[:, None]
                else:
                    contrib = tl.dot(ps, _codes16(vraw, p, BITS)) + corr[:, None]
            if p == 0:
                o0 += contrib
            elif p == 1:
                o1 += contrib
            elif p == 2:
                o2 += contrib
            else:
                o3 += contrib
        return o0, o1, o2, o3

    @triton.jit
    def _decode_per_token_fast_kernel(
        q_ptr, kc_ptr, ks_ptr, kz_ptr, vc_ptr, vs_ptr, vz_ptr, len_ptr, o_ptr, lse_ptr,
        sm_scale, cap,
        NIT: tl.constexpr, HKV: tl.constexpr, GQ: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr,
        G: tl.constexpr, INT_ZERO: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, NS: tl.constexpr,
        FOLD: tl.constexpr,
    ):
        # FOLD: codes enter the dots as fp16 1024 + c and the 1024 is folded into the zero-point
        # corrections (one fp16 op per element less; fp32 accumulation keeps the error ~1e-4).
        # Per-token K/V with G a multiple of the plane width P: codes go to the tensor cores as
        # they are (fp16 1024 + c minus 1024), scales and zeros are applied to the [M, N] scores
        # (K) and probabilities (V) once per group, not per element. Fixed trip count, masked
        # tail (no branch in the loop: the loads pipeline).
        P: tl.constexpr = D * BITS // 8
        NPL: tl.constexpr = 8 // BITS
        NG: tl.constexpr = D // G
        PPG: tl.constexpr = G // P
        HQ: tl.constexpr = HKV * GQ
        b, h, split, start, end = _split_range(len_ptr, HKV, NIT, BN)

        r = tl.arange(0, BM)
        rmask = r < GQ
        j = tl.arange(0, P)
        qrow = (b * HQ + h * GQ + r).to(tl.int64) * D
        q0, q1, q2, q3 = _query_planes(q_ptr, qrow, rmask, j, P, NPL)
        q0 = q0.to(tl.float16)
        q1 = q1.to(tl.float16)
        q2 = q2.to(tl.float16)
        q3 = q3.to(tl.float16)
        qs0 = tl.sum(q0.to(tl.float32), 1)
        qs1 = tl.sum(q1.to(tl.float32), 1)
        qs2 = tl.sum(q2.to(tl.float32), 1)
        qs3 = tl.sum(q3.to(tl.float32), 1)

        m_i = tl.full([BM], float("-inf"), tl.float32)
        l_i = tl.zeros([BM], tl.float32)
        o0 = tl.zeros([BM, P], tl.float32)
        o1 = tl.zeros([BM, P], tl.float32)
        o2 = tl.zeros([BM, P], tl.float32)
        o3 = tl.zeros([BM, P], tl.float32)
        base = (b * HKV + h).to(tl.int64) * cap
        for it in range(NIT):
            tok = start + it * BN + tl.arange(0, BN)
            tmask = tok < end
            rows = base + tok
            # K loaded transposed [P, BN] (the dot's B operand as is), V as [BN, P].
            kraw = tl.load(kc_ptr + rows[None, :] * P + j[:, None], mask=tmask[None, :], other=0).to(tl.int32)
            vraw = tl.load(vc_ptr + rows[:, None] * P + j[None, :], mask=tmask[:, None], other=0).to(tl.int32)
            acc = tl.zeros([BM, BN], tl.float32)
            for p in tl.static_range(NPL):
                if p == 0:
                    qp, qs = q0, qs0
                elif p == 1:
                    qp, qs = q1, qs1
                elif p == 2:
                    qp, qs = q2, qs2
                else:
                    qp, qs = q3, qs3
                if FOLD:
                    d = tl.dot(qp, _codes16_off(kraw, p, BITS))
                else:
                    d = tl.dot(qp, _codes16(kraw, p, BITS))
                if p % PPG == 0:
                    dsum = d
                    qsum = qs
                else:
                    dsum += d
                    qsum += qs
                if p % PPG == PPG - 1:
                    off = rows * NG + p // PPG
                    sc = tl.load(ks_ptr + off, mask=tmask, other=0.0).to(tl.float32)
                    z = tl.load(kz_ptr + off, mask=tmask, other=0.0).to(tl.float32)
                    if FOLD:
                        if INT_ZERO:
                            acc += (dsum - (z[None, :] + 1024.0) * qsum[:, None]) * sc[None, :]
                        else:
                            acc += dsum * sc[None, :] + (z - 1024.0 * sc)[None, :] * qsum[:, None]
                    elif INT_ZERO:
                        acc += (dsum - z[None, :] * qsum[:, None]) * sc[None, :]
                    else:
                        acc += dsum * sc[None, :] + z[None, :] * qsum[:, None]
            s = tl.where(tmask[None, :], acc * sm_scale, float("-inf"))
            pr, m_new, l_i, o0, o1, o2, o3 = _softmax_step(s, m_i, l_i, o0, o1, o2, o3)
            o0, o1, o2, o3 = _pv_add(pr, vraw, rows, tmask, vs_ptr, vz_ptr, o0, o1, o2, o3, BITS, P, G, NG, INT_ZERO,
                                     FOLD)
            m_i = m_new

        _store_partials(o_ptr, lse_ptr, b * HQ + h * GQ + r, rmask, split, m_i, l_i, o0, o1, o2, o3, j, NS, D, P, NPL)

    @triton.jit
    def _decode_per_token_kernel(
        q_ptr, kc_ptr, ks_ptr, kz_ptr, vc_ptr, vs_ptr, vz_ptr, len_ptr, o_ptr, lse_ptr,
        sm_scale, cap,
        NIT: tl.constexpr, HKV: tl.constexpr, GQ: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr, G: tl.constexpr,
        INT_ZERO: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, NS: tl.constexpr,
    ):
        P: tl.constexpr = D * BITS // 8
        NPL: tl.constexpr = 8 // BITS
        NG: tl.constexpr = D // G
        HQ: tl.constexpr = HKV * GQ
        b, h, split, start, end = _split_range(len_ptr, HKV, NIT, BN)

        r = tl.arange(0, BM)
        rmask = r < GQ
        j = tl.arange(0, P)
        qrow = (b * HQ + h * GQ + r).to(tl.int64) * D
        dt = q_ptr.dtype.element_ty
        q0, q1, q2, q3 = _query_planes(q_ptr, qrow, rmask, j, P, NPL)

        m_i = tl.full([BM], float("-inf"), tl.float32)
        l_i = tl.zeros([BM], tl.float32)
        o0 = tl.zeros([BM, P], tl.float32)
        o1 = tl.zeros([BM, P], tl.float32)
        o2 = tl.zeros([BM, P], tl.float32)
        o3 = tl.zeros([BM, P], tl.float32)
        base = (b * HKV + h).to(tl.int64) * cap
        for it in range(NIT):
            n0 = start + it * BN
            if n0 < end:
                tok = n0 + tl.arange(0, BN)
                tmask = tok < end
                rows = base + tok
                kraw = tl.load(kc_ptr + rows[:, None] * P + j[None, :], mask=tmask[:, None], other=0).to(tl.int32)
                x = _deq_rows(kraw, rows, ks_ptr, kz_ptr, 0, BITS, P, G, NG, INT_ZERO, tmask)
                s = tl.dot(q0, tl.trans(x.to(dt)))
                if NPL > 1:
                    x = _deq_rows(kraw, rows, ks_ptr, kz_ptr, 1, BITS, P, G, NG, INT_ZERO, tmask)
                    s += tl.dot(q1, tl.trans(x.to(dt)))
                if NPL > 2:
                    x = _deq_rows(kraw, rows, ks_ptr, kz_ptr, 2, BITS, P, G, NG, INT_ZERO, tmask)
                    s += tl.dot(q2, tl.trans(x.to(dt)))
                    x = _deq_rows(kraw, rows, ks_ptr, kz_ptr, 3, BITS, P, G, NG, INT_ZERO, tmask)
                    s += tl.dot(q3, tl.trans(x.to(dt)))
                s = tl.where(tmask[None, :], s * sm_scale, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                alpha = tl.exp2(m_i - m_new)
                pr = tl.exp2(s - m_new[:, None])
                l_i = l_i * alpha + tl.sum(pr, 1)
                pd = pr.to(dt)
                vraw = tl.load(vc_ptr + rows[:, None] * P + j[None, :], mask=tmask[:, None], other=0).to(tl.int32)
                o0 = o0 * alpha[:, None] + tl.dot(pd, _deq_rows(vraw, rows, vs_ptr, vz_ptr, 0, BITS, P, G, NG, INT_ZERO, tmask).to(dt))
                if NPL > 1:
                    o1 = o1 * alpha[:, None] + tl.dot(pd, _deq_rows(vraw, rows, vs_ptr, vz_ptr, 1, BITS, P, G, NG, INT_ZERO, tmask).to(dt))
                if NPL > 2:
                    o2 = o2 * alpha[:, None] + tl.dot(pd, _deq_rows(vraw, rows, vs_ptr, vz_ptr, 2, BITS, P, G, NG, INT_ZERO, tmask).to(dt))
                    o3 = o3 * alpha[:, None] + tl.dot(pd, _deq_rows(vraw, rows, vs_ptr, vz_ptr, 3, BITS, P, G, NG, INT_ZERO, tmask).to(dt))
                m_i = m_new

        _store_partials(o_ptr, lse_ptr, b * HQ + h * GQ + r, rmask, split, m_i, l_i, o0, o1, o2, o3, j, NS, D, P, NPL)

    @triton.jit
    def _decode_kivi_kernel(
        q_ptr, kc_ptr, ks_ptr, kz_ptr, vc_ptr, vs_ptr, vz_ptr, nq_ptr, o_ptr, lse_ptr,
        sm_scale, capg, capt, NIT: tl.constexpr,
        HKV: tl.constexpr, GQ: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr, G: tl.constexpr,
        GT: tl.constexpr, BM: tl.constexpr, NS: tl.constexpr,
    ):
        # Keys channel-major: the bytes of GT groups are one [D, GT*PT] tile (contiguous rows of
        # PT bytes); plane pl of it holds tokens pl*PT .. pl*PT+PT-1 of every group, processed as
        # one sub-tile. Key scale/min per (group, channel) are gathered as [D, NT] fp16 tiles
        # (L1 hits) and applied in fp16; values go through _pv_add (scale on the probabilities).
        P: tl.constexpr = D * BITS // 8  # value bytes per token
        NPL: tl.constexpr = 8 // BITS
        PT: tl.constexpr = G * BITS // 8  # key bytes per (group, channel) = tokens per plane
        NT: tl.constexpr = GT * PT
        NG: tl.constexpr = D // G
        HQ: tl.constexpr = HKV * GQ
        pid = tl.program_id(0)
        split = tl.program_id(1)
        b = pid // HKV
        h = pid % HKV
        ngroups = tl.load(nq_ptr + b).to(tl.int32) // G
        gstart = split * (NIT * GT)
        gend = tl.minimum(gstart + NIT * GT, ngroups)

        r = tl.arange(0, BM)
        rmask = r < GQ
        d = tl.arange(0, D)
        j = tl.arange(0, P)
        qrow = (b * HQ + h * GQ + r).to(tl.int64) * D
        q = tl.load(q_ptr + qrow[:, None] + d[None, :], mask=rmask[:, None], other=0.0).to(tl.float16)
        tt = tl.arange(0, NT)
        tg = tt // PT
        tj = tt % PT

        m_i = tl.full([BM], float("-inf"), tl.float32)
        l_i = tl.zeros([BM], tl.float32)
        o0 = tl.zeros([BM, P], tl.float32)
        o1 = tl.zeros([BM, P], tl.float32)
        o2 = tl.zeros([BM, P], tl.float32)
        o3 = tl.zeros([BM, P], tl.float32)
        gbase = (b * HKV + h).to(tl.int64) * capg
        tbase = (b * HKV + h).to(tl.int64) * capt
        for it in range(NIT):
            tgrp = gstart + it * GT + tg  # [NT] group of each column
            tmask = tgrp < gend
            goff = (gbase + tgrp) * D
            kraw = tl.load(kc_ptr + (goff[None, :] + d[:, None]) * PT + tj[None, :], mask=tmask[None, :],
                           other=0).to(tl.int32)  # [D, NT]
            sc = tl.load(ks_ptr + goff[None, :] + d[:, None], mask=tmask[None, :], other=0.0).to(tl.float16)
            zc = tl.load(kz_ptr + goff[None, :] + d[:, None], mask=tmask[None, :], other=0.0).to(tl.float16)
            for pl in tl.static_range(NPL):
                kt = _codes16(kraw, pl, BITS) * sc + zc
                s = tl.dot(q, kt)
                s = tl.where(tmask[None, :], s * sm_scale, float("-inf"))
                pr, m_new, l_i, o0, o1, o2, o3 = _softmax_step(s, m_i, l_i, o0, o1, o2, o3)
                rows = tbase + tgrp * G + pl * PT + tj
                vraw = tl.load(vc_ptr + rows[:, None] * P + j[None, :], mask=tmask[:, None], other=0).to(tl.int32)
                o0, o1, o2, o3 = _pv_add(pr, vraw, rows, tmask, vs_ptr, vz_ptr, o0, o1, o2, o3, BITS, P, G, NG, False)
                m_i = m_new

        _store_partials(o_ptr, lse_ptr, b * HQ + h * GQ + r, rmask, split, m_i, l_i, o0, o1, o2, o3, j, NS, D, P, NPL)

    @triton.jit
    def _parity_sign(a, bb):
        """(-1)^popcount(a & bb) for small ints: the Sylvester H entry."""
        x = a & bb
        x = x ^ (x >> 4)
        x = x ^ (x >> 2)
        x = x ^ (x >> 1)
        return 1.0 - 2.0 * (x & 1).to(tl.float32)

    @triton.jit
    def _decode_rotatekv_kernel(
        q_ptr, kc_ptr, ks_ptr, kz_ptr, gid_ptr, vc_ptr, vs_ptr, vz_ptr, len_ptr, pos_ptr,
        cos_ptr, sin_ptr, h_ptr, o_ptr, lse_ptr,
        sm_scale, cap,
        NIT: tl.constexpr, NGRP: tl.constexpr, HG: tl.constexpr, GQ: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr,
        NQ: tl.constexpr, G: tl.constexpr, PRE_ROPE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
        NS: tl.constexpr, GATHER: tl.constexpr, EXACT: tl.constexpr = False,
    ):
        # EXACT (q in float32): dequantize, rotate and apply RoPE in float32 with IEEE float32
        # products, the arithmetic of the simulated mode; slower, for checking the fp16 path.
        P: tl.constexpr = D * BITS // 8  # value bytes per token and head
        NPL: tl.constexpr = 8 // BITS
        PR: tl.constexpr = HG * D * BITS // 8  # key bytes per token and head group
        RR: tl.constexpr = HG * BN  # key rows of a tile: (head in group, token)
        D2: tl.constexpr = D // 2
        NGV: tl.constexpr = D // G
        HKV: tl.constexpr = NGRP * HG
        HQ: tl.constexpr = HKV * GQ
        b, grp, split, start, end = _split_range(len_ptr, NGRP, NIT, BN)

        r = tl.arange(0, BM)
        rmask = r < HG * GQ
        rhead = r // GQ  # KV head of row r inside the group
        qrow = (b * HQ + grp * HG * GQ + r).to(tl.int64) * D
        dt = q_ptr.dtype.element_ty
        d = tl.arange(0, D)
        d2 = tl.arange(0, D2)
        j = tl.arange(0, P)
        if PRE_ROPE:
            q_lo = tl.load(q_ptr + qrow[:, None] + d2[None, :], mask=rmask[:, None], other=0.0)
            q_hi = tl.load(q_ptr + qrow[:, None] + D2 + d2[None, :], mask=rmask[:, None], other=0.0)
            # Rows 0..D/2-1 and D/2..D-1 of the (symmetric) H_D sign matrix, [D/2, D]:
            # U^T = H^T X^T, split into the two RoPE halves.
            h_lo = tl.load(h_ptr + d2[:, None] * D + d[None, :])
            h_hi = tl.load(h_ptr + (D2 + d2[:, None]) * D + d[None, :])
        else:
            q = tl.load(q_ptr + qrow[:, None] + d[None, :], mask=rmask[:, None], other=0.0)
        hp = tl.arange(0, HG)
        sign = _parity_sign(rhead[:, None], hp[None, :])  # [BM, HG] = H_hg[h(row), h']

        xr = tl.arange(0, RR)
        xh = xr // BN  # head in group of key row
        xt = xr % BN  # token of key row
        chan = xh[None, :] * D + d[:, None]  # [D, RR] channel in the group's row (tiles are channel-major)
        byte = chan % PR
        shift = (chan // PR) * BITS
        gid_off = grp * HG * D + chan  # gid[gid_off]: quantization group of each channel (L1-resident)

        m_i = tl.full([BM], float("-inf"), tl.float32)
        l_i = tl.zeros([BM], tl.float32)
        o0 = tl.zeros([BM, P], tl.float32)
        o1 = tl.zeros([BM, P], tl.float32)
        o2 = tl.zeros([BM, P], tl.float32)
        o3 = tl.zeros([BM, P], tl.float32)
        kbase = (b * NGRP + grp).to(tl.int64) * cap
        sbase = b.to(tl.int64) * cap
        for it in range(NIT):
            n0 = start + it * BN
            tok = n0 + tl.arange(0, BN)
            tmask = tok < end
            xtok = n0 + xt
            xmask = xtok < end
            raw = tl.load(kc_ptr + (kbase + xtok)[None, :] * PR + byte, mask=xmask[None, :], other=0).to(tl.int32)
            c = ((((raw >> shift) & ((1 << BITS) - 1)) | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)
                 - 1024.0).to(tl.float16)
            if GATHER:  # calibrated permutation: each channel's group, gathered (L1 hits)
                gid = tl.load(gid_ptr + gid_off)
                soff = (sbase + xtok)[None, :] * NQ + gid
                sc = tl.load(ks_ptr + soff, mask=xmask[None, :], other=0.0).to(tl.float16)
                zc = tl.load(kz_ptr + soff, mask=xmask[None, :], other=0.0).to(tl.float16)
            else:  # no permutation and G == D: one group per (token, head), a [RR] load
                soff = (sbase + xtok) * NQ + grp * HG + xh
                sc = tl.load(ks_ptr + soff, mask=xmask, other=0.0).to(tl.float16)[None, :]
                zc = tl.load(kz_ptr + soff, mask=xmask, other=0.0).to(tl.float16)[None, :]
            if EXACT:
                x = (c.to(tl.float32) - zc.to(tl.float32)) * sc.to(tl.float32)
            else:
                x = ((c - zc) * sc).to(dt)  # [D, RR] rotated keys (transposed), un-mixed across heads
            if PRE_ROPE:
                if EXACT:
                    u_lo = tl.dot(h_lo, x, input_precision="ieee")
                    u_hi = tl.dot(h_hi, x, input_precision="ieee")
                else:
                    u_lo = tl.dot(h_lo, x)  # [D/2, RR]
                    u_hi = tl.dot(h_hi, x)
                p_ = tl.load(pos_ptr + sbase + xtok, mask=xmask, other=0)
                cs = tl.load(cos_ptr + p_[None, :].to(tl.int64) * D + d2[:, None], mask=xmask[None, :], other=0.0).to(tl.float32)
                sn = tl.load(sin_ptr + p_[None, :].to(tl.int64) * D + d2[:, None], mask=xmask[None, :], other=0.0).to(tl.float32)
                r_lo = (u_lo * cs - u_hi * sn).to(dt)
                r_hi = (u_hi * cs + u_lo * sn).to(dt)
                if EXACT:
                    sfull = tl.dot(q_lo, r_lo, input_precision="ieee") + tl.dot(q_hi, r_hi, input_precision="ieee")
                else:
                    sfull = tl.dot(q_lo, r_lo) + tl.dot(q_hi, r_hi)  # [BM, RR]
            elif EXACT:
                sfull = tl.dot(q, x, input_precision="ieee")
            else:
                sfull = tl.dot(q, x)
            if HG == 1:
                s = sfull
            else:
                s = tl.sum(tl.reshape(sfull, (BM, HG, BN)) * sign[:, :, None], 1)  # mix heads: [BM, BN]
            s = tl.where(tmask[None, :], s * sm_scale, float("-inf"))
            pr, m_new, l_i, o0, o1, o2, o3 = _softmax_step(s, m_i, l_i, o0, o1, o2, o3)
            for hh in tl.static_range(HG):
                if HG == 1:
                    pd = pr
                else:
                    pd = tl.where((rhead == hh)[:, None], pr, 0.0)
                rows = (b * HKV + grp * HG + hh).to(tl.int64) * cap + tok
                vraw = tl.load(vc_ptr + rows[:, None] * P + j[None, :], mask=tmask[:, None], other=0).to(tl.int32)
                o0, o1, o2, o3 = _pv_add(pd, vraw, rows, tmask, vs_ptr, vz_ptr, o0, o1, o2, o3, BITS, P, G, NGV, True,
                                         EXACT=EXACT)
            m_i = m_new

        _store_partials(o_ptr, lse_ptr, b * HQ + grp * HG * GQ + r, rmask, split, m_i, l_i, o0, o1, o2, o3, j,
                        NS, D, P, NPL)


# --------------------------------------------------------------------------------------------
# Launchers


@functools.lru_cache(maxsize=None)
def _sm_count(device: str) -> int:
    d = torch.device(device)
    if d.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_properties(d).multi_processor_count
    return 132


def default_splits(programs: int, max_len: int, block: int, device=None, per_sm: int = 2) -> int:
    """Splits so that about `per_sm` programs per SM run (flash-decoding), at least one tile each."""
    sms = _sm_count(str(device) if device is not None else "cpu")
    want = max(1, -(-per_sm * sms // max(programs, 1)))
    return max(1, min(want, -(-max_len // block), 64))


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1 (CPU tests), where kernels run no inline PTX."""
    import os

    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def split_plan(max_len: int, block: int, programs: int, device=None, per_sm: int = 2,
               num_splits: int | None = None) -> tuple[int, int]:
    """(splits, tiles per split) for `max_len` units (tokens, or KIVI groups) in tiles of `block`,
    for a grid of `programs` x splits (flash-decoding). The tile count is a compile-time constant
    of the kernels (a loop bound read from the device was not faster on the H100:
    results/gpu/experiments/).

    Eager calls take `default_splits` and round the tiles per split up to a power of two, so a
    context that grows step by step compiles a few kernels, not one per length. While a CUDA
    graph is being captured (its kernels are sized once, for the reserved capacity) the tiles
    are shared evenly instead (a power of two there masked up to half of the work: 8208 slots
    ran as 3 x 4096) over at most one wave of `per_sm` programs an SM: the grid's wave count is
    what the time follows (5 x 103 tiles ran 45% slower than 4 x 128 for RotateKV's kernel)."""
    tiles = -(-max(max_len, 1) // block)
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        sms = _sm_count(str(device) if device is not None else "cuda")
        ns = num_splits or max(1, min(per_sm * sms // max(programs, 1), tiles, 64))
        per = -(-tiles // ns)
    else:
        ns = num_splits or default_splits(programs, max_len, block, device, per_sm)
        per = _pow2(-(-tiles // ns))
    return -(-tiles // per), per


def _out(q: torch.Tensor, ns: int):
    b, hq, d = q.shape
    return (torch.empty(b, hq, ns, d, dtype=torch.float32, device=q.device),
            torch.empty(b, hq, ns, dtype=torch.float32, device=q.device))


def decode_per_token(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, lengths, scaling, *,
                     bits, group_size, integer_zero=True, max_len=None, num_splits=None, block_n=64,
                     num_warps=4, num_stages=2, fast=True, fold_offset=True, mha=None, hadamard=False):
    """Partial attention (o [B, Hq, S, D] fp32, lse [B, Hq, S]) of q [B, Hq, D] over per-token
    packed K/V (`decode_per_token` layout in the module docstring); slots [0, lengths[b]).
    One query head per KV head goes to `decode_mha` (its CUDA passes or Triton kernel; `mha=False`
    forces the tensor-core kernel here), which takes its own launch settings; grouped queries go to
    the same CUDA passes where they fit (`decode_mha_cuda`), else to the tensor-core kernel here.
    `hadamard`: K and V were stored rotated by the head_dim-point Hadamard (quarot): q is rotated
    before the read and the partials after it (in `decode_mha`'s CUDA kernels where they run)."""
    _require_triton()
    b, hq, d = q.shape
    hkv, cap = k_codes.shape[1], k_codes.shape[2]
    gq = hq // hkv
    from kvbench.kernels import decode_mha

    if mha or (mha is None and decode_mha.supports(gq, d, bits, group_size)):
        return decode_mha.decode_per_token_mha(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, lengths,
                                               scaling, bits=bits, group_size=group_size, integer_zero=integer_zero,
                                               max_len=max_len, num_splits=num_splits, hadamard=hadamard,
                                               **MHA_LAUNCH)
    from kvbench.kernels import decode_mha_cuda

    if mha is None and gq > 1 and decode_mha_cuda.use_cuda(None, q, k_scale, v_scale, bits, group_size, integer_zero,
                                                            "decode_per_token"):
        # grouped queries through the one-query-a-row CUDA passes, each query head its own row over its
        # KV head's bytes (read once from memory, again from L2): on a Llama-3-8B shape the tensor-core
        # kernel below made quarot-2's decode step slower than fp16's (seventeenth session)
        return decode_mha_cuda.decode_per_token_mha_cuda(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero,
                                                         lengths, scaling, group_size=group_size, max_len=max_len,
                                                         num_splits=num_splits, hadamard=hadamard)
    if hadamard:
        return hadamard_read(q, lambda qr: decode_per_token(
            qr, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, lengths, scaling, bits=bits, group_size=group_size,
            integer_zero=integer_zero, max_len=max_len, num_splits=num_splits, block_n=block_n, num_warps=num_warps,
            num_stages=num_stages, fast=fast, fold_offset=fold_offset, mha=False))
    max_len = cap if max_len is None else max_len
    ns, nit = split_plan(max_len, block_n, b * hkv, q.device, num_splits=num_splits)
    o, lse = _out(q, ns)
    p_width = d * bits // 8
    use_fast = fast and group_size % p_width == 0
    extra = dict(FOLD=fold_offset) if use_fast else {}
    kernel = _decode_per_token_fast_kernel if use_fast else _decode_per_token_kernel
    kernel[(b * hkv, ns)](
        q.contiguous(), k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, lengths, o, lse,
        scaling * LOG2E, cap, NIT=nit, HKV=hkv, GQ=gq, D=d, BITS=bits, G=group_size, INT_ZERO=integer_zero,
        BM=max(16, _pow2(gq)), BN=block_n, NS=ns, num_warps=num_warps, num_stages=num_stages, **extra,
    )  # fmt: skip
    return o, lse


# Launch settings of the MHA kernel: the fastest of those benchmarks/kernels_gpu.py measured on an
# H100 (batch 8 x 8192, 32 heads of 128, 2 bits; results/gpu/kernels-*.md).
MHA_LAUNCH = dict(block_n=64, num_warps=4, splits_per_sm=4)


# Launch settings of RotateKV's MHA read (decode_rotatekv_mha, two passes; these are its scores
# pass's, the values pass takes decode_rotatekv_mha.VALUE_LAUNCH): H100, batch 8 x 8192, 32 heads
# of 128, 2 bits, 4-head groups (results/gpu/nvidia-h100-80gb-hbm3/session6/); it picks its own
# stack_heads.
ROTATEKV_MHA_LAUNCH = dict(block_n=16, num_warps=4, splits_per_sm=4)


# Launch settings of KIVI's MHA kernel (decode_kivi_mha): H100, batch 8 x 8192, 32 heads of 128.
KIVI_MHA_LAUNCH = dict(block_n=64, num_warps=2, splits_per_sm=8)


def decode_kivi(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, nq, scaling, *, bits, group_size,
                max_len=None, num_splits=None, groups_per_tile=None, num_warps=4, num_stages=2, mha=None):
    """Partial attention over KIVI's quantized tokens [0, nq[b]) (nq multiple of group_size).
    One query head per KV head goes to `decode_kivi_mha` (CUDA cores; `mha=False` forces the
    tensor-core kernel here), which takes its own launch settings."""
    _require_triton()
    b, hq, d = q.shape
    hkv, capg = k_codes.shape[1], k_codes.shape[2]
    capt = v_codes.shape[2]
    gq = hq // hkv
    from kvbench.kernels import decode_kivi_mha

    if mha or (mha is None and decode_kivi_mha.supports(gq, d, bits, group_size)):
        return decode_kivi_mha.decode_kivi_mha(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, nq, scaling,
                                               bits=bits, group_size=group_size, max_len=max_len,
                                               num_splits=num_splits, **KIVI_MHA_LAUNCH)
    if mha is None and gq > 1 and decode_kivi_mha.cuda_passes_fit(q, k_scale, v_codes, v_scale, bits, group_size):
        # grouped queries through the CUDA passes, one row a query head over its KV head's bytes (the
        # tensor-core kernel below made kivi-2's step on a Llama-3-8B shape slower than fp16's)
        return decode_kivi_mha.decode_kivi_mha(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, nq, scaling,
                                               bits=bits, group_size=group_size, max_len=max_len,
                                               num_splits=num_splits, scores_impl="cuda", values_impl="cuda",
                                               **KIVI_MHA_LAUNCH)
    g = group_size
    pt = g * bits // 8
    # a tile of at least 16 tokens: its value product is a tl.dot with K = gt * pt, which triton
    # before 3.8 refuses below 16 (2-bit groups of 16 at 2 groups a tile failed to compile on 3.6)
    gt = max(groups_per_tile or max(1, 64 // pt), -(-16 // pt))
    total_groups = -(-(capt if max_len is None else max_len) // g)
    ns, nit = split_plan(total_groups, gt, b * hkv, q.device, num_splits=num_splits)
    o, lse = _out(q, ns)
    _decode_kivi_kernel[(b * hkv, ns)](
        q.contiguous(), k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, nq, o, lse,
        scaling * LOG2E, capg, capt, NIT=nit, HKV=hkv, GQ=gq, D=d, BITS=bits, G=g, GT=gt, BM=max(16, _pow2(gq)), NS=ns,
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return o, lse


def decode_rotatekv(q, k_codes, k_scale, k_zero, gid, v_codes, v_scale, v_zero, lengths, positions, cos, sin,
                    scaling, *, bits, group_size, head_group, pre_rope=True, max_len=None, num_splits=None,
                    block_n=None, num_warps=4, num_stages=2, exact=False):
    """Partial attention over RotateKV's packed tokens. q [B, Hq, D] after RoPE, unrotated (for
    pre_rope=False pass the query as is too: this function multiplies it by H_D). Returns
    partials whose outputs are still in the value-rotated space (apply H_D to undo).
    `exact`: float32 arithmetic throughout (q promoted; IEEE float32 tensor-core products), the
    simulated mode's arithmetic, for checking what the fp16 path's rounding costs (slower)."""
    _require_triton()
    b, hq, d = q.shape
    ngrp, cap = k_codes.shape[1], k_codes.shape[2]
    hkv = v_codes.shape[1]
    gq = hq // hkv
    hg = head_group
    nq = k_scale.shape[-1]
    bn = block_n or max(16, 64 // hg)
    max_len = cap if max_len is None else max_len
    ns, nit = split_plan(max_len, bn, b * ngrp, q.device, num_splits=num_splits)
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
    _decode_rotatekv_kernel[(b * ngrp, ns)](
        q.contiguous(), k_codes, k_scale, k_zero, gid, v_codes, v_scale, v_zero, lengths, positions,
        cos, sin, hsign, o, lse,
        scaling * LOG2E * norm, cap, NIT=nit, NGRP=ngrp, HG=hg, GQ=gq, D=d, BITS=bits, NQ=nq, G=group_size, PRE_ROPE=pre_rope,
        BM=max(16, _pow2(hg * gq)), BN=bn, NS=ns, GATHER=gather, EXACT=exact, num_warps=num_warps,
        num_stages=num_stages,
    )  # fmt: skip
    return o, lse


_SIGNS: dict = {}


def _sign_matrix_on(d, dtype, device):
    """The +-1 H_D in `dtype` on `device`, cached (no host-to-device copy at decode time). Rounded:
    sqrt(d) times the orthonormal matrix is 0.99999994, not 1, for some sizes (128, 512)."""
    key = (d, dtype, str(device))
    if key not in _SIGNS:
        from kvbench.hadamard import hadamard_matrix

        _SIGNS[key] = (hadamard_matrix(d, torch.float32, device) * math.sqrt(d)).round().to(dtype).contiguous()
    return _SIGNS[key]


def hadamard_read(q: torch.Tensor, read):
    """A read over K and V stored rotated by the head_dim-point Hadamard (quarot), done by torch
    around a kernel that does not rotate: `read(H q)` (fp32 product, rounded to q's dtype), then
    its partial outputs rotated back. The CUDA passes do both inside (`hadamard=True`)."""
    from kvbench.hadamard import hadamard_matrix

    o, lse = read((q.float() @ hadamard_matrix(q.shape[-1], torch.float32, q.device)).to(q.dtype))
    return rotate_partials(o), lse


def rotate_partials(o: torch.Tensor) -> torch.Tensor:
    """Undo a per-head Hadamard on partial outputs [..., D] (values stored as H v)."""
    from kvbench.hadamard import hadamard_matrix

    return o @ hadamard_matrix(o.shape[-1], torch.float32, o.device)


# --------------------------------------------------------------------------------------------
# Packed caches -> kernels


# RotateKV's read in float32 arithmetic (decode_rotatekv's `exact`): off by default (fp16 is the
# fast path); scripts/gpu_decode_ppl.py --exact-kernels turns it on to measure the rounding's cost.
ROTATEKV_EXACT = False


def packed_decode(cache, q: torch.Tensor, scaling: float) -> torch.Tensor:
    """Decode attention of q [B, Hq, 1, D] over a packed cache (kvbench.packed_cache) with the
    fused kernels; returns [B, Hq, 1, D] in q's dtype. Host-sync free for rtn/quarot/rotatekv
    (the split size comes from the host-side bound `cache.used`)."""
    from kvbench import packed_cache as pc
    from kvbench.kernels import decode_mha, decode_rotatekv_mha, side_stream

    q3 = q[:, :, 0]
    qk = q3.half() if q3.dtype == torch.float32 else q3
    parts = []
    # A captured CUDA graph keeps its grid: cover the whole reserved capacity then (masked).
    capturing = q.is_cuda and torch.cuda.is_current_stream_capturing()
    # The full-precision tokens' partial (KIVI's window, RotateKV's sinks: 6-18 us a layer at
    # B8, latency more than bytes) goes on a side stream, beside the packed read's passes.
    kivi = isinstance(cache, pc.KIVIPackedCache)
    fp = None if kivi else cache.fp.view()
    fp_part = side = None
    if kivi or fp is not None:
        side = side_stream.fork(q.device)
        with side_stream.on(side):
            if kivi:
                fp_part = fp_partial_fused(q3, cache.win_k, cache.win_v, None, scaling, ring=(cache.n, cache.nq))
            else:
                fp_part = fp_partial_fused(q3, fp[0], fp[1], cache.fp.valid(), scaling)
    if kivi:
        spec = cache.spec
        o, lse = decode_kivi(qk, cache.k_codes, cache.k_scale, cache.k_zero, cache.vstore.codes,
                             cache.vstore.scale, cache.vstore.zero, cache.nq, scaling,
                             bits=spec.bits, group_size=spec.group_size, max_len=cache.vstore.codes.shape[2])
        parts.append((o, lse))
    else:
        spec = cache.spec
        ks, vs = cache.kstore, cache.vstore
        if isinstance(cache, pc.RotateKVPackedCache):
            gid = cache._gid_on(q.device)
            if not cache.m.reorder and spec.group_size == cache.g.head_dim:
                gid = None  # groups are (token, head): no gathered scale loads
            rope = cache.rope
            cos = rope.cos if rope is not None else ks.scale  # unused without pre-RoPE
            sin = rope.sin if rope is not None else ks.scale
            if (not cache.m.pre_rope and cache.head_group == 1 and gid is None
                    and decode_mha.supports(q.shape[1] // vs.codes.shape[1], q.shape[-1], spec.bits, spec.group_size)):
                # post-RoPE keys, a Hadamard per head, no reordering: quarot's read path (H q . H k)
                parts.append(decode_mha.decode_per_token_mha(
                    qk, ks.codes, ks.scale, ks.zero, vs.codes, vs.scale, vs.zero, cache.lengths, scaling,
                    bits=spec.bits, group_size=spec.group_size, integer_zero=spec.integer_zero,
                    max_len=ks.codes.shape[2] if capturing else cache.used, k_scale_heads_last=True, hadamard=True,
                    **MHA_LAUNCH))
            elif not ROTATEKV_EXACT and decode_rotatekv_mha.supports(q.shape[1] // vs.codes.shape[1], q.shape[-1],
                                                                      spec.bits, spec.group_size, cache.head_group):
                # one query head per KV head and a byte holding the group's heads (4 at 2 bits)
                o, lse = decode_rotatekv_mha.decode_rotatekv_mha(
                    qk, ks.codes, ks.scale, ks.zero, gid, vs.codes, vs.scale, vs.zero, cache.lengths, cache.positions,
                    cos, sin, scaling, bits=spec.bits, group_size=spec.group_size, head_group=cache.head_group,
                    pre_rope=cache.m.pre_rope, max_len=ks.codes.shape[2] if capturing else cache.used,
                    rotate_out=True, **ROTATEKV_MHA_LAUNCH)
                parts.append((o, lse))
            else:
                o, lse = decode_rotatekv(q3.float() if ROTATEKV_EXACT else qk, ks.codes, ks.scale, ks.zero, gid, vs.codes, vs.scale, vs.zero,
                                         cache.lengths, cache.positions, cos, sin, scaling, bits=spec.bits,
                                         group_size=spec.group_size, head_group=cache.head_group,
                                         pre_rope=cache.m.pre_rope,
                                         max_len=ks.codes.shape[2] if capturing else cache.used,
                                         exact=ROTATEKV_EXACT)
                parts.append((rotate_partials(o), lse))
        else:
            parts.append(decode_per_token(qk, ks.codes, ks.scale, ks.zero, vs.codes, vs.scale, vs.zero, cache.lengths,
                                          scaling, bits=spec.bits, group_size=spec.group_size,
                                          integer_zero=spec.integer_zero,
                                          max_len=ks.codes.shape[2] if capturing else cache.used,
                                          hadamard=isinstance(cache, pc.QuaRotPackedCache)))
    if fp_part is not None:
        side_stream.join(side)
        parts.append(fp_part)
    return merge_partials_fused(parts, q.dtype)[:, :, None]
