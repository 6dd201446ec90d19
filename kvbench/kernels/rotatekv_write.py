"""RotateKV's key write: quantize rows in groups given by a channel map and pack them per key block,
in one Triton launch, straight into a `kvbench.packed_cache.RotateKVPackedCache`'s slots.

`quantize_pack_grouped(rot [R, C], gid [C], ...)` takes rotated keys in rotated (natural) channel
order and, per row:

1. loads the row gathered in `order` (the channels sorted by group: any order in which group g
   takes positions g*G .. g*G + G - 1, G = C / num_qgroups; RotateKV's calibrated permutation is
   one), reduces each group's min and max, and computes its scale and zero with the arithmetic of
   `kvbench.quant.quantize` (clip ratio on min and max, IEEE division via tl.div_rn, round half to
   even, scale clamped at 2^-14 and rounded through fp16, zero rounded through fp16), the same
   fp32 operations as `kvbench.kernels.quant_write._quant_pack_kernel`;
2. for every key block (`key_block` consecutive channels, C / key_block of them) and every bit
   plane s, loads the channels kb*key_block + s*P + j (j < P = key_block*bits/8) contiguously,
   looks up the scale and zero of their group (gid, tl.gather from the registers of step 1),
   rounds, and ORs the codes into the plane-layout bytes of `kvbench.packing`;
3. stores the key block's P bytes at `codes_out[code_rows[r, kb]]` and the C / G scales and zeros
   at `scale_out/zero_out[scale_rows[r]]` (a negative row skips the store).

No tile needs a power-of-two size from the caller: group size, group count, key-block count and
bytes per key block are padded to powers of two with masks (SmolLM2: C = key_block = 192).
Codes, scales and zeros equal `reference_quantize_pack_grouped` (kvbench.quant.quantize +
kvbench.packing.pack on the permuted row) bit for bit: the only floating-point operations are
the quantizer's, in the same order (min/max are exact in any order).

`check_rotatekv_write` and `check_rotatekv_append` are the correctness checks (interpreter in
tests/test_kernels.py, CUDA in benchmarks/kernels_gpu.py and `pytest -m cuda`).
"""

from __future__ import annotations

import torch

from kvbench.kernels.decode_attention import _pow2, interpreting
from kvbench.packing import pack
from kvbench.quant import QuantSpec, quantize

try:
    import triton
    import triton.language as tl

    from kvbench.kernels.quant_write import _mul_rn, _round_even
except ImportError:  # pragma: no cover
    triton = None
    tl = None


#: Largest row the one-program-per-row kernel takes (Llama-2-7B's C = 4096 uses 4 warps, no spills).
MAX_CHANNELS = 8192


def supports(channels: int, num_qgroups: int, key_block: int, bits: int) -> bool:
    """Whether `quantize_pack_grouped` takes this layout (no power-of-two restriction)."""
    return (bits in (2, 4, 8) and 0 < channels <= MAX_CHANNELS and num_qgroups > 0 and key_block > 0
            and channels % num_qgroups == 0 and channels % key_block == 0 and key_block * bits % 8 == 0)


if triton is not None:

    @triton.jit
    def _quant_pack_grouped_kernel(
        x_ptr, order_ptr, gid_ptr, codes_ptr, scale_ptr, zero_ptr, crow_ptr, srow_ptr, clip, tokens, cap,
        tok_ptr, spos_ptr, spos_cap,
        C: tl.constexpr, NG: tl.constexpr, G: tl.constexpr, KB: tl.constexpr, BITS: tl.constexpr,
        INT_ZERO: tl.constexpr, NGP: tl.constexpr, GP: tl.constexpr, NKBP: tl.constexpr, PP: tl.constexpr,
        SLOTS: tl.constexpr, FROM_LENGTHS: tl.constexpr, WRITE_POS: tl.constexpr, ASM: tl.constexpr,
    ):
        # SLOTS: crow_ptr holds each row's slot dest[b, t] (row r = b * tokens + t) and the rows
        # follow a PerTokenStore's layout: codes (b * NKB + kb) * cap + slot, scales b * cap + slot.
        # FROM_LENGTHS (a decode step, tokens == 1, the same layout): crow_ptr holds the lengths [B]
        # instead and the slot is lengths[b]; a padding token (tok_ptr[b] < 0) is not written, and
        # WRITE_POS stores the token's position at spos_ptr[b, slot]. Otherwise crow_ptr [R, NKB]
        # and srow_ptr [R] are the rows themselves.
        NKB: tl.constexpr = C // KB
        P: tl.constexpr = KB * BITS // 8
        NPL: tl.constexpr = 8 // BITS
        MAXC: tl.constexpr = (1 << BITS) - 1
        r = tl.program_id(0).to(tl.int64)
        xrow = x_ptr + r * C
        # 1. per-group min / max over the row gathered in group order
        gi = tl.arange(0, NGP)
        k = tl.arange(0, GP)
        m1 = (gi[:, None] < NG) & (k[None, :] < G)
        ch = tl.load(order_ptr + gi[:, None] * G + k[None, :], mask=m1, other=0)
        xp = tl.load(xrow + ch, mask=m1, other=0.0).to(tl.float32)
        xmax = tl.max(tl.where(m1, xp, float("-inf")), 1)
        xmin = tl.min(tl.where(m1, xp, float("inf")), 1)
        live = gi < NG
        xmax = _mul_rn(tl.where(live, xmax, 0.0), clip, ASM)  # unfused, as torch rounds it
        xmin = _mul_rn(tl.where(live, xmin, 0.0), clip, ASM)
        scale = tl.maximum(tl.div_rn(xmax - xmin, MAXC * 1.0), 2.0**-14).to(tl.float16).to(tl.float32)
        if INT_ZERO:
            zero = _round_even(tl.div_rn(-xmin, scale)).to(tl.float16).to(tl.float32)
        else:
            zero = xmin.to(tl.float16).to(tl.float32)
        if FROM_LENGTHS:
            tok = tl.load(tok_ptr + r)
            slot = tl.where(tok >= 0, tl.load(crow_ptr + r), -1).to(tl.int64)
            b = r
            srow = tl.where(slot >= 0, b * cap + slot, -1)
            if WRITE_POS:
                tl.store(spos_ptr + b * spos_cap + slot, tok.to(tl.int32), mask=slot >= 0)
        elif SLOTS:
            slot = tl.load(crow_ptr + r).to(tl.int64)
            b = r // tokens
            srow = tl.where(slot >= 0, b * cap + slot, -1)
        else:
            srow = tl.load(srow_ptr + r)
        smask = live & (srow >= 0)
        tl.store(scale_ptr + srow * NG + gi, scale.to(tl.float16), mask=smask)
        tl.store(zero_ptr + srow * NG + gi, zero.to(tl.float16), mask=smask)
        # 2. codes in natural channel order, plane by plane, every key block at once
        i = tl.arange(0, NKBP * PP)
        kb = i // PP
        j = i % PP
        m2 = (kb < NKB) & (j < P)
        if SLOTS or FROM_LENGTHS:
            crow = tl.where(slot >= 0, (b * NKB + kb) * cap + slot, -1)
        else:
            crow = tl.load(crow_ptr + r * NKB + kb, mask=kb < NKB, other=-1)
        packed = tl.zeros([NKBP * PP], dtype=tl.int32)
        for s in tl.static_range(NPL):
            c = kb * KB + s * P + j
            x = tl.load(xrow + c, mask=m2, other=0.0).to(tl.float32)
            g = tl.load(gid_ptr + c, mask=m2, other=0)
            sc = tl.gather(scale, g, 0)
            zc = tl.gather(zero, g, 0)
            if INT_ZERO:
                q = _round_even(tl.div_rn(x, sc)) + zc
            else:
                q = _round_even(tl.div_rn(x - zc, sc))
            q = tl.minimum(tl.maximum(q, 0.0), MAXC * 1.0).to(tl.int32)
            packed = packed | (q << (s * BITS))
        # 3. one row of P bytes per key block
        tl.store(codes_ptr + crow * P + j, packed.to(tl.uint8), mask=m2 & (crow >= 0))


def _order_of(gid: torch.Tensor) -> torch.Tensor:
    return torch.argsort(gid, stable=True).to(torch.int32)


def _default_outputs(rows, c, num_qgroups, key_block, bits, device):
    nkb = c // key_block
    codes = torch.zeros(rows * nkb, key_block * bits // 8, dtype=torch.uint8, device=device)
    scale = torch.zeros(rows, num_qgroups, dtype=torch.float16, device=device)
    zero = torch.zeros_like(scale)
    code_rows = torch.arange(rows * nkb, device=device).reshape(rows, nkb)
    scale_rows = torch.arange(rows, device=device)
    return codes, scale, zero, code_rows, scale_rows


def quantize_pack_grouped(rot: torch.Tensor, gid: torch.Tensor, *, bits: int, num_qgroups: int, clip_ratio: float = 1.0,
                          integer_zero: bool = True, key_block: int, codes_out: torch.Tensor | None = None,
                          scale_out: torch.Tensor | None = None, zero_out: torch.Tensor | None = None,
                          code_rows: torch.Tensor | None = None, scale_rows: torch.Tensor | None = None,
                          dest: torch.Tensor | None = None, capacity: int | None = None,
                          lengths: torch.Tensor | None = None, token_positions: torch.Tensor | None = None,
                          slot_positions: torch.Tensor | None = None,
                          order: torch.Tensor | None = None, num_warps: int | None = None):
    """Quantize rows rot [R, C] in the groups gid [C] (int32, values 0 .. num_qgroups - 1, each
    exactly C / num_qgroups times) and pack each key block of `key_block` channels (natural
    order) in the plane layout. Writes codes of row r, key block kb to codes_out[code_rows[r, kb]]
    ([M, key_block*bits/8] uint8) and its scales/zeros to scale_out/zero_out[scale_rows[r]]
    ([M2, num_qgroups] fp16); negative rows are skipped. Instead of the rows, `dest` [B, T] slots
    (R = B * T) and `capacity` give them for a PerTokenStore's flattened tensors (codes
    [B, C/key_block, cap, P], scales [B, 1, cap, num_qgroups]): code row (b * C/key_block + kb) *
    cap + dest[b, t], scale row b * cap + dest[b, t], computed in the kernel (no index launches).
    A decode step (R = B, one token a row) may give `lengths` [B] and `token_positions` [B] instead
    of `dest`: the slot is lengths[b] (read, not advanced), padding tokens (position < 0) are not
    written, and with `slot_positions` [B, cap] int32 the token's position goes to
    slot_positions[b, lengths[b]]: the decode append's bookkeeping in the same launch.
    `order` [C] int32: channels sorted by group (computed from gid when omitted; pass it to save a
    launch). Without outputs, returns new (codes [R * C/key_block, P], scale [R, num_qgroups],
    zero), rows in order. Returns (codes_out, scale_out, zero_out)."""
    if triton is None:
        raise RuntimeError("kvbench.kernels.rotatekv_write needs triton (pip install triton) and a CUDA GPU, "
                           "or TRITON_INTERPRET=1 for CPU tensors")
    rows, c = rot.shape
    if not supports(c, num_qgroups, key_block, bits) or gid.numel() != c:
        raise ValueError(f"quantize_pack_grouped: unsupported layout C={c}, gid {tuple(gid.shape)}, "
                         f"num_qgroups={num_qgroups}, key_block={key_block}, bits={bits}")
    if codes_out is None:
        if dest is not None:
            raise ValueError("dest/capacity address given outputs (codes_out, scale_out, zero_out)")
        codes_out, scale_out, zero_out, code_rows, scale_rows = _default_outputs(rows, c, num_qgroups, key_block,
                                                                                  bits, rot.device)
    if order is None:
        order = _order_of(gid)
    g = c // num_qgroups
    p = key_block * bits // 8
    if num_warps is None:
        num_warps = 8 if c >= 2048 else 4
    rot = rot.contiguous()
    slots = dest is not None
    from_lengths = lengths is not None
    if from_lengths:
        if slots or capacity is None or token_positions is None or lengths.shape != (rows,) \
                or token_positions.numel() != rows or (slot_positions is not None and (
                    slot_positions.dtype != torch.int32 or not slot_positions.is_contiguous()
                    or slot_positions.shape[0] != rows)):
            raise ValueError("lengths mode: one token a row (lengths [R], token_positions [R]), the store's "
                             "capacity, no dest, and slot_positions (if given) contiguous int32 [R, cap]")
        code_rows, scale_rows, tokens = lengths.contiguous(), lengths, 1
    elif slots:
        if dest.numel() != rows or capacity is None:
            raise ValueError("dest must hold one slot per row of rot, with the store's capacity")
        code_rows, scale_rows, tokens = dest.contiguous(), dest, dest.shape[-1]
    else:
        code_rows, scale_rows, tokens = code_rows.contiguous(), scale_rows.contiguous(), 1
    tok = token_positions.reshape(-1).contiguous() if from_lengths else code_rows  # (unread otherwise)
    spos = slot_positions if slot_positions is not None else code_rows
    if rows:
        _quant_pack_grouped_kernel[(rows,)](
            rot, order, gid, codes_out, scale_out, zero_out, code_rows, scale_rows, clip_ratio, tokens,
            capacity or 0, tok, spos, spos.shape[-1] if slot_positions is not None else 1,
            C=c, NG=num_qgroups, G=g, KB=key_block, BITS=bits, INT_ZERO=integer_zero,
            NGP=_pow2(num_qgroups), GP=_pow2(g), NKBP=_pow2(c // key_block), PP=_pow2(p), SLOTS=slots,
            FROM_LENGTHS=from_lengths, WRITE_POS=slot_positions is not None, ASM=not interpreting(),
            num_warps=num_warps,
        )  # fmt: skip
    return codes_out, scale_out, zero_out


def reference_quantize_pack_grouped(rot: torch.Tensor, gid: torch.Tensor, *, bits: int, num_qgroups: int,
                                    clip_ratio: float = 1.0, integer_zero: bool = True, key_block: int,
                                    codes_out=None, scale_out=None, zero_out=None, code_rows=None, scale_rows=None,
                                    dest=None, capacity=None, **_):
    """Plain torch, the same contract: permute by group, kvbench.quant.quantize, unpermute the codes,
    kvbench.packing.pack per key block, scatter to the given rows (negative rows skipped)."""
    rows, c = rot.shape
    counts = torch.bincount(gid.long().cpu(), minlength=num_qgroups)
    if counts.numel() != num_qgroups or bool((counts != c // num_qgroups).any()):
        raise ValueError("every group must hold exactly C / num_qgroups channels")
    order = torch.argsort(gid.long(), stable=True)
    inv = torch.empty_like(order)
    inv[order] = torch.arange(c, device=order.device)
    q = quantize(rot[:, order], QuantSpec(bits, c // num_qgroups, clip_ratio, integer_zero))
    codes = pack(q.codes[:, inv].reshape(rows * (c // key_block), key_block), bits)
    if codes_out is None:
        return codes, q.scale, q.zero
    if dest is not None:
        nkb = c // key_block
        b_idx = torch.arange(dest.shape[0], device=dest.device)[:, None]
        kb = torch.arange(nkb, device=dest.device)
        code_rows = torch.where(dest[:, :, None] >= 0, (b_idx[:, :, None] * nkb + kb) * capacity + dest[:, :, None], -1)
        scale_rows = torch.where(dest >= 0, b_idx * capacity + dest, -1)
    cr = code_rows.reshape(-1)
    keep = cr >= 0
    codes_out[cr[keep]] = codes[keep].to(codes_out.device)
    sr = scale_rows.reshape(-1)
    keep = sr >= 0
    scale_out[sr[keep]] = q.scale[keep].to(scale_out.device)
    zero_out[sr[keep]] = q.zero[keep].to(zero_out.device)
    return codes_out, scale_out, zero_out


# --------------------------------------------------------------------------------------------
# Checks


def check_rotatekv_write(device, results=None):
    """quantize_pack_grouped against reference_quantize_pack_grouped, bit for bit: random rows with
    outlier channels and a constant row, odd row counts, bits 2/4/8, integer and float zeros,
    clip ratios, C = 192 (SmolLM2, key block 192) / 512 / 4096 (Llama-2-7B: key block 512, G 128),
    random group maps, scattered destination rows with some skipped."""
    results = [] if results is None else results
    gen = torch.Generator().manual_seed(11)
    cases = (  # C, G, key_block, bits, clip, integer_zero, rows
        (192, 64, 192, 2, 0.8, True, 7), (192, 64, 192, 4, 1.0, True, 5), (192, 32, 64, 8, 1.0, False, 3),
        (512, 64, 256, 2, 0.8, True, 9), (512, 128, 128, 4, 0.9, False, 6), (512, 16, 512, 8, 1.0, True, 5),
        (4096, 128, 512, 2, 0.8, True, 3), (4096, 128, 512, 4, 1.0, True, 2),
    )
    if device != "cpu":  # enough groups to see a rounding difference in 1e-4 of them (checks.check_write)
        cases += ((192, 64, 192, 2, 0.8, True, 20000), (4096, 128, 512, 2, 0.8, False, 2000))
    for c, group, kb, bits, clip, iz, rows in cases:
        ng, nkb = c // group, c // kb
        x = torch.randn(rows, c, generator=gen)
        x[:, 5] *= 40.0
        x[:, c // 3] -= 15.0
        if rows > 2:
            x[2] = 0.375  # a constant row: scale clamps to its minimum
            x[1] = torch.randint(-6, 7, (c,), generator=gen).float()  # integers: exact .5 ties to round
        x = x.to(device)
        gid = (torch.randperm(c, generator=gen) // group).to(torch.int32).to(device)
        m_codes, m_scale = rows * nkb + 5, rows + 4
        code_rows = torch.randperm(m_codes, generator=gen)[: rows * nkb].reshape(rows, nkb)
        scale_rows = torch.randperm(m_scale, generator=gen)[:rows]
        code_rows[0, -1] = -1  # skipped stores
        scale_rows[-1] = -1
        code_rows, scale_rows = code_rows.to(device), scale_rows.to(device)
        kw = dict(bits=bits, num_qgroups=ng, clip_ratio=clip, integer_zero=iz, key_block=kb)
        outs = []
        for fn in (quantize_pack_grouped, reference_quantize_pack_grouped):
            out = (torch.full((m_codes, kb * bits // 8), 7, dtype=torch.uint8, device=device),
                   torch.full((m_scale, ng), 3.0, dtype=torch.float16, device=device),
                   torch.full((m_scale, ng), 3.0, dtype=torch.float16, device=device))
            fn(x, gid, codes_out=out[0], scale_out=out[1], zero_out=out[2], code_rows=code_rows, scale_rows=scale_rows,
               **kw)
            outs.append([t.cpu() for t in out])
        ok = all(torch.equal(a, b) for a, b in zip(*outs))
        results.append({"kernel": f"rotatekv write C={c} G={group} key_block={kb} bits={bits} clip={clip} "
                                  f"int_zero={iz} rows={rows}", "ok": bool(ok), "exact": True})
    # Slot mode (what RotateKVPackedCache uses): dest [B, T] into a PerTokenStore's tensors, some
    # slots negative (skipped), against the reference with the rows written out.
    for c, group, kb, bits, b, t in ((192, 64, 192, 2, 3, 4), (512, 64, 128, 4, 2, 3), (4096, 128, 512, 2, 2, 1)):
        ng, nkb, cap = c // group, c // kb, 8
        x = torch.randn(b * t, c, generator=gen)
        x[:, 1] *= 25.0
        x = x.to(device)
        gid = (torch.randperm(c, generator=gen) // group).to(torch.int32).to(device)
        dest = torch.stack([torch.randperm(cap, generator=gen)[:t] for _ in range(b)])
        dest[0, 0] = -1
        b_idx = torch.arange(b)[:, None]
        code_rows = torch.where(dest[:, :, None] >= 0, (b_idx[:, :, None] * nkb + torch.arange(nkb)) * cap
                                + dest[:, :, None], -1).reshape(b * t, nkb)
        scale_rows = torch.where(dest >= 0, b_idx * cap + dest, -1).reshape(-1)
        kw = dict(bits=bits, num_qgroups=ng, clip_ratio=0.8, integer_zero=True, key_block=kb)
        outs = []
        for fn, rows_kw in ((quantize_pack_grouped, dict(dest=dest.to(device), capacity=cap)),
                            (reference_quantize_pack_grouped, dict(code_rows=code_rows.to(device),
                                                                   scale_rows=scale_rows.to(device)))):
            out = (torch.full((b, nkb, cap, kb * bits // 8), 7, dtype=torch.uint8, device=device),
                   torch.full((b, 1, cap, ng), 3.0, dtype=torch.float16, device=device),
                   torch.full((b, 1, cap, ng), 3.0, dtype=torch.float16, device=device))
            fn(x, gid, codes_out=out[0].view(-1, kb * bits // 8), scale_out=out[1].view(-1, ng),
               zero_out=out[2].view(-1, ng), **rows_kw, **kw)
            outs.append([o.cpu() for o in out])
        ok = all(torch.equal(a, b_) for a, b_ in zip(*outs))
        results.append({"kernel": f"rotatekv write slots C={c} G={group} key_block={kb} bits={bits} B={b} T={t}",
                        "ok": bool(ok), "exact": True})
    return results


def check_rotatekv_append(device, results=None, dtype=torch.float32):
    """A RotateKVPackedCache append through the fused write (CUDA; forced on under the interpreter)
    against its torch write: keys and values (codes of every slot, scales, zeros) bit for bit.
    Left-padded prefill with sinks, then decode steps; Llama-like (4 KV heads, head_group 2,
    permuted) and SmolLM2-like (3 heads, head_group 3, C = 192) geometries. `dtype`: of the new
    tokens."""
    from kvbench.kernels.checks import torch_and_fused_appends
    from kvbench.method import KVGeometry, NewTokens
    from kvbench.rope import apply_rope, rope_tables
    from methods.rotatekv import RotateKV

    results = [] if results is None else results
    gen = torch.Generator().manual_seed(12)
    b, lengths = 3, [11, 6, 3]
    cases = (("rotatekv-2 hg2 perm", 4, 64, dict(bits=2, head_group=2, sinks=2)),
             ("rotatekv-4 hg2 G32 perm", 4, 64, dict(bits=4, head_group=2, group_size=32, sinks=0)),
             ("rotatekv-2 smol hg3 perm", 3, 64, dict(bits=2, head_group=3, sinks=2)),
             ("rotatekv-8 hg1 post-rope", 2, 64, dict(bits=8, head_group=1, pre_rope=False, reorder=False, sinks=0)))
    for name, hkv, d, kw in cases:
        geom = KVGeometry(num_layers=1, num_heads=2 * hkv, num_kv_heads=hkv, head_dim=d, hidden_size=32,
                          rope_theta=1e4)
        method = RotateKV(mode="packed", **kw)
        if method.reorder:
            method.load_calibration_state({"perm.0": torch.randperm(hkv * d, generator=gen)})
        t = max(lengths)
        pos = torch.tensor([[-1] * (t - n) + list(range(n)) for n in lengths])
        news = []
        for step in range(7):  # prefill, then decode steps past the first capacity (16 slots): the stores grow
            bt = pos.shape[1]
            k_pre = torch.randn(b, hkv, bt, d, generator=gen)
            k_pre[..., 2] *= 20
            k_pre[:, -1, :, 7] -= 9
            v = torch.randn(b, hkv, bt, d, generator=gen)
            v[..., 5] *= 10
            cos, sin = rope_tables(pos, d, 1e4)
            li = torch.randn(b, bt, 32, generator=gen)
            if bt > 2:
                li[:, 2, :3] += 50  # sink tokens (full precision, scratch slots in the packed stores)
            news.append(NewTokens(k_pre=k_pre.to(device, dtype), k=apply_rope(k_pre, cos, sin).to(device, dtype),
                                  v=v.to(device, dtype), cos=cos.to(device, dtype), sin=sin.to(device, dtype),
                                  positions=pos.to(device), layer_input=li.to(device, dtype), is_prefill=step == 0))
            pos = torch.tensor(lengths)[:, None] + step
        calls = []  # the fused write must really have run
        inner = quantize_pack_grouped
        globals()["quantize_pack_grouped"] = lambda *a, **k: (calls.append(1), inner(*a, **k))[1]
        try:
            plain, fused = torch_and_fused_appends(lambda: method.new_cache(0, geom), news, device)
        finally:
            globals()["quantize_pack_grouped"] = inner
        ks_a, ks_b = plain.kstore, fused.kstore
        keys_exact = (torch.equal(ks_a.codes.cpu(), ks_b.codes.cpu()) and torch.equal(ks_a.scale.cpu(), ks_b.scale.cpu())
                      and torch.equal(ks_a.zero.cpu(), ks_b.zero.cpu()))
        vs_a, vs_b = plain.vstore, fused.vstore
        values_exact = (torch.equal(vs_a.codes.cpu(), vs_b.codes.cpu()) and torch.equal(vs_a.scale.cpu(), vs_b.scale.cpu())
                        and torch.equal(vs_a.zero.cpu(), vs_b.zero.cpu()))
        same_meta = torch.equal(plain.positions.cpu(), fused.positions.cpu()) and torch.equal(
            plain.lengths.cpu(), fused.lengths.cpu())
        # Bit for bit, values too (rotated by the torch path's Hadamard): at 2 bits one fp16 ulp of
        # a scale in 1e-4 of the groups moved SmolLM2's perplexity 1.2% on the H100.
        ok = keys_exact and values_exact and same_meta and len(calls) == len(news)
        results.append({"kernel": f"rotatekv fused append {name} {str(dtype)[6:]}", "ok": bool(ok),
                        "keys_exact": bool(keys_exact), "values_exact": bool(values_exact), "fused_calls": len(calls)})
    return results
