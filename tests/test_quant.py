"""The shared quantizer against its float64 reference."""

import pytest
import torch

from kvbench.quant import QuantSpec, dequantize, fake_quantize, fake_quantize_reference, quantize
from tests.helpers import assert_matches_reference, sqnr_db


def _inputs(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    x[..., 1] *= 30.0  # an outlier channel
    x[..., -1] -= 12.0
    return x


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("integer_zero", [True, False])
@pytest.mark.parametrize("shape,group", [((2, 3, 7, 64), 64), ((1, 5, 128), 32), ((3, 33, 96), 16)])
def test_fake_quantize_matches_float64_reference(bits, integer_zero, shape, group):
    spec = QuantSpec(bits, group, clip_ratio=0.8 if bits == 2 else 1.0, integer_zero=integer_zero)
    x = _inputs(shape, seed=bits)
    assert_matches_reference(fake_quantize(x, spec), fake_quantize_reference(x, spec))


def test_error_shrinks_with_bits():
    # SQNR floors measured on these inputs (the outlier channel dominates the signal energy).
    x = _inputs((4, 256, 64))
    sqnr = [sqnr_db(x, fake_quantize(x, QuantSpec(bits, 64))) for bits in (2, 3, 4, 8)]
    assert sqnr == sorted(sqnr)
    assert min(s - f for s, f in zip(sqnr, (10.0, 12.5, 15.5, 39.0))) > 0, sqnr


def test_codes_in_range_and_metadata_is_fp16():
    spec = QuantSpec(3, 32)
    q = quantize(_inputs((2, 64)), spec)
    assert q.codes.dtype == torch.uint8 and int(q.codes.max()) <= 7
    assert q.scale.dtype == torch.float16 and q.zero.dtype == torch.float16
    assert q.scale.shape == (2, 2)
    # the 3-bit scale divides the range by 7 (2^3 - 1), not 8 (a bug of the official RotateKV code)
    x = torch.linspace(0, 7, 32).repeat(2, 2)
    assert torch.allclose(dequantize(quantize(x, spec), spec), torch.round(x), atol=1e-3)


def test_integer_zero_point_is_an_integer():
    q = quantize(_inputs((3, 128), seed=3), QuantSpec(2, 64))
    assert torch.equal(q.zero.float(), torch.round(q.zero.float()))


def test_constant_group_does_not_divide_by_zero():
    x = torch.full((2, 64), 3.25)
    assert torch.allclose(fake_quantize(x, QuantSpec(2, 64)), x, atol=1e-3)


def test_bits_per_element_counts_scale_and_zero():
    assert QuantSpec(2, 64).bits_per_element() == 2.5
    assert QuantSpec(4, 128).bits_per_element() == 4.25


@pytest.mark.parametrize("kwargs", [dict(bits=5, group_size=64), dict(bits=2, group_size=0), dict(bits=2, group_size=64, clip_ratio=1.5)])
def test_bad_specs_raise(kwargs):
    with pytest.raises(ValueError):
        QuantSpec(**kwargs)
