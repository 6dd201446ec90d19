"""Orthonormal Walsh-Hadamard transforms for the head and hidden sizes real models use.

Supported sizes n:

* n = 2^k: the Sylvester matrix, H_1 = [1], H_2n = [[H, H], [H, -H]], in natural (Sylvester)
  order, scaled by 1/sqrt(n). No random signs: a method that wants a randomized Hadamard
  multiplies by its own sign vector.
* n = m * 2^k for m in {12, 20, 28}: H_n = kron(H_m, H_{2^k}) / sqrt(n), with H_m the Paley II
  matrix built from GF(q), q = m/2 - 1 (q = 5, 9 = 3^2, 13). SmolLM2's 192 = 12 * 16 needs this.

The transform is `y = x @ H.T` along the last dim and its inverse is `x = y @ H`. Every matrix
built here is symmetric (Sylvester matrices are; Paley II matrices are by construction, see
`_paley2_sign_matrix`), so H.T == H == H^-1 and the transform is its own inverse:
`inverse_hadamard_transform` is the same call, kept so call sites say what they mean. The tests
pin the symmetry, so anyone swapping in a non-symmetric H_m finds out.

Backends of `hadamard_transform`:

* "torch": plain torch on any device. n <= 128 is one matmul with H; larger n uses the Kronecker
  structure H_n = kron(H_r, H_c), n = r * c, as two small matmuls (O(n * (r + c)) work instead of
  O(n^2)), which is faster on CPU than a log2(n)-pass butterfly made of reshapes.
  On CUDA, fp32 matmuls follow torch's TF32 setting (`torch.backends.cuda.matmul.allow_tf32`).
* "fast_hadamard_transform": Dao-AILab's CUDA package, used for powers of two only (8 <= n <=
  32768): it is documented to equal scipy.linalg.hadamard, i.e. our Sylvester matrix, while its
  12N/20N/28N kernels use different H_m matrices and would give different numbers than ours.
* "triton": `kvbench.kernels.hadamard_triton`, the same Kronecker factorization as two tl.dot
  products per tile (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1; n up to 16384).
  On an H100 it is at or near copy speed for n = 64 and ~1.5x faster than "torch" for
  n = 192..16384, with float32 accuracy (relative error ~1e-7).
* "auto": fast_hadamard_transform where it applies, else triton on CUDA, else torch.

Half-precision inputs are computed in float32 and returned in their own dtype. Nothing here
imports triton or fast_hadamard_transform until a backend needs it, so the module imports on a
CPU-only machine.
"""

from __future__ import annotations

import functools
import math
import os

import torch

__all__ = [
    "hadamard_matrix",
    "hadamard_transform",
    "inverse_hadamard_transform",
    "is_supported_size",
    "supported_sizes_description",
]

#: Orders of the non-power-of-two base matrices, m in n = m * 2^k.
BASE_ORDERS = (12, 20, 28)
BACKENDS = ("auto", "torch", "fast_hadamard_transform", "triton")

# Up to this size the torch backend multiplies by the full matrix: one GEMM beats two small ones.
_SINGLE_MATMUL_MAX_SIZE = 128
# fast_hadamard_transform pads sizes that are not a multiple of 8 and stops at 32768.
_FHT_MIN_SIZE, _FHT_MAX_SIZE = 8, 32768
_HALF_DTYPES = (torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------------
# Sizes


def _split_size(n: int) -> tuple[int, int] | None:
    """n = m * p with m in {1, 12, 20, 28} and p a power of two, or None if n has no such form."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        return None
    p = n & -n  # largest power of two dividing n
    m = n // p
    if m == 1:
        return 1, p
    # m is odd here; the base order is 4 * m (12 = 4 * 3, ...), so p must supply the factor 4.
    if 4 * m in BASE_ORDERS and p >= 4:
        return 4 * m, p // 4
    return None


def is_supported_size(n: int) -> bool:
    """Whether `hadamard_matrix(n)` exists here: n = 2^k or n = m * 2^k with m in {12, 20, 28}."""
    return _split_size(n) is not None


def supported_sizes_description() -> str:
    return (
        "powers of two (1, 2, 4, ..., 64, 128, ...) and m * 2^k for m in "
        f"{{{', '.join(map(str, BASE_ORDERS))}}} (12, 24, 48, 96, 192, ...; 20, 40, 80, ...; "
        "28, 56, 112, ...)"
    )


def _check_size(n: int) -> tuple[int, int]:
    split = _split_size(n)
    if split is None:
        raise ValueError(
            f"no Hadamard matrix of size {n} here; supported sizes are "
            f"{supported_sizes_description()}"
        )
    return split


def _kron_split(n: int) -> tuple[int, int]:
    """n = r * c with c a power of two near sqrt(n), so that H_n = kron(H_r, H_c).

    Valid because H_{m * 2^k} = kron(H_m, H_{2^a}, H_{2^b}) for a + b = k (Sylvester matrices are
    Kronecker powers of H_2), and kron(H_m, H_{2^a}) is our H_r.
    """
    _, p = _check_size(n)
    c = min(p, 1 << math.ceil(math.log2(n) / 2))
    return n // c, c


# --------------------------------------------------------------------------------------------
# Matrices


def _sylvester_sign_matrix(n: int) -> torch.Tensor:
    """The +-1 Sylvester matrix of order n = 2^k, float64 on CPU."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], dim=1), torch.cat([h, -h], dim=1)], dim=0)
    return h


# GF(q) for the three Paley II matrices we need: q = 5 and 13 are prime; GF(9) is GF(3)[t] modulo
# t^2 + 1 (irreducible since -1 is not a square mod 3). Elements are tuples of coefficients.
_PALEY2_FIELDS = {12: (5, 1), 20: (3, 2), 28: (13, 1)}  # order m: (p, k), q = p^k = m / 2 - 1


def _field_elements(p: int, k: int) -> list[tuple[int, ...]]:
    if k == 1:
        return [(a,) for a in range(p)]
    return [(a0, a1) for a1 in range(p) for a0 in range(p)]  # a0 + a1 * t


def _field_sub(a: tuple[int, ...], b: tuple[int, ...], p: int) -> tuple[int, ...]:
    return tuple((ai - bi) % p for ai, bi in zip(a, b))


def _field_mul(a: tuple[int, ...], b: tuple[int, ...], p: int) -> tuple[int, ...]:
    if len(a) == 1:
        return ((a[0] * b[0]) % p,)
    # (a0 + a1 t)(b0 + b1 t) with t^2 = -1
    return ((a[0] * b[0] - a[1] * b[1]) % p, (a[0] * b[1] + a[1] * b[0]) % p)


def _paley2_sign_matrix(m: int) -> torch.Tensor:
    """The symmetric +-1 Hadamard matrix of order m = 2(q + 1) from Paley's construction II.

    Q is the Jacobsthal matrix Q[a, b] = chi(a - b) of GF(q), chi the quadratic character; for
    q = 1 mod 4, chi(-1) = 1 so Q is symmetric. C = [[0, 1^T], [1, Q]] is symmetric with
    C C^T = q I, and H = kron(C, [[1, 1], [1, -1]]) + kron(I, [[1, -1], [-1, -1]]) is a symmetric
    Hadamard matrix of order 2(q + 1).
    """
    p, k = _PALEY2_FIELDS[m]
    elements = _field_elements(p, k)
    zero = elements[0]
    squares = {_field_mul(a, a, p) for a in elements if a != zero}

    def chi(a: tuple[int, ...]) -> int:
        return 0 if a == zero else (1 if a in squares else -1)

    q = len(elements)
    jacobsthal = torch.tensor(
        [[chi(_field_sub(a, b, p)) for b in elements] for a in elements], dtype=torch.float64
    )
    conference = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    conference[0, 1:] = 1
    conference[1:, 0] = 1
    conference[1:, 1:] = jacobsthal
    h2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    fill = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    eye = torch.eye(q + 1, dtype=torch.float64)
    return torch.kron(conference, h2) + torch.kron(eye, fill)


def _sign_matrix(n: int) -> torch.Tensor:
    """The unnormalized +-1 matrix H_n (float64, CPU). Kernels use it: +-1 is exact in any dtype.

    Not cached: callers cache what they keep (a 4096 x 4096 float64 matrix is 128 MiB).
    """
    m, p = _check_size(n)
    if n > _SINGLE_MATMUL_MAX_SIZE:
        # One Kronecker product of two small matrices: a single pass over the big one.
        r, c = _kron_split(n)
        return torch.kron(_sign_matrix(r), _sign_matrix(c))
    sylvester = _sylvester_sign_matrix(p)
    return sylvester if m == 1 else torch.kron(_paley2_sign_matrix(m), sylvester)


@functools.lru_cache(maxsize=None)
def _cached_hadamard_matrix(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # Scale in float64 before casting, so each dtype gets the correctly rounded 1/sqrt(n).
    return (_sign_matrix(n) / math.sqrt(n)).to(dtype=dtype, device=device)


def hadamard_matrix(
    n: int, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None
) -> torch.Tensor:
    """The orthonormal, symmetric n x n Hadamard matrix (cached: do not modify it in place)."""
    _check_size(n)
    return _cached_hadamard_matrix(n, dtype, torch.device(device if device is not None else "cpu"))


# --------------------------------------------------------------------------------------------
# Backends


def _torch_transform(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[-1]
    compute_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    rows = x.reshape(-1, n).to(compute_dtype)
    if n <= _SINGLE_MATMUL_MAX_SIZE:
        out = rows @ hadamard_matrix(n, compute_dtype, x.device).T
    else:
        # x @ kron(L, R)^T, with each row viewed as an r x c matrix X (row-major), is L X R^T.
        r, c = _kron_split(n)
        left = hadamard_matrix(r, compute_dtype, x.device)
        right = hadamard_matrix(c, compute_dtype, x.device)
        out = torch.matmul(left, rows.reshape(-1, r, c) @ right.T)
    return out.reshape(x.shape).to(x.dtype)


@functools.lru_cache(maxsize=None)
def _fast_hadamard_transform_module():
    """The Dao-AILab package if it imports (it needs CUDA and a compiled extension), else None."""
    try:
        import fast_hadamard_transform
    except ImportError:
        return None
    return fast_hadamard_transform


def _fast_hadamard_transform_applies(x: torch.Tensor) -> bool:
    n = x.shape[-1]
    return (
        x.is_cuda
        and x.dtype in (torch.float32, *_HALF_DTYPES)
        and n & (n - 1) == 0
        and _FHT_MIN_SIZE <= n <= _FHT_MAX_SIZE
        and _fast_hadamard_transform_module() is not None
    )


def _fast_hadamard_transform(x: torch.Tensor) -> torch.Tensor:
    if not _fast_hadamard_transform_applies(x):
        raise ValueError(
            "backend 'fast_hadamard_transform' needs the package installed, a CUDA tensor of "
            f"float32/float16/bfloat16 and a power-of-two size in [{_FHT_MIN_SIZE}, "
            f"{_FHT_MAX_SIZE}]; got size {x.shape[-1]}, {x.dtype} on {x.device}"
        )
    # It accumulates in float32 internally and returns the input dtype.
    return _fast_hadamard_transform_module().hadamard_transform(x, 1.0 / math.sqrt(x.shape[-1]))


def _triton_runs_on(x: torch.Tensor) -> bool:
    return x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def _triton_factor_sizes(n: int) -> tuple[int | None, int]:
    """(r, c) with H_n = kron(H_r, H_c) for the kernel; r None means one matmul with H_n."""
    if n <= _SINGLE_MATMUL_MAX_SIZE:
        return None, n
    return _kron_split(n)


@functools.lru_cache(maxsize=None)
def _device_sign_matrix(n: int, device: torch.device) -> torch.Tensor:
    # float32 copy on the kernel's device, so a call does not copy from the host.
    return _sign_matrix(n).to(dtype=torch.float32, device=device)


def _triton_applies(x: torch.Tensor) -> bool:
    from kvbench.kernels import hadamard_triton

    return (
        _triton_runs_on(x)
        and x.dtype in (torch.float32, *_HALF_DTYPES)
        and hadamard_triton.is_available()
        and hadamard_triton.fits(*_triton_factor_sizes(x.shape[-1]))
    )


def _triton_transform(x: torch.Tensor) -> torch.Tensor:
    from kvbench.kernels import hadamard_triton

    if not _triton_applies(x):
        raise ValueError(
            "backend 'triton' needs triton, a CUDA tensor (or TRITON_INTERPRET=1), "
            "float32/float16/bfloat16 and a size that fits the kernel's tile; got size "
            f"{x.shape[-1]}, {x.dtype} on {x.device}; backend 'torch' takes any"
        )
    n = x.shape[-1]
    r, c = _triton_factor_sizes(n)
    left = None if r is None else _device_sign_matrix(r, x.device)
    right = _device_sign_matrix(c, x.device)
    rows = x.reshape(-1, n).contiguous()
    out = hadamard_triton.kron_transform(rows, left, right, scale=1.0 / math.sqrt(n))
    return out.reshape(x.shape)


def _auto_backend(x: torch.Tensor) -> str:
    if _fast_hadamard_transform_applies(x):
        return "fast_hadamard_transform"
    # x.is_cuda first: "auto" never picks the interpreter for CPU tensors.
    if x.is_cuda and _triton_applies(x):
        return "triton"
    return "torch"


# --------------------------------------------------------------------------------------------
# Public transforms


def hadamard_transform(x: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """`x @ H_n.T` along the last dim (n = x.shape[-1]), in x's dtype, for any leading dims."""
    _check_size(x.shape[-1])
    if not x.is_floating_point():
        raise TypeError(f"hadamard_transform needs a floating-point tensor, got {x.dtype}")
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")
    if backend == "auto":
        backend = _auto_backend(x)
    if backend == "fast_hadamard_transform":
        return _fast_hadamard_transform(x)
    if backend == "triton":
        return _triton_transform(x)
    return _torch_transform(x)


def inverse_hadamard_transform(x: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """`x @ H_n`, undoing `hadamard_transform`. H_n is symmetric and orthonormal, so this is the
    forward transform again."""
    return hadamard_transform(x, backend=backend)
