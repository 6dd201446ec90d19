"""Partial decode attention over a few full-precision tokens (RotateKV's sinks, KIVI's window), in
one Triton launch.

`reference.fp_partial` does it in about ten torch ops (two einsums, masking, log-sum-exp, ...),
which in a decode step cost ~0.1 ms a layer for 20-160 tokens: more than half of KIVI's packed
kernel. Here one program per (batch row, KV head, split of the tokens) reads its tokens' K and V
once, in chunks with an online softmax, for all of its query heads at once, in float32. With one
query head a KV head (MHA: KIVI's window and RotateKV's sinks on Llama-2) the weighted values stay
per token slot and are summed over the slots once at the end (`_fp_partial_one_row`): summing
them every chunk, as the general path's [GQ, BC, D] tiles do, cost cross-thread reductions that
made the kernel instruction-bound (KIVI's window at B8: 15.3 us, 7.8 us this way; docs/kernel-notes.md,
thirteenth session). The splits are partials of their own (merged with the packed read's by the
caller's log-sum-exp merge): one program walking KIVI's 128-token window chunk by chunk took 20 us
a layer on the H100, four chunks of load latency in a row. Contract of `reference.fp_partial` with S splits:
q [B, Hq, D], k, v [B, Hkv, S_tok, D], valid [B, S_tok] -> (o [B, Hq, S, D] fp32, lse [B, Hq, S]);
a split with no valid token gets o = 0, lse = -inf.
"""

from __future__ import annotations

import torch

from kvbench.kernels.reference import fp_partial

try:  # torchao-style guard: importable without triton
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None
    tl = None

MAX_TOKENS = 4096  # more than this: the torch reference
MAX_SPLITS = 8  # programs a (batch row, KV head) at most
PROGRAMS_PER_SM = 4  # split the tokens until the grid has about this many programs an SM


if triton is not None:

    @triton.jit
    def _fp_partial_kernel(
        q_ptr, k_ptr, v_ptr, valid_ptr, n_ptr, nq_ptr, o_ptr, lse_ptr, scaling, S,
        k_b, k_h, k_s, v_b, v_h, v_s, valid_b,
        HKV: tl.constexpr, GQ: tl.constexpr, GQP: tl.constexpr, D: tl.constexpr, BC: tl.constexpr,
        NC: tl.constexpr, NS: tl.constexpr, RING: tl.constexpr = False,
    ):
        # One program per (batch row, KV head, split); its GQ query heads are the rows of [GQP, ...]
        # tiles; the split's NC chunks of BC tokens go by with an online softmax (no S x D tile in
        # registers).
        pid = tl.program_id(0)
        split = tl.program_id(1)
        b = pid // HKV
        h = pid % HKV
        r = tl.arange(0, GQP)
        d = tl.arange(0, D)
        rows = (b * HKV + h) * GQ + r
        held = 0
        base = 0
        if RING:  # a ring of S slots holding positions nq[b] .. n[b] - 1 at slot position % S
            # (int32 and one scalar modulo: an int64 % per element, in the layout the loads
            # broadcast it to, made this kernel 3x slower at batch 117)
            nq_b = tl.load(nq_ptr + b)
            held = (tl.load(n_ptr + b) - nq_b).to(tl.int32)
            base = (nq_b % S).to(tl.int32)
        if GQP == 1:  # one query row (MHA)
            _fp_partial_one_row(q_ptr, k_ptr, v_ptr, valid_ptr, o_ptr, lse_ptr, scaling, S, k_b, k_h, k_s, v_b, v_h,
                                v_s, valid_b, b, h, split, rows, d, D, BC, NC, NS, RING, held, base)
        else:
            q = tl.load(q_ptr + rows[:, None] * D + d[None, :], mask=(r < GQ)[:, None], other=0.0).to(tl.float32)
            m = tl.full([GQP], float("-inf"), tl.float32)
            l_sum = tl.zeros([GQP], tl.float32)
            acc = tl.zeros([GQP, D], tl.float32)
            for c in range(NC):  # a loop, not unrolled: unrolled, the loads of all chunks spilled
                ok, k, v = _load_chunk(k_ptr, v_ptr, valid_ptr, S, k_b, k_h, k_s, v_b, v_h, v_s, valid_b, b, h,
                                       (split * NC + c) * BC, d, BC, RING, held, base)
                score = tl.sum(q[:, None, :] * k[None, :, :], 2) * scaling  # [GQP, BC]
                score = tl.where(ok[None, :], score, float("-inf"))
                m_new = tl.maximum(m, tl.max(score, 1))
                live = m_new > float("-inf")
                ref = tl.where(live, m_new, 0.0)
                alpha = tl.where(live, tl.exp(m - ref), 1.0)
                p = tl.where(ok[None, :], tl.exp(score - ref[:, None]), 0.0)
                l_sum = l_sum * alpha + tl.sum(p, 1)
                acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], 1)
                m = m_new
            has = l_sum > 0
            inv = tl.where(has, 1.0 / tl.where(has, l_sum, 1.0), 0.0)
            tl.store(o_ptr + (rows * NS + split)[:, None] * D + d[None, :], acc * inv[:, None], mask=(r < GQ)[:, None])
            tl.store(lse_ptr + rows * NS + split, tl.where(has, m + tl.log(tl.where(has, l_sum, 1.0)), float("-inf")), mask=r < GQ)

    @triton.jit
    def _load_chunk(k_ptr, v_ptr, valid_ptr, S, k_b, k_h, k_s, v_b, v_h, v_s, valid_b, b, h, first, d,
                    BC: tl.constexpr, RING: tl.constexpr, held, base):
        """The chunk of BC slots from `first`: (ok [BC], k, v [BC, D] float32), slots not holding a
        token masked (their loads skipped, zeros)."""
        s = first + tl.arange(0, BC)
        if RING:
            rel = s - base
            ok = (s < S) & (tl.where(rel < 0, rel + S, rel) < held)
        else:
            ok = (s < S) & (tl.load(valid_ptr + b * valid_b + s, mask=s < S, other=0) != 0)
        k = tl.load(k_ptr + b * k_b + h * k_h + s[:, None] * k_s + d[None, :], mask=ok[:, None], other=0.0)
        v = tl.load(v_ptr + b * v_b + h * v_h + s[:, None] * v_s + d[None, :], mask=ok[:, None], other=0.0)
        return ok, k.to(tl.float32), v.to(tl.float32)

    @triton.jit
    def _fp_partial_one_row(q_ptr, k_ptr, v_ptr, valid_ptr, o_ptr, lse_ptr, scaling, S, k_b, k_h, k_s, v_b, v_h, v_s,
                            valid_b, b, h, split, rows, d, D: tl.constexpr, BC: tl.constexpr, NC: tl.constexpr,
                            NS: tl.constexpr, RING: tl.constexpr, held, base):
        # The general path's arithmetic for one query row, the weighted values kept per token slot
        # ([BC, D], rescaled by the running maximum's factor each chunk: the slots share one
        # maximum) and summed over the slots once at the end, not every chunk.
        row = tl.sum(rows, 0)  # the program's one query row
        q = tl.load(q_ptr + row * D + d).to(tl.float32)
        m = tl.max(tl.full([1], float("-inf"), tl.float32), 0)
        l_sum = tl.sum(tl.zeros([1], tl.float32), 0)
        acc = tl.zeros([BC, D], tl.float32)
        for c in range(NC):
            ok, k, v = _load_chunk(k_ptr, v_ptr, valid_ptr, S, k_b, k_h, k_s, v_b, v_h, v_s, valid_b, b, h,
                                   (split * NC + c) * BC, d, BC, RING, held, base)
            score = tl.sum(q[None, :] * k, 1) * scaling  # [BC]
            score = tl.where(ok, score, float("-inf"))
            m_new = tl.maximum(m, tl.max(score, 0))
            live = m_new > float("-inf")
            ref = tl.where(live, m_new, 0.0)
            alpha = tl.where(live, tl.exp(m - ref), 1.0)
            p = tl.where(ok, tl.exp(score - ref), 0.0)
            l_sum = l_sum * alpha + tl.sum(p, 0)
            acc = acc * alpha + p[:, None] * v
            m = m_new
        out = tl.sum(acc, 0)  # [D]
        has = l_sum > 0
        inv = tl.where(has, 1.0 / tl.where(has, l_sum, 1.0), 0.0)
        tl.store(o_ptr + (row * NS + split) * D + d, out * inv)
        tl.store(lse_ptr + row * NS + split, tl.where(has, m + tl.log(tl.where(has, l_sum, 1.0)), float("-inf")))


def ring_valid(n: torch.Tensor, nq: torch.Tensor, slots: int) -> torch.Tensor:
    """[B, slots] bool: which slots of a ring (position p at slot p % slots) hold positions
    nq[b] .. n[b] - 1 (KIVI's full-precision window)."""
    slot = torch.arange(slots, device=n.device)
    return ((slot[None] - nq[:, None]) % slots) < (n - nq)[:, None]


def fp_partial_fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None, scaling: float,
                     ring: tuple[torch.Tensor, torch.Tensor] | None = None):
    """`reference.fp_partial` in one launch as up to MAX_SPLITS partials a row (CUDA, or CPU tensors
    under TRITON_INTERPRET=1); falls back to it (one partial) without triton or beyond MAX_TOKENS
    tokens. `ring=(n, nq)` instead of `valid`: the tokens are a ring window (`ring_valid`), whose
    validity the kernel works out itself (no mask built in torch: five launches fewer a layer)."""
    b, hq, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    if (valid is None) == (ring is None):
        raise ValueError("fp_partial_fused: give either valid [B, S] or ring=(n, nq), not both or neither")
    n, nq = ring if ring is not None else (None, None)
    if triton is None or s > MAX_TOKENS or d & (d - 1) or k.stride(-1) != 1 or v.stride(-1) != 1:
        return fp_partial(q, k, v, ring_valid(n, nq, s) if valid is None else valid, scaling)
    if valid is None:
        valid = n  # (unread)
    else:
        valid = valid.view(torch.int8) if valid.dtype == torch.bool and valid.is_contiguous() else valid.to(torch.int8)
    gq = hq // hkv
    gqp = 1 << max(0, (gq - 1).bit_length())
    bc = max(2, min(64, 4096 // (gqp * d)))  # [GQP, BC, D] product tiles of <= 4096 elements: no spills
    # Splits only while the grid is short of PROGRAMS_PER_SM programs an SM: KIVI's 160-slot window
    # at batch 8 (256 programs, under one wave) waited on its chunks' loads in a row; at batch 117
    # (3744 programs, many waves) more programs only repeat the per-program work (q, the stores).
    from kvbench.kernels.decode_attention import _sm_count

    chunks = max(1, -(-s // bc))
    want = max(1, PROGRAMS_PER_SM * _sm_count(str(q.device)) // (b * hkv))
    nc = -(-chunks // min(want, MAX_SPLITS))  # chunks a program
    ns = -(-chunks // nc)
    o = torch.empty(b, hq, ns, d, dtype=torch.float32, device=q.device)
    lse = torch.empty(b, hq, ns, dtype=torch.float32, device=q.device)
    _fp_partial_kernel[(b * hkv, ns)](
        q.contiguous(), k, v, valid, n if n is not None else valid, nq if nq is not None else valid, o, lse, scaling, s,
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2), valid.stride(0),
        HKV=hkv, GQ=gq, GQP=gqp, D=d, BC=bc, NC=nc, NS=ns, RING=n is not None,
    )  # fmt: skip
    return o, lse
