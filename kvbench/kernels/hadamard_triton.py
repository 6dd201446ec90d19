"""Triton kernels for Kronecker-structured transforms of rows, used for Hadamard rotations.

For each row x of length n, `kron_transform(rows, left, right, scale)` computes

    y = scale * x @ kron(left, right)^T

by viewing x as an r x c row-major matrix X (n = r * c, left is r x r, right is c x c) and
computing scale * left @ X @ right^T: two small tl.dot products instead of one n x n one. With
left=None the row is a 1 x c matrix and y = scale * x @ right^T; that form takes a block of rows
per program, so that tl.dot gets its 16-row minimum.

Sizes need not be powers of two (H_12 is 12 x 12): tiles are padded to the next power of two,
at least 16 (tl.dot's minimum), and masked loads fill the padding with zeros, which the products
carry through as zeros. kvbench.hadamard passes the +-1 sign matrices, exact in any float type,
and scale = 1/sqrt(n).

Rows are loaded in their own dtype and computed in float32. tl.dot runs with input_precision
"tf32x3" on GPUs with TF32 (compute capability 8.0+): three TF32 products that recover float32
accuracy (relative error ~1e-7 on an H100, where plain "tf32" gives ~1e-3), at a fraction of the
cost of "ieee", which on an H100 was 10-50x slower for 64 x 64 and larger tiles.

triton is imported in a try: this module imports without it, and calls then raise.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: kvbench.hadamard falls back to torch.
    triton = None
    tl = None

# Largest padded tile side. The kron kernel holds a BLOCK_R x BLOCK_C tile and both matrices on
# chip; 128 x 128 (n = 16384) compiles and runs on an H100, larger would not fit shared memory.
MAX_BLOCK = 128
# tl.dot needs every dimension to be at least 16.
MIN_BLOCK = 16
PRECISIONS = ("ieee", "tf32x3", "tf32")


def is_available() -> bool:
    return triton is not None


def _block(size: int) -> int:
    """Padded tile side for a matrix of order `size`: next power of two, at least MIN_BLOCK."""
    return max(MIN_BLOCK, 1 << (size - 1).bit_length())


def _default_precision(device: torch.device) -> str:
    if device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0):
        return "tf32x3"
    return "ieee"  # older GPUs have no TF32; the interpreter computes exactly either way


def fits(left_size: int | None, right_size: int) -> bool:
    """Whether the kernel takes matrices of these orders (left_size None: no left matrix)."""
    return _block(right_size) <= MAX_BLOCK and (left_size is None or _block(left_size) <= MAX_BLOCK)


if triton is not None:

    @triton.jit
    def _right_only_kernel(
        x_ptr,
        right_ptr,
        out_ptr,
        num_rows,
        scale,
        C: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_C: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        # out[rows] = scale * x[rows] @ right^T for a block of BLOCK_M rows of length C.
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_C)
        mask = (rows[:, None] < num_rows) & (cols[None, :] < C)
        offsets = rows[:, None].to(tl.int64) * C + cols[None, :]
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)

        # right_t[k, j] = right[j, k]
        k = tl.arange(0, BLOCK_C)
        right_mask = (k[:, None] < C) & (cols[None, :] < C)
        right_t = tl.load(right_ptr + cols[None, :] * C + k[:, None], mask=right_mask, other=0.0)

        y = tl.dot(x, right_t, input_precision=PRECISION) * scale
        tl.store(out_ptr + offsets, y.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _kron_kernel(
        x_ptr,
        left_ptr,
        right_ptr,
        out_ptr,
        num_rows,
        scale,
        R: tl.constexpr,
        C: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_C: tl.constexpr,
        ROWS_PER_PROGRAM: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        # For each row: X = row viewed as R x C, out = scale * left @ X @ right^T.
        i = tl.arange(0, BLOCK_R)
        j = tl.arange(0, BLOCK_C)
        tile_mask = (i[:, None] < R) & (j[None, :] < C)
        tile_offsets = i[:, None] * C + j[None, :]

        # The matrices are loaded once per program and reused for ROWS_PER_PROGRAM rows.
        left_k = tl.arange(0, BLOCK_R)
        left = tl.load(
            left_ptr + i[:, None] * R + left_k[None, :],
            mask=(i[:, None] < R) & (left_k[None, :] < R),
            other=0.0,
        )
        right_k = tl.arange(0, BLOCK_C)
        right_t = tl.load(  # right_t[k, j] = right[j, k]
            right_ptr + j[None, :] * C + right_k[:, None],
            mask=(right_k[:, None] < C) & (j[None, :] < C),
            other=0.0,
        )

        for r in range(ROWS_PER_PROGRAM):
            row = tl.program_id(0).to(tl.int64) * ROWS_PER_PROGRAM + r
            mask = tile_mask & (row < num_rows)
            x = tl.load(x_ptr + row * (R * C) + tile_offsets, mask=mask, other=0.0)
            x_right = tl.dot(x.to(tl.float32), right_t, input_precision=PRECISION)
            y = tl.dot(left, x_right, input_precision=PRECISION) * scale
            out_offsets = row * (R * C) + tile_offsets
            tl.store(out_ptr + out_offsets, y.to(out_ptr.dtype.element_ty), mask=mask)


def kron_transform(
    rows: torch.Tensor,
    left: torch.Tensor | None,
    right: torch.Tensor,
    scale: float = 1.0,
    precision: str | None = None,
) -> torch.Tensor:
    """scale * rows @ kron(left, right)^T (or scale * rows @ right^T without left).

    rows: contiguous [num_rows, n] float32/float16/bfloat16, n = left.shape[0] * right.shape[0].
    Returns a tensor of rows' shape and dtype. CUDA tensors, or CPU ones under TRITON_INTERPRET=1.
    precision: tl.dot's input_precision; None picks "tf32x3" where TF32 exists, else "ieee".
    """
    if triton is None:
        raise RuntimeError("kvbench.kernels.hadamard_triton needs triton: pip install triton")
    if precision is None:
        precision = _default_precision(rows.device)
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not one of {PRECISIONS}")
    if rows.dim() != 2 or not rows.is_contiguous():
        raise ValueError("rows must be a contiguous 2-D tensor [num_rows, n]")
    num_rows, n = rows.shape
    r = 1 if left is None else left.shape[0]
    c = right.shape[0]
    if r * c != n:
        raise ValueError(f"row length {n} is not {r} * {c}")
    if not fits(None if left is None else r, c):
        raise ValueError(f"matrices of order {r} and {c} exceed the kernel's tile ({MAX_BLOCK})")

    out = torch.empty_like(rows)
    if num_rows == 0:
        return out
    right = right.to(device=rows.device, dtype=torch.float32).contiguous()
    block_c = _block(c)
    if left is None:
        # Measured on an H100 (32768 rows, tf32x3): 128 x 128 tiles with 8 warps were 25x faster
        # at n = 128 than 32-row tiles with 4 warps, which spill. A decode step's few rows want
        # more, smaller programs: at n = 128, 256 rows (batch 8 x 32 heads) took 9.3 us in 128-row
        # tiles and 4.4 us in 16-row tiles with 8 warps; 6560 rows 10.0 us and 7.4 us in 64-row
        # tiles with 4 warps (session11/ab-prologue-operands-and-hadamard-tiles.json). 64-row tiles
        # up to 16384 rows: below that, 128-row tiles leave some of an H100's 132 SMs idle (at
        # 32768 rows they were 17% faster). Every tiling gave the same bits.
        if block_c < 128:
            block_m, num_warps = 64, 4
        elif num_rows <= 1024:
            block_m, num_warps = 16, 8
        elif num_rows <= 16384:
            block_m, num_warps = 64, 4
        else:
            block_m, num_warps = 128, 8
        grid = (triton.cdiv(num_rows, block_m),)
        _right_only_kernel[grid](
            rows, right, out, num_rows, scale,
            C=c, BLOCK_M=block_m, BLOCK_C=block_c, PRECISION=precision, num_warps=num_warps,
        )  # fmt: skip
    else:
        left = left.to(device=rows.device, dtype=torch.float32).contiguous()
        block_r = _block(r)
        tile = block_r * block_c
        # Several rows per program amortize loading the matrices for small tiles; for large ones
        # (>= 64 x 64) one row was faster on an H100, and 4 rows of a 64 x 128 tile overflow
        # shared memory.
        rows_per_program = 4 if tile <= 1024 and num_rows >= 4096 else 1
        grid = (triton.cdiv(num_rows, rows_per_program),)
        _kron_kernel[grid](
            rows, left, right, out, num_rows, scale,
            R=r, C=c, BLOCK_R=block_r, BLOCK_C=block_c,
            ROWS_PER_PROGRAM=rows_per_program, PRECISION=precision,
            num_warps=8 if tile >= 128 * 128 else 4,
        )  # fmt: skip
    return out
