"""Write path: (rotate,) quantize and pack rows in one pass (Triton), straight into a packed
cache's slots.

`quantize_pack_rows(x [R, n], ...)` computes, per row, the optional orthonormal Hadamard
(`rotate=True`: one tl.dot with the +-1 Sylvester matrix, fp32 "ieee", times 1/sqrt(n)), the
group-wise asymmetric round-to-nearest of `kvbench.quant.quantize` (the same fp32 arithmetic: IEEE
division via tl.div_rn, round half to even, scale and zero rounded to fp16), and the plane packing
of `kvbench.packing` (byte j = sum_p code[j + p*P] << p*bits), and stores codes, scale and zero at
row `dest[r]` of the given output tensors (the flattened [B * S * cap] rows of a
`kvbench.packed_cache.PerTokenStore`), or returns new tensors. Without rotation the codes, scales
and zeros equal the torch quantizer's bit for bit; with rotation they can differ where fp32
rounding of the transform differs (rare, one code step).

`reference_quantize_pack_rows` is the plain-torch reference with the same contract.
"""

from __future__ import annotations

import math

import torch

from kvbench.kernels.decode_attention import _sign_matrix_on, interpreting
from kvbench.packing import pack
from kvbench.quant import QuantSpec, quantize

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None
    tl = None

_MIN_SCALE = 2.0**-14
_ROUND_MAGIC = 12582912.0  # 1.5 * 2^23: (v + M) - M rounds |v| < 2^22 half to even in fp32


def is_available() -> bool:
    return triton is not None


def _require_triton() -> None:
    if triton is None:
        raise RuntimeError("kvbench.kernels.quant_write needs triton (pip install triton) and a CUDA GPU, "
                           "or TRITON_INTERPRET=1 for CPU tensors")


if triton is not None:

    @triton.jit
    def _round_even(v):
        v = tl.minimum(tl.maximum(v, -4194304.0), 4194304.0)
        return (v + 12582912.0) - 12582912.0

    @triton.jit
    def _mul_rn(a, b, ASM: tl.constexpr):
        """a * b rounded on its own: `mul.rn` is never contracted into an FMA with a following add
        (PTX ISA). ptxas fused `xmax * clip - xmin * clip`, which rounds differently from torch's
        separate kernels and put 3e-4 of the fp16 scales one ulp off on the H100."""
        if ASM:
            return tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=f,f,f", [a, b + tl.zeros_like(a)],
                                             dtype=tl.float32, is_pure=True, pack=1)
        return a * b  # the interpreter computes in numpy: nothing to contract

    @triton.jit
    def _quantize_pack_tile(x, clip, BR: tl.constexpr, N: tl.constexpr, BITS: tl.constexpr, G: tl.constexpr,
                            INT_ZERO: tl.constexpr, ASM: tl.constexpr):
        """Rows x [BR, N] fp32 -> (packed [BR, N * BITS / 8] int32 bytes, scale, zero [BR, N / G] fp32,
        fp16-exact): `kvbench.quant.quantize`'s arithmetic and `kvbench.packing`'s plane layout."""
        P: tl.constexpr = N * BITS // 8
        NPL: tl.constexpr = 8 // BITS
        NG: tl.constexpr = N // G
        MAXC: tl.constexpr = (1 << BITS) - 1
        g = tl.reshape(x, (BR, NG, G))
        xmax = _mul_rn(tl.max(g, 2), clip, ASM)
        xmin = _mul_rn(tl.min(g, 2), clip, ASM)
        scale = tl.maximum(tl.div_rn(xmax - xmin, MAXC * 1.0), 2.0**-14).to(tl.float16).to(tl.float32)
        if INT_ZERO:
            zero = _round_even(tl.div_rn(-xmin, scale)).to(tl.float16).to(tl.float32)
            q = _round_even(tl.div_rn(g, scale[:, :, None])) + zero[:, :, None]
        else:
            zero = xmin.to(tl.float16).to(tl.float32)
            q = _round_even(tl.div_rn(g - zero[:, :, None], scale[:, :, None]))
        q = tl.minimum(tl.maximum(q, 0.0), MAXC * 1.0).to(tl.int32)
        planes = tl.reshape(q, (BR, NPL, P))
        shifts = (tl.arange(0, NPL) * BITS)[None, :, None]
        packed = tl.sum(planes << shifts, 1)  # fields are disjoint: sum == or
        return packed, scale, zero

    @triton.jit
    def _store_rows(packed, scale, zero, row, rmask, codes_ptr, scale_ptr, zero_ptr, N: tl.constexpr,
                    BITS: tl.constexpr, G: tl.constexpr):
        """Codes, scales and zeros of rows `row` (int64 [BR]) where rmask."""
        P: tl.constexpr = N * BITS // 8
        NG: tl.constexpr = N // G
        j = tl.arange(0, P)
        tl.store(codes_ptr + row[:, None] * P + j[None, :], packed.to(tl.uint8), mask=rmask[:, None])
        gi = tl.arange(0, NG)
        tl.store(scale_ptr + row[:, None] * NG + gi[None, :], scale.to(tl.float16), mask=rmask[:, None])
        tl.store(zero_ptr + row[:, None] * NG + gi[None, :], zero.to(tl.float16), mask=rmask[:, None])

    @triton.jit
    def _quant_pack_kernel(
        x_ptr, h_ptr, dest_ptr, codes_ptr, scale_ptr, zero_ptr, num_rows, clip, inv_sqrt_n,
        len_ptr, tok_pos_ptr, slot_pos_ptr, heads, streams, cap, pos_cap, xs_b, xs_h,
        N: tl.constexpr, BITS: tl.constexpr, G: tl.constexpr, INT_ZERO: tl.constexpr,
        ROTATE: tl.constexpr, HAS_DEST: tl.constexpr, BR: tl.constexpr, ASM: tl.constexpr,
        FROM_LENGTHS: tl.constexpr = False, WRITE_POS: tl.constexpr = False,
    ):
        r = tl.program_id(0) * BR + tl.arange(0, BR)
        rmask = r < num_rows
        c = tl.arange(0, N)
        if FROM_LENGTHS:  # row (b, h) of x [B, H, 1, N] at strides xs_b, xs_h (a view of one GEMM's output)
            xrow = (r // heads).to(tl.int64) * xs_b + (r % heads).to(tl.int64) * xs_h
        else:
            xrow = r.to(tl.int64) * N
        x = tl.load(x_ptr + xrow[:, None] + c[None, :], mask=rmask[:, None], other=0.0)
        if ROTATE:
            k = tl.arange(0, N)
            ht = tl.load(h_ptr + c[None, :] * N + k[:, None])  # ht[k, j] = H[j, k]
            if x.dtype == tl.float32:
                x = tl.dot(x, ht, input_precision="ieee") * inv_sqrt_n
            else:
                # fp16/bf16 rows on the tensor cores: the +-1 entries and the inputs are exact in the
                # operand type and the products accumulate in fp32, so this is the fp32 product up
                # to summation order. (The fp32 "ieee" dot of a 128 x 128 matrix runs on FMA units
                # and spilled 5 KB a thread on sm_90: 88 us a call in a decode step.)
                x = tl.dot(x, ht.to(x.dtype)) * inv_sqrt_n
        packed, scale, zero = _quantize_pack_tile(x.to(tl.float32), clip, BR, N, BITS, G, INT_ZERO, ASM)
        if FROM_LENGTHS:
            # a decode token a row: x row r = (b, h) goes to slot lengths[b] of stream h, unless its
            # position is padding (< 0); stream 0's program also records the slot's position
            bi = r // heads
            hi = r % heads
            n_b = tl.load(len_ptr + bi, mask=rmask, other=0).to(tl.int64)
            p_b = tl.load(tok_pos_ptr + bi, mask=rmask, other=-1)
            rmask = rmask & (p_b >= 0)
            row = (bi * streams + hi).to(tl.int64) * cap + n_b
            if WRITE_POS:
                tl.store(slot_pos_ptr + bi.to(tl.int64) * pos_cap + n_b, p_b.to(tl.int32), mask=rmask & (hi == 0))
        elif HAS_DEST:
            row = tl.load(dest_ptr + r, mask=rmask, other=-1).to(tl.int64)
            rmask = rmask & (row >= 0)  # a negative destination: not written
        else:
            row = r.to(tl.int64)
        _store_rows(packed, scale, zero, row, rmask, codes_ptr, scale_ptr, zero_ptr, N, BITS, G)

    @triton.jit
    def _kivi_group_kernel(
        win_ptr, n_ptr, nq_ptr, codes_ptr, scale_ptr, zero_ptr, num_rows, clip, heads, window, residual, cap,
        D: tl.constexpr, GT: tl.constexpr, GV: tl.constexpr, BITS: tl.constexpr, INT_ZERO: tl.constexpr,
        KEYS: tl.constexpr, BR: tl.constexpr, ASM: tl.constexpr,
    ):
        # KIVI's decode write: the GT tokens at each row's boundary nq[b], read in place from the
        # full-precision ring window [B, H, W, D] (position p at slot p % W), quantized where the
        # boundary moved (quantized_below(n - 1) > nq: n counts this step's token already); rows
        # that did not move load and store nothing. Keys: row (b, h, c) is channel c over the GT
        # tokens, one group, to key group nq // GT; values: row (b, h, j) is token nq + j, groups of
        # GV channels, to value slot nq + j.
        r = tl.program_id(0) * BR + tl.arange(0, BR)
        rmask = r < num_rows
        if KEYS:
            bh = r // D
        else:
            bh = r // GT
        b = bh // heads
        n = tl.load(n_ptr + b, mask=rmask, other=0)
        nq = tl.load(nq_ptr + b, mask=rmask, other=0)
        rmask = rmask & ((tl.maximum(n - residual, 0) // GT) * GT > nq)
        # Most steps move no boundary: a program without a moving row skips the quantizer's
        # arithmetic too (masked loads alone left 0.19 ms a layer of divisions at batch 117).
        if tl.max(rmask.to(tl.int32), 0) > 0:
            _kivi_group_rows(win_ptr, codes_ptr, scale_ptr, zero_ptr, r, rmask, bh, nq, clip, window, cap, D, GT, GV,
                             BITS, INT_ZERO, KEYS, BR, ASM)

    @triton.jit
    def _kivi_group_rows(win_ptr, codes_ptr, scale_ptr, zero_ptr, r, rmask, bh, nq, clip, window, cap,
                         D: tl.constexpr, GT: tl.constexpr, GV: tl.constexpr, BITS: tl.constexpr,
                         INT_ZERO: tl.constexpr, KEYS: tl.constexpr, BR: tl.constexpr, ASM: tl.constexpr):
        if KEYS:
            c = r % D
            slot = (nq[:, None] + tl.arange(0, GT)[None, :]) % window
            x = tl.load(win_ptr + (bh[:, None].to(tl.int64) * window + slot) * D + c[:, None], mask=rmask[:, None],
                        other=0.0)
            packed, scale, zero = _quantize_pack_tile(x.to(tl.float32), clip, BR, GT, BITS, GT, INT_ZERO, ASM)
            _store_rows(packed, scale, zero, (bh.to(tl.int64) * cap + nq // GT) * D + c, rmask, codes_ptr, scale_ptr,
                        zero_ptr, GT, BITS, GT)
        else:
            j = r % GT
            slot = (nq + j) % window
            x = tl.load(win_ptr + (bh.to(tl.int64) * window + slot)[:, None] * D + tl.arange(0, D)[None, :],
                        mask=rmask[:, None], other=0.0)
            packed, scale, zero = _quantize_pack_tile(x.to(tl.float32), clip, BR, D, BITS, GV, INT_ZERO, ASM)
            _store_rows(packed, scale, zero, bh.to(tl.int64) * cap + nq + j, rmask, codes_ptr, scale_ptr, zero_ptr,
                        D, BITS, GV)


    @triton.jit
    def _kivi_ring_append_kernel(
        k_ptr, v_ptr, wk_ptr, wv_ptr, n_ptr, nq_ptr, nq_old_ptr, k_sb, k_sh, v_sb, v_sh, heads, window, residual,
        D: tl.constexpr, GT: tl.constexpr, BH: tl.constexpr,
    ):
        # KIVI's decode append, one program a row b: the step's token into ring slot n % W of every
        # head (keys and values), then n += 1 and the boundary to quantized_below(n_new - 1); the
        # old boundary goes to nq_old (what kivi_group_write needs after this).
        b = tl.program_id(0).to(tl.int64)
        n = tl.load(n_ptr + b)
        nq = tl.load(nq_ptr + b)
        slot = n % window
        c = tl.arange(0, D)[None, :]
        for h0 in range(0, heads, BH):
            h = (h0 + tl.arange(0, BH))[:, None]
            m = h < heads
            dst = ((b * heads + h) * window + slot) * D + c
            kx = tl.load(k_ptr + b * k_sb + h * k_sh + c, mask=m, other=0.0)
            vx = tl.load(v_ptr + b * v_sb + h * v_sh + c, mask=m, other=0.0)
            tl.store(wk_ptr + dst, kx.to(wk_ptr.dtype.element_ty), mask=m)
            tl.store(wv_ptr + dst, vx.to(wv_ptr.dtype.element_ty), mask=m)
        tl.debug_barrier()  # every warp has read n and nq before they move
        tl.store(nq_old_ptr + b, nq)
        tl.store(n_ptr + b, n + 1)
        tl.store(nq_ptr + b, (tl.maximum(n + 1 - residual, 0) // GT) * GT)


def kivi_ring_append(k: torch.Tensor, v: torch.Tensor, win_k: torch.Tensor, win_v: torch.Tensor, n: torch.Tensor,
                     nq: torch.Tensor, nq_old: torch.Tensor, *, residual: int, group_size: int,
                     heads_block: int = 8) -> None:
    """KIVI's decode append of one token a row (k, v [B, H, 1, D]) into the full-precision ring
    windows [B, H, W, D] at slot n[b] % W, in one launch that also advances the counters: n += 1
    and nq = quantized_below(n - 1) (`KIVIPackedCache.quantized_below`), with the old nq copied to
    `nq_old` for `kivi_group_write`. Where the torch path takes an index, two index_put and half a
    dozen integer ops a layer. Positions are not read: the ring slot of a row's next token is its
    count n, as in the torch path."""
    _require_triton()
    b, h, t, d = k.shape
    if (t != 1 or v.shape != k.shape or d & (d - 1) or win_k.shape != win_v.shape or win_k.shape[:2] != (b, h)
            or win_k.shape[-1] != d or not (win_k.is_contiguous() and win_v.is_contiguous())
            or k.stride(-1) != 1 or v.stride(-1) != 1 or n.shape != (b,) or nq.shape != (b,) or nq_old.shape != (b,)):
        raise ValueError("kivi_ring_append: one token a row [B, H, 1, D] (D a power of two, unit channel stride), "
                         "contiguous windows [B, H, W, D] and counters [B]")
    _kivi_ring_append_kernel[(b,)](
        k, v, win_k, win_v, n, nq, nq_old, k.stride(0), k.stride(1), v.stride(0), v.stride(1), h, win_k.shape[2],
        residual, D=d, GT=group_size, BH=heads_block,
    )  # fmt: skip


def quantize_pack_rows(x: torch.Tensor, *, bits: int, group_size: int, clip_ratio: float = 1.0,
                       integer_zero: bool = True, rotate: bool = False, dest: torch.Tensor | None = None,
                       out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None, block_rows: int = 16):
    """Quantize and pack rows x [R, n] (n a power of two, bits 2/4/8). Returns (codes, scale, zero)
    [R or out rows, ...]; with `out` (codes [M, n*bits/8] u8, scale/zero [M, n/G] fp16, contiguous)
    and `dest` [R] int64 row indices, writes row r to out row dest[r] (not at all where dest[r] < 0:
    a masked write without a host sync) and returns `out`."""
    _require_triton()
    rows, n = x.shape
    if bits not in (2, 4, 8) or n & (n - 1) or n % group_size:
        raise ValueError(f"quantize_pack_rows takes bits 2/4/8, a power-of-two row and G | n; got {bits}, {n}, {group_size}")
    if out is None:
        out = (torch.empty(rows, n * bits // 8, dtype=torch.uint8, device=x.device),
               torch.empty(rows, n // group_size, dtype=torch.float16, device=x.device),
               torch.empty(rows, n // group_size, dtype=torch.float16, device=x.device))
    h = _sign_matrix_on(n, torch.float32, x.device) if rotate else None  # made once per size and device
    x = x.contiguous()
    if rows:
        _quant_pack_kernel[(triton.cdiv(rows, block_rows),)](
            x, h if h is not None else x, dest if dest is not None else x, out[0], out[1], out[2], rows,
            clip_ratio, 1.0 / math.sqrt(n), x, x, x, 1, 1, 1, 1, 0, 0,
            N=n, BITS=bits, G=group_size, INT_ZERO=integer_zero, ROTATE=rotate, HAS_DEST=dest is not None,
            BR=block_rows, ASM=not interpreting(),
        )  # fmt: skip
    return out


def quantize_pack_decode(x: torch.Tensor, lengths: torch.Tensor, token_positions: torch.Tensor,
                         out: tuple[torch.Tensor, torch.Tensor, torch.Tensor], *, bits: int, group_size: int,
                         clip_ratio: float = 1.0, integer_zero: bool = True, rotate: bool = False,
                         slot_positions: torch.Tensor | None = None, block_rows: int = 16) -> None:
    """One decode token a row, straight into a `PerTokenStore`'s next free slot, in one launch:
    x [B, H, 1, n] (any batch and head strides) row (b, h) is quantized as `quantize_pack_rows`
    does and written to slot lengths[b] of stream h of `out` (codes [B, S, cap, n*bits/8],
    scale/zero [B, S, cap, n/G]),
    not at all where token_positions[b] < 0 (padding). With `slot_positions` ([B, pos_cap] int32),
    the token's position goes to slot_positions[b, lengths[b]]. `lengths` is read, not advanced
    (the caller adds the written tokens after every stream's launch: a program advancing it here
    would race the other heads' reads). No host sync: a decode step stays capturable."""
    _require_triton()
    b, heads, t, n = x.shape
    codes, scale, zero = out
    if t != 1 or bits not in (2, 4, 8) or n & (n - 1) or n % group_size or not all(
            o.is_contiguous() for o in out) or lengths.shape != (b,) or token_positions.numel() != b:
        raise ValueError("quantize_pack_decode: one token a row of a power-of-two width, bits 2/4/8, contiguous "
                         "stores and lengths [B]")
    h = _sign_matrix_on(n, torch.float32, x.device) if rotate else None
    if x.stride(-1) != 1:
        x = x.contiguous()  # (any batch and head strides are read as they are)
    tok = token_positions.reshape(b).contiguous()
    pos = slot_positions if slot_positions is not None else tok
    _quant_pack_kernel[(triton.cdiv(b * heads, block_rows),)](
        x, h if h is not None else x, x, codes, scale, zero, b * heads, clip_ratio, 1.0 / math.sqrt(n),
        lengths, tok, pos, heads, codes.shape[1], codes.shape[2], pos.shape[-1] if pos.dim() == 2 else 1,
        x.stride(0), x.stride(1),
        N=n, BITS=bits, G=group_size, INT_ZERO=integer_zero, ROTATE=rotate, HAS_DEST=False, BR=block_rows,
        ASM=not interpreting(), FROM_LENGTHS=True, WRITE_POS=slot_positions is not None,
    )  # fmt: skip


def reference_quantize_pack_rows(x, *, bits, group_size, clip_ratio=1.0, integer_zero=True, rotate=False, **_):
    """Plain torch: kvbench.hadamard + kvbench.quant.quantize + kvbench.packing.pack."""
    if rotate:
        from kvbench.hadamard import hadamard_transform

        x = hadamard_transform(x.float(), backend="torch")
    q = quantize(x, QuantSpec(bits, group_size, clip_ratio, integer_zero))
    return pack(q.codes, bits), q.scale, q.zero


def kivi_group_write(win: torch.Tensor, n: torch.Tensor, nq: torch.Tensor, out, *, keys: bool, bits: int,
                     group_size: int, value_group_size: int, residual: int, clip_ratio: float = 1.0,
                     integer_zero: bool = False, block_rows: int | None = None) -> None:
    """KIVI's decode write of the group at each row's boundary straight from the full-precision ring
    window `win` [B, H, W, D] (slot = position % W), in one launch, for the rows whose boundary
    moved this step (`n` already counts the step's token; `nq` is the old boundary; neither is
    changed here), into `out` = (codes, scale, zero): `keys=True` quantizes each channel over the
    group's tokens (the key store: codes [B, H, cap_groups, D, G*bits/8], scale/zero
    [B, H, cap_groups, D]); `keys=False` each token in groups of `value_group_size` channels (a
    `PerTokenStore`'s codes, scale, zero).
    The same quantizer as `quantize_pack_rows`, on the same values as the torch path gathers.
    `block_rows` (default: one (row, head) a program, D channel rows or G token rows) sets the rows
    a program takes: most steps move no boundary, and a program whose rows did not move returns
    after loading two counters, so the launch costs what its grid costs (16-row programs: 15 us a
    launch at batch 117, thirteenth session)."""
    _require_triton()
    b, h, w, d = win.shape
    g = group_size
    if bits not in (2, 4, 8) or g & (g - 1) or d & (d - 1) or d % value_group_size or not win.is_contiguous():
        raise ValueError("kivi_group_write: bits 2/4/8, power-of-two group and head_dim, a contiguous window")
    codes, scale, zero = out
    rows = b * h * (d if keys else g)
    cap = codes.shape[2]
    block_rows = block_rows or (d if keys else g)
    _kivi_group_kernel[(triton.cdiv(rows, block_rows),)](
        win, n, nq, codes, scale, zero, rows, clip_ratio, h, w, residual, cap,
        D=d, GT=g, GV=value_group_size, BITS=bits, INT_ZERO=integer_zero, KEYS=keys, BR=block_rows,
        ASM=not interpreting(),
    )  # fmt: skip
