"""Hadamard matrices and transforms: orthonormality, symmetry, agreement with the explicit product
on every supported size up to 4096, dtypes, errors, and the Triton kernel under the interpreter."""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from kvbench import hadamard
from kvbench.hadamard import (
    hadamard_matrix,
    hadamard_transform,
    inverse_hadamard_transform,
    is_supported_size,
    supported_sizes_description,
)

POWERS_OF_TWO = [2**k for k in range(13)]  # 1 .. 4096
MIXED_SIZES = (
    [12 * 2**k for k in range(9)]  # 12 .. 3072
    + [20 * 2**k for k in range(8)]  # 20 .. 2560
    + [28 * 2**k for k in range(8)]  # 28 .. 3584
)
ALL_SIZES = POWERS_OF_TWO + MIXED_SIZES
# A full n^3 product is too slow for the big sizes (seconds each on 2 cores); above this their
# orthonormality follows from the Kronecker structure, plus a direct check on a sample of rows.
DIRECT_PRODUCT_MAX_SIZE = 1024
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True, scope="module")
def _free_cached_matrices():
    # The 2560..4096 float64 matrices take ~0.5 GiB in the cache; don't keep them for other tests.
    yield
    hadamard._cached_hadamard_matrix.cache_clear()


def _inputs_with_outliers(
    shape: tuple[int, ...], dtype: torch.dtype = torch.float64, seed: int = 0
) -> torch.Tensor:
    """Gaussian activations with a few large channels, the case rotations exist for."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    n = shape[-1]
    outliers = torch.randperm(n, generator=gen)[: max(1, n // 32)]
    x[..., outliers] *= 50.0
    return x.to(dtype)


@pytest.mark.parametrize("m", [12, 20, 28])
def test_base_matrices_are_symmetric_hadamard(m: int):
    signs = hadamard._sign_matrix(m)
    assert set(signs.unique().tolist()) == {-1.0, 1.0}
    eye = torch.eye(m, dtype=torch.float64)
    torch.testing.assert_close(signs @ signs.T, m * eye, rtol=0, atol=0)
    assert torch.equal(signs, signs.T)


def test_sylvester_order_without_signs():
    h4 = hadamard_matrix(4) * 2
    expected = torch.tensor(
        [[1, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]], dtype=torch.float64
    )
    assert torch.equal(h4, expected)
    # Row i, column j of the Sylvester matrix is (-1)^popcount(i & j).
    n = 64
    i = torch.arange(n)
    parity = torch.zeros(n, n, dtype=torch.long)
    and_ij = i[:, None] & i[None, :]
    for bit in range(6):
        parity += (and_ij >> bit) & 1
    torch.testing.assert_close(hadamard_matrix(n) * math.sqrt(n), (1 - 2 * (parity % 2)).double())


@pytest.mark.parametrize("n", ALL_SIZES)
def test_orthonormal_symmetric_and_self_inverse(n: int):
    h = hadamard_matrix(n)
    assert h.shape == (n, n) and h.dtype == torch.float64
    if n <= DIRECT_PRODUCT_MAX_SIZE:
        assert torch.equal(h, h.T)  # so x @ H.T and x @ H, forward and inverse, are one call
        assert (h.abs() - 1 / math.sqrt(n)).abs().max() < 1e-15
        torch.testing.assert_close(h @ h.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)
    else:
        # H = kron(H_r, H_c) up to rounding, and the factors (checked directly as sizes
        # <= 1024) are symmetric and orthonormal, so H = H^T and
        # H H^T = kron(H_r H_r^T, H_c H_c^T) = I.
        r, c = hadamard._kron_split(n)
        assert r <= DIRECT_PRODUCT_MAX_SIZE and c <= DIRECT_PRODUCT_MAX_SIZE
        kron = torch.kron(hadamard_matrix(r), hadamard_matrix(c))
        assert (h - kron).abs().max() < 1e-16
        del kron
        # And directly on a sample of rows.
        rows = torch.randperm(n, generator=torch.Generator().manual_seed(n))[:64]
        eye_rows = torch.eye(n, dtype=torch.float64)[rows]
        torch.testing.assert_close(h[rows] @ h.T, eye_rows, rtol=0, atol=1e-12)

    x = _inputs_with_outliers((3, 5, n), seed=n)
    y = hadamard_transform(x)
    torch.testing.assert_close(y, x @ h.T, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(inverse_hadamard_transform(y), x, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(inverse_hadamard_transform(y), y @ h, rtol=1e-12, atol=1e-10)
    # Orthonormal: norms are kept.
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-12, atol=0)
    if n > DIRECT_PRODUCT_MAX_SIZE:
        hadamard._cached_hadamard_matrix.cache_clear()  # 50-130 MiB each


@pytest.mark.parametrize("shape", [(7,), (1, 1), (2, 3, 4, 5)])
def test_leading_dims(shape: tuple[int, ...]):
    for n in (64, 192):
        x = _inputs_with_outliers((*shape, n))
        y = hadamard_transform(x)
        assert y.shape == x.shape
        torch.testing.assert_close(y, x @ hadamard_matrix(n).T, rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("n", [128, 192])
def test_non_contiguous_input(n: int):
    x = _inputs_with_outliers((n, 6)).T  # [6, n], last-dim stride 6
    expected = x @ hadamard_matrix(n)
    torch.testing.assert_close(hadamard_transform(x), expected, rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n", [64, 128, 192, 4096])
def test_low_precision_inputs_keep_dtype(dtype: torch.dtype, n: int):
    x = _inputs_with_outliers((4, n), dtype=dtype)
    y = hadamard_transform(x)
    assert y.dtype == dtype
    expected = (x.double() @ hadamard_matrix(n).T).to(dtype)
    # Computed in float32: at most about one rounding of the output dtype away.
    tolerance = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-5}[dtype]
    torch.testing.assert_close(y.float(), expected.float(), rtol=tolerance, atol=tolerance)


def test_matrix_dtype_device_and_cache():
    h32 = hadamard_matrix(192, dtype=torch.float32)
    assert h32.dtype == torch.float32 and h32.device.type == "cpu"
    assert hadamard_matrix(192, dtype=torch.float32, device="cpu") is h32
    torch.testing.assert_close(h32.double(), hadamard_matrix(192), rtol=1e-7, atol=0)


def test_supported_sizes():
    for n in ALL_SIZES + [8192, 12 * 1024]:
        assert is_supported_size(n)
    for n in [0, -4, 3, 6, 10, 36, 44, 60, 100, 1.0, True, 4 * 11]:
        assert not is_supported_size(n)


@pytest.mark.parametrize("n", [3, 6, 36, 100, 44])
def test_unsupported_sizes_raise(n: int):
    with pytest.raises(ValueError, match="supported sizes") as info:
        hadamard_matrix(n)
    assert "12" in str(info.value) and "power" in str(info.value)
    with pytest.raises(ValueError, match="supported sizes"):
        hadamard_transform(torch.zeros(2, n))
    assert "28" in supported_sizes_description()


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="backend"):
        hadamard_transform(torch.zeros(2, 8), backend="cuda")
    with pytest.raises(TypeError):
        hadamard_transform(torch.zeros(2, 8, dtype=torch.int32))
    # CUDA-only backends refuse CPU tensors rather than silently doing something else.
    if os.environ.get("TRITON_INTERPRET") != "1":
        with pytest.raises(ValueError, match="triton"):
            hadamard_transform(torch.zeros(2, 8), backend="triton")
    with pytest.raises(ValueError, match="fast_hadamard_transform"):
        hadamard_transform(torch.zeros(2, 8), backend="fast_hadamard_transform")


def test_auto_picks_torch_on_cpu():
    assert hadamard._auto_backend(torch.zeros(2, 64)) == "torch"


def _run_python(code: str, env_updates: dict[str, str]) -> subprocess.CompletedProcess:
    env = {**os.environ, **env_updates}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO_ROOT, env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_imports_without_triton_or_fast_hadamard_transform():
    # A None entry in sys.modules makes `import name` raise ImportError, as if not installed.
    code = """
        import sys
        sys.modules["triton"] = None
        sys.modules["fast_hadamard_transform"] = None
        import torch
        from kvbench.hadamard import hadamard_transform, hadamard_matrix
        from kvbench.kernels import hadamard_triton
        assert not hadamard_triton.is_available()
        x = torch.randn(3, 192, dtype=torch.float64)
        assert torch.allclose(hadamard_transform(x), x @ hadamard_matrix(192).T)
        try:
            hadamard_triton.kron_transform(x.float(), None, torch.ones(1, 1))
        except RuntimeError as error:
            assert "triton" in str(error)
        else:
            raise AssertionError("expected RuntimeError")
        print("OK")
    """
    result = _run_python(code, {})
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_triton_kernel_under_interpreter():
    # TRITON_INTERPRET must be set before triton is imported, and this process may have imported
    # it already: run in a fresh interpreter.
    code = """
        import torch
        from kvbench.hadamard import hadamard_transform
        gen = torch.Generator().manual_seed(0)
        # 64 and 128: one product with H_n over a block of rows; 12: padded to a 16-wide tile;
        # 192 = 12 x 16, 512 = 16 x 32, 160 = 20 x 8: the two-product Kronecker kernel.
        for n in (12, 64, 128, 160, 192, 512):
            x = torch.randn(3, 5, n, generator=gen)
            x[..., n // 3] *= 50.0  # an outlier channel
            out = hadamard_transform(x, backend="triton")
            ref = hadamard_transform(x, backend="torch")
            rel = ((out - ref).norm() / ref.norm()).item()
            assert out.shape == x.shape and out.dtype == torch.float32
            assert rel < 1e-5, (n, rel)
            half = hadamard_transform(x.half(), backend="triton")
            assert half.dtype == torch.float16
            assert torch.allclose(half.float(), ref.half().float(), rtol=2e-3, atol=2e-3), n
        print("OK")
    """
    result = _run_python(code, {"TRITON_INTERPRET": "1"})
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("n", [8, 64, 128, 192, 512, 3072, 4096])
def test_cuda_backends_match_torch(n: int):
    x = _inputs_with_outliers((33, n), dtype=torch.float32).cuda()
    ref = (x.double() @ hadamard_matrix(n, device="cuda").T).float()
    backends = ["auto", "torch"]
    from kvbench.kernels import hadamard_triton

    if hadamard_triton.is_available():
        backends.append("triton")
    if hadamard._fast_hadamard_transform_applies(x):
        backends.append("fast_hadamard_transform")
    for backend in backends:
        out = hadamard_transform(x, backend=backend)
        rel = ((out - ref).norm() / ref.norm()).item()
        assert rel < 1e-5, (backend, rel)
        half = hadamard_transform(x.half(), backend=backend)
        assert half.dtype == torch.float16
        torch.testing.assert_close(half.float(), ref.half().float(), rtol=2e-3, atol=5e-2)
