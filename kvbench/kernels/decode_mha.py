"""Decode attention over per-token packed K/V for one query per KV head (MHA), on CUDA cores.

(`decode_per_token_mha` runs `decode_mha_cuda`'s two hand-laid passes on the tensor cores instead
where they fit: 2-bit codes of 128 channels, 0.088 against this kernel's 0.127 ms at B8 x 8192 on
the H100; `impl="triton"` keeps this one. What follows describes this Triton kernel.)

With one query row per KV head a `tl.dot` tile is 1/16 used, and feeding it means unpacking every
code to fp16 and moving it through shared memory into the tensor-core operand layout. This kernel
does the arithmetic where the codes already are, in registers: about four instructions a code
(three at the least; docs/kernel-notes.md has the counts and the measurements):

* **unpack without shifts or int->float conversion**: a code at bit `pos` of a 32-bit word,
  masked in place and OR-ed into the mantissa of 2**23, reads as the fp32 value 2**23 + c * 2**pos
  (exact while pos + bits <= 23), so one logic op (`(w & mask) | 0x4B000000`, a LOP3) and one
  subtraction give c * 2**pos. The 2**-pos goes into the query (exact: a power of two), and the
  upper half-word is shifted down once per word.
* **scales and zero points off the per-code path**: scores are sum_g s_g (q_g . c_g - z_g sum q_g)
  per token and group; values use (p * s) . c - sum p s z, so a code costs one FMA.
* **lazy softmax rescaling** (conditional rescaling, as in recent FlashAttention kernels): the running maxima are only raised when a
  tile exceeds them by more than 2**8, so the value accumulators are rarely rescaled; the result
  is the same softmax, the exponentials just stay below 2**8. The softmax state is kept per row
  slot of the tile (no cross-thread reductions in the loop) and merged once at the end.
* **value reduction deferred**: per-token products accumulate in a [BN, codes] register tile and
  are summed over tokens once, after the loop.
* **the next tile's loads in flight** during this tile's arithmetic (register double-buffering):
  without it the kernel waited on memory (0.21 ms against 0.13 ms).

The packed layout is `kvbench.packed_cache`'s plane layout: row bytes [P = D*bits/8]; byte j holds
channels j, P + j, 2P + j, ... in its bit planes. Read as int32 words, word w, byte b, plane p is
channel p*P + 4w + b at bit 8b + bits*p. Same contract as `decode_attention.decode_per_token`
(partials o [B, Hq, S, D] fp32 and lse [B, Hq, S]); it needs one query head per KV head, P a
multiple of 4 bytes and groups of whole planes (G % P == 0), which `supports` checks.
"""

from __future__ import annotations

import torch

try:  # torchao-style guard: importable without triton
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None
    tl = None

LOG2E = 1.4426950408889634


def supports(gq: int, head_dim: int, bits: int, group_size: int) -> bool:
    p = head_dim * bits // 8
    ng = head_dim // group_size if group_size else 0
    return (gq == 1 and bits in (2, 4, 8) and p % 4 == 0 and group_size % p == 0
            and head_dim % group_size == 0 and ng & (ng - 1) == 0)


if triton is not None:

    @triton.jit
    def _codes(words, mask, ASM: tl.constexpr):
        """codes * 2**pos as exact fp32: words [BN, 1, 1, W] int32 (upper half-word already shifted
        down), mask [1, NG, KG, 1] = code mask << pos -> [BN, NG, KG, W]. One LOP3 ((w & m) | magic:
        ptxas splits the two immediates into two ops unless the asm says it) and one FADD."""
        if ASM:
            x = tl.inline_asm_elementwise("lop3.b32 $0, $1, $2, 0x4B000000, 0xEA;", "=r,r,r",
                                          [words, mask], dtype=tl.int32, is_pure=True, pack=1)
        else:  # the interpreter runs no PTX
            x = (words & mask) | 0x4B000000
        return x.to(tl.float32, bitcast=True) - 8388608.0

    @triton.jit
    def _load_rows(w_ptr, s_ptr, z_ptr, b, h, base, t0, end, s_b, s_h, s_t, w4, g2, BN: tl.constexpr,
                   W: tl.constexpr):
        """Words [BN, 1, 1, W] and fp32 scales/zeros [BN, NG] of rows (tokens) t0 .. t0+BN-1."""
        tok = t0 + tl.arange(0, BN)
        tmask = tok < end
        words = tl.load(w_ptr + (base + tok)[:, None, None, None] * W + w4, mask=tmask[:, None, None, None], other=0)
        off = (b.to(tl.int64) * s_b + h * s_h + tok.to(tl.int64) * s_t)[:, None] + g2
        scale = tl.load(s_ptr + off, mask=tmask[:, None], other=0.0).to(tl.float32)
        zero = tl.load(z_ptr + off, mask=tmask[:, None], other=0.0).to(tl.float32)
        return words, scale, zero

    @triton.jit
    def _load_tile(kw_ptr, vw_ptr, ks_ptr, kz_ptr, vs_ptr, vz_ptr, b, h, base, t0, end, ks_b, ks_h, ks_t,
                   vs_b, vs_h, vs_t, w4, g2, BN: tl.constexpr, W: tl.constexpr):
        """Words [BN, 1, 1, W] of K and V and fp32 scales/zeros [BN, NG] of tokens t0 .. t0+BN-1."""
        kw, ksc, kzp = _load_rows(kw_ptr, ks_ptr, kz_ptr, b, h, base, t0, end, ks_b, ks_h, ks_t, w4, g2, BN, W)
        vw, vsc, vzp = _load_rows(vw_ptr, vs_ptr, vz_ptr, b, h, base, t0, end, vs_b, vs_h, vs_t, w4, g2, BN, W)
        return kw, vw, ksc, kzp, vsc, vzp

    @triton.jit
    def _store_slots(o_ptr, lse_ptr, row, split, m_i, l_i, acc_lo, acc_hi, corr, inv_pos, chan_lo, chan_hi,
                     NS: tl.constexpr, D: tl.constexpr):
        """A split's output row and log-sum-exp from per-row-slot softmax state: the slots are
        merged with weights 2**(m_slot - m), exactly as splits are merged."""
        m = tl.max(m_i, 0)
        wgt = tl.exp2(m_i - m)
        l_sum = tl.sum(l_i * wgt, 0)
        has = l_sum > 0
        inv = tl.where(has, 1.0 / tl.where(has, l_sum, 1.0), 0.0)
        w4s = wgt[:, None, None, None]
        corr4 = tl.sum(corr * wgt[:, None], 0)[None, :, None, None]
        orow = (row.to(tl.int64) * NS + split) * D
        tl.store(o_ptr + orow + chan_lo, (tl.sum(acc_lo * w4s, 0)[None] * inv_pos - corr4) * inv)
        tl.store(o_ptr + orow + chan_hi, (tl.sum(acc_hi * w4s, 0)[None] * inv_pos - corr4) * inv)
        lse = tl.where(has, (m + tl.log2(tl.where(has, l_sum, 1.0))) / 1.4426950408889634, float("-inf"))
        tl.store(lse_ptr + row * NS + split, lse)

    @triton.jit
    def _split_range(len_ptr, NROWS: tl.constexpr, NIT: tl.constexpr, BN: tl.constexpr):
        """Program (row r of batch row b, split) and its token range [start, end): grid
        (B * NROWS, splits), NIT tiles of BN tokens a split."""
        pid = tl.program_id(0)
        split = tl.program_id(1)
        b = pid // NROWS
        r = pid % NROWS
        length = tl.load(len_ptr + b).to(tl.int32)
        start = split * (NIT * BN)
        end = tl.minimum(start + NIT * BN, length)
        return b, r, split, start, end

    @triton.jit
    def _word_tiles(D: tl.constexpr, BITS: tl.constexpr, G: tl.constexpr):
        """Index tiles of a row's plane-layout words as 4-D [tokens, group, code in group, word]
        (the words come from a [BN, 1, 1, W] load, so a thread's codes of one word stay in that
        thread and the group reductions are in-thread FMA chains; only the word axis crosses
        threads). Code k = g * KG + kk of a half-word is plane k // 2 of its byte k % 2 (groups of
        whole planes, so the group is k // KG), at bit pos = 8 * (k % 2) + BITS * (k // 2).
        Returns the word index w4 [1, 1, 1, W], the code masks at their bits mask4 [1, NG, KG, 1],
        2**-pos, the lower half-word's channels chan_lo [1, NG, KG, W] (the upper's are + 2) and
        the group index g2 [1, NG]."""
        P: tl.constexpr = D * BITS // 8  # bytes per row
        W: tl.constexpr = P // 4  # int32 words per row
        NPL: tl.constexpr = 8 // BITS  # bit planes per byte
        K: tl.constexpr = 2 * NPL  # codes per half-word
        NG: tl.constexpr = D // G
        KG: tl.constexpr = K // NG  # codes of one group per half-word
        k4 = tl.arange(0, NG)[None, :, None, None] * KG + tl.arange(0, KG)[None, None, :, None]
        w4 = tl.arange(0, W)[None, None, None, :]
        pos4 = 8 * (k4 % 2) + BITS * (k4 // 2)
        mask4 = ((1 << BITS) - 1) << pos4
        inv_pos = tl.exp2(-pos4.to(tl.float32))
        chan_lo = (k4 // 2) * P + 4 * w4 + (k4 % 2)
        g2 = tl.arange(0, NG)[None, :]
        return w4, mask4, inv_pos, chan_lo, g2

    @triton.jit
    def _slot_state(BN: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr, G: tl.constexpr):
        """Zeroed softmax state per row slot of a tile (the slot's tokens are it, it + BN, ...):
        reference maxima m (-1e30, not -inf: no inf - inf anywhere), sums l, value sums in the
        word-tile shape [BN, NG, KG, W] (lower and upper half-words) and the zero-point terms
        corr [BN, NG]."""
        NG: tl.constexpr = D // G
        KG: tl.constexpr = 16 // BITS // NG
        W: tl.constexpr = D * BITS // 32
        return (tl.full([BN], -1e30, tl.float32), tl.zeros([BN], tl.float32), tl.zeros([BN, NG, KG, W], tl.float32),
                tl.zeros([BN, NG, KG, W], tl.float32), tl.zeros([BN, NG], tl.float32))

    @triton.jit
    def _rescale(s, m, l_i, acc_lo, acc_hi, corr):
        """Raise the row slots' reference maxima m to cover the tile's scores s (lazy rescaling):
        the sums kept so far are scaled by 2**(m - m_new)."""
        m_new = tl.maximum(m, s)
        alpha = tl.exp2(m - m_new)
        a4 = alpha[:, None, None, None]
        return m_new, l_i * alpha, acc_lo * a4, acc_hi * a4, corr * alpha[:, None]

    @triton.jit
    def _accumulate(p, l_i, acc_lo, acc_hi, corr, vw, vsc, vzp, mask4, INT_ZERO: tl.constexpr, ASM: tl.constexpr):
        """One tile's probabilities p [BN] (one token a row slot) into the value sums: the scale on
        the probabilities, the codes unpacked in place (one FMA a code), the zero points into
        corr (sum of p * s * z for an integer zero, -sum of p * z for a float zero)."""
        l_i += p
        ps = p[:, None] * vsc  # [BN, NG]
        if INT_ZERO:
            corr += ps * vzp
        else:
            corr -= p[:, None] * vzp
        ps4 = ps[:, :, None, None]
        acc_lo += _codes(vw, mask4, ASM) * ps4
        acc_hi += _codes(vw >> 16, mask4, ASM) * ps4
        return l_i, acc_lo, acc_hi, corr

    @triton.jit
    def _value_pass(scr_ptr, m, vw_ptr, vs_ptr, vz_ptr, b, h, row, tstart, tend, cap, vs_b, vs_h, vs_t, o_ptr,
                    lse_ptr, split, NIT: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr, G: tl.constexpr,
                    INT_ZERO: tl.constexpr, BN: tl.constexpr, NS: tl.constexpr, ASM: tl.constexpr):
        """A split's partial (o, lse) over tokens [tstart, tend) of row (b, h) from scores already
        computed: log2-domain scores at scr_ptr + row * cap + token, m their exact maximum over
        the split (so nothing is ever rescaled). Values are this kernel's word tiles, read as in
        its main loop (NIT tiles of BN tokens, the next tile's loads in flight)."""
        W: tl.constexpr = D * BITS // 32
        w4, mask4, inv_pos, chan_lo, g2 = _word_tiles(D, BITS, G)
        base = row.to(tl.int64) * cap
        _, l_i, acc_lo, acc_hi, corr = _slot_state(BN, D, BITS, G)  # no reference maxima: m is exact
        vw, vsc, vzp = _load_rows(vw_ptr, vs_ptr, vz_ptr, b, h, base, tstart, tend, vs_b, vs_h, vs_t, w4, g2, BN, W)
        for it in range(NIT):
            nxt = _load_rows(vw_ptr, vs_ptr, vz_ptr, b, h, base, tstart + (it + 1) * BN, tend, vs_b, vs_h, vs_t,
                             w4, g2, BN, W)
            tok = tstart + it * BN + tl.arange(0, BN)
            s = tl.load(scr_ptr + base + tok, mask=tok < tend, other=float("-inf"))
            pr = tl.exp2(s - m)  # 0 for tokens past the end
            l_i, acc_lo, acc_hi, corr = _accumulate(pr, l_i, acc_lo, acc_hi, corr, vw, vsc, vzp, mask4, INT_ZERO, ASM)
            vw, vsc, vzp = nxt

        l_sum = tl.sum(l_i, 0)
        has = l_sum > 0
        inv = tl.where(has, 1.0 / tl.where(has, l_sum, 1.0), 0.0)
        corr4 = tl.sum(corr, 0)[None, :, None, None]
        orow = (row.to(tl.int64) * NS + split) * D
        tl.store(o_ptr + orow + chan_lo, (tl.sum(acc_lo, 0)[None] * inv_pos - corr4) * inv)
        tl.store(o_ptr + orow + chan_lo + 2, (tl.sum(acc_hi, 0)[None] * inv_pos - corr4) * inv)
        lse = tl.where(has, (m + tl.log2(tl.where(has, l_sum, 1.0))) / 1.4426950408889634, float("-inf"))
        tl.store(lse_ptr + row * NS + split, lse)

    @triton.jit
    def _values_from_scores_kernel(scr_ptr, vw_ptr, vs_ptr, vz_ptr, len_ptr, o_ptr, lse_ptr, cap, vs_b, vs_h, vs_t,
                                   NIT: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr,
                                   G: tl.constexpr, INT_ZERO: tl.constexpr, BN: tl.constexpr, NS: tl.constexpr,
                                   ASM: tl.constexpr):
        """Second pass of a two-pass read (`values_from_scores`): a scan of the split's scores for
        their maximum, then `_value_pass`."""
        b, h, split, start, end = _split_range(len_ptr, HKV, NIT, BN)
        row = b * HKV + h
        base = row.to(tl.int64) * cap
        mv = tl.full([BN], -1e30, tl.float32)  # -1e30, not -inf: an empty split's exp2(-inf - m) is 0, not nan
        for it in range(NIT):
            tok = start + it * BN + tl.arange(0, BN)
            mv = tl.maximum(mv, tl.load(scr_ptr + base + tok, mask=tok < end, other=-1e30))
        _value_pass(scr_ptr, tl.max(mv, 0), vw_ptr, vs_ptr, vz_ptr, b, h, row, start, end, cap, vs_b, vs_h, vs_t,
                    o_ptr, lse_ptr, split, NIT, D, BITS, G, INT_ZERO, BN, NS, ASM)

    @triton.jit
    def _decode_per_token_mha_kernel(
        q_ptr, kw_ptr, ks_ptr, kz_ptr, vw_ptr, vs_ptr, vz_ptr, len_ptr, o_ptr, lse_ptr,
        sm_scale, cap, ks_b, ks_h, ks_t, vs_b, vs_h, vs_t,
        NIT: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr, G: tl.constexpr,
        INT_ZERO: tl.constexpr, BN: tl.constexpr, NS: tl.constexpr, TAU: tl.constexpr,
        ASM: tl.constexpr, PREFETCH: tl.constexpr,
    ):
        # Tiles are 4-D [tokens, group, code in group, word] (`_word_tiles`).
        W: tl.constexpr = D * BITS // 32  # int32 words per row
        b, h, split, start, end = _split_range(len_ptr, HKV, NIT, BN)
        w4, mask4, inv_pos, chan_lo, g2 = _word_tiles(D, BITS, G)
        chan_hi = chan_lo + 2  # the upper half-word's bytes
        qrow = (b * HKV + h).to(tl.int64) * D
        q_lo = tl.load(q_ptr + qrow + chan_lo).to(tl.float32)
        q_hi = tl.load(q_ptr + qrow + chan_hi).to(tl.float32)
        qsum = tl.sum(tl.sum(q_lo + q_hi, 3), 2)  # [1, NG]: per-group sums for the zero points
        qs_lo = q_lo * inv_pos
        qs_hi = q_hi * inv_pos

        # Softmax state per row slot of the tile: no cross-thread reduction inside the loop but the
        # one that decides to rescale; the slots are merged once at the end (`_store_slots`).
        m_i, l_i, acc_lo, acc_hi, corr = _slot_state(BN, D, BITS, G)
        base = (b * HKV + h).to(tl.int64) * cap
        # Register double-buffering: the next tile's loads are issued before this tile's math, so
        # a tile's memory latency hides behind the previous tile's arithmetic (Triton's pipeliner
        # only stages loads that feed tl.dot).
        tmask = (start + tl.arange(0, BN)) < end
        kw, vw, ksc, kzp, vsc, vzp = _load_tile(kw_ptr, vw_ptr, ks_ptr, kz_ptr, vs_ptr, vz_ptr, b, h, base, start,
                                                end, ks_b, ks_h, ks_t, vs_b, vs_h, vs_t, w4, g2, BN, W)
        for it in range(NIT):
            if PREFETCH:
                nxt = _load_tile(kw_ptr, vw_ptr, ks_ptr, kz_ptr, vs_ptr, vz_ptr, b, h, base, start + (it + 1) * BN,
                                 end, ks_b, ks_h, ks_t, vs_b, vs_h, vs_t, w4, g2, BN, W)
            else:
                nxt = _load_tile(kw_ptr, vw_ptr, ks_ptr, kz_ptr, vs_ptr, vz_ptr, b, h, base, start + it * BN,
                                 end, ks_b, ks_h, ks_t, vs_b, vs_h, vs_t, w4, g2, BN, W)
                kw, vw, ksc, kzp, vsc, vzp = nxt
            tmask = (start + it * BN + tl.arange(0, BN)) < end
            # (two sums, not one of lo + hi: each is then one FMA chain)
            dg = tl.sum(tl.sum(_codes(kw, mask4, ASM) * qs_lo, 2) + tl.sum(_codes(kw >> 16, mask4, ASM) * qs_hi, 2),
                        2)  # [BN, NG]
            if INT_ZERO:
                s = tl.sum(ksc * (dg - kzp * qsum), 1)
            else:
                s = tl.sum(ksc * dg + kzp * qsum, 1)
            s = tl.where(tmask, s * sm_scale, float("-inf"))
            if tl.max(s - m_i, 0) > TAU:  # raise the slots' reference maxima (rare after the first tiles)
                m_i, l_i, acc_lo, acc_hi, corr = _rescale(s, m_i, l_i, acc_lo, acc_hi, corr)
            pr = tl.exp2(s - m_i)  # [BN]; 0 for masked tokens, at most 2**TAU
            l_i, acc_lo, acc_hi, corr = _accumulate(pr, l_i, acc_lo, acc_hi, corr, vw, vsc, vzp, mask4, INT_ZERO, ASM)
            if PREFETCH:
                kw, vw, ksc, kzp, vsc, vzp = nxt

        _store_slots(o_ptr, lse_ptr, b * HKV + h, split, m_i, l_i, acc_lo, acc_hi, corr, inv_pos, chan_lo, chan_hi,
                     NS, D)


def decode_per_token_mha(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, lengths, scaling, *,
                         bits, group_size, integer_zero=True, max_len=None, num_splits=None, block_n=64,
                         num_warps=4, num_stages=2, splits_per_sm=2, k_scale_heads_last=False, prefetch=True,
                         impl=None, hadamard=False):
    """Partials (o [B, Hq, S, D] fp32, lse [B, Hq, S]) of q [B, Hq, D] (Hq == Hkv) over per-token
    packed K/V; same contract and layouts as `decode_attention.decode_per_token`.
    `k_scale_heads_last`: key scales/zeros are [B, 1, cap, Hkv] (one group a head, RotateKV's
    layout without reordering) instead of [B, Hkv, cap, D/G].
    `impl`: "triton" (this module's one-pass kernel, the launch settings above), "cuda" (two
    hand-laid passes on the tensor cores, `decode_mha_cuda`; 2-bit, groups of 32, 64 or 128) or None:
    "cuda" where it fits and NVRTC works. `hadamard`: K and V were stored rotated by the head_dim-point
    Hadamard (quarot): q is rotated before the read and the partial outputs after it (inside the
    CUDA kernels; by torch around the Triton one)."""
    from kvbench.kernels import decode_mha_cuda
    from kvbench.kernels.decode_attention import _out, _require_triton, interpreting, split_plan

    _require_triton()
    b, hq, d = q.shape
    hkv, cap = k_codes.shape[1], k_codes.shape[2]
    if not supports(hq // hkv, d, bits, group_size) or hq != hkv:
        raise ValueError(f"decode_per_token_mha: unsupported shape (heads {hq}/{hkv}, D {d}, bits {bits}, "
                         f"group {group_size})")
    if k_scale_heads_last and (group_size != d or k_scale.shape[-1] != hkv):
        raise ValueError("k_scale_heads_last needs one group a head (group_size == head_dim)")
    if decode_mha_cuda.use_cuda(impl, q, k_scale, v_scale, bits, group_size, integer_zero, "decode_per_token_mha"):
        return decode_mha_cuda.decode_per_token_mha_cuda(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero,
                                                         lengths, scaling, group_size=group_size, max_len=max_len,
                                                         num_splits=num_splits, k_scale_heads_last=k_scale_heads_last,
                                                         hadamard=hadamard)
    if hadamard:
        from kvbench.kernels.decode_attention import hadamard_read

        return hadamard_read(q, lambda qr: decode_per_token_mha(
            qr, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, lengths, scaling, bits=bits, group_size=group_size,
            integer_zero=integer_zero, max_len=max_len, num_splits=num_splits, block_n=block_n, num_warps=num_warps,
            num_stages=num_stages, splits_per_sm=splits_per_sm, k_scale_heads_last=k_scale_heads_last,
            prefetch=prefetch, impl="triton"))
    max_len = cap if max_len is None else max_len
    ns, nit = split_plan(max_len, block_n, b * hkv, q.device, per_sm=splits_per_sm, num_splits=num_splits)
    o, lse = _out(q, ns)
    if k_scale_heads_last:
        k_strides = (k_scale.stride(0), k_scale.stride(3), k_scale.stride(2))
    else:
        k_strides = (k_scale.stride(0), k_scale.stride(1), k_scale.stride(2))
    v_strides = (v_scale.stride(0), v_scale.stride(1), v_scale.stride(2))
    _decode_per_token_mha_kernel[(b * hkv, ns)](
        q.contiguous(), k_codes.view(torch.int32), k_scale, k_zero, v_codes.view(torch.int32), v_scale, v_zero,
        lengths, o, lse, scaling * LOG2E, cap, *k_strides, *v_strides, NIT=nit, HKV=hkv, D=d, BITS=bits, G=group_size, INT_ZERO=integer_zero, BN=block_n, NS=ns, TAU=8.0,
        ASM=not interpreting(), PREFETCH=prefetch, num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return o, lse


def values_from_scores(scores, v_codes, v_scale, v_zero, lengths, *, bits, group_size, integer_zero=True,
                       max_len=None, num_splits=None, block_n=64, num_warps=4, splits_per_sm=4):
    """The values pass of a two-pass decode read: partials (o [B, H, S, D] fp32, lse [B, H, S]) of
    softmax(scores) @ V for per-token packed values in this module's layout, where scores
    [B, H, cap] fp32 are in the log2 domain (scaled by softmax scale * log2 e) and valid below
    each row's length. The key pass that wrote them can then use its own tiling and registers."""
    from kvbench.kernels.decode_attention import _require_triton, interpreting, split_plan

    _require_triton()
    b, h, cap = scores.shape
    d = v_codes.shape[-1] * 8 // bits
    if not supports(1, d, bits, group_size):
        raise ValueError(f"values_from_scores: unsupported values (D {d}, bits {bits}, group {group_size})")
    max_len = cap if max_len is None else max_len
    ns, nit = split_plan(max_len, block_n, b * h, scores.device, per_sm=splits_per_sm, num_splits=num_splits)
    o = torch.empty(b, h, ns, d, dtype=torch.float32, device=scores.device)
    lse = torch.empty(b, h, ns, dtype=torch.float32, device=scores.device)
    _values_from_scores_kernel[(b * h, ns)](
        scores, v_codes.view(torch.int32), v_scale, v_zero, lengths, o, lse, cap, v_scale.stride(0),
        v_scale.stride(1), v_scale.stride(2), NIT=nit, HKV=h, D=d, BITS=bits, G=group_size, INT_ZERO=integer_zero,
        BN=block_n, NS=ns, ASM=not interpreting(), num_warps=num_warps,
    )  # fmt: skip
    return o, lse
