"""The per-token CUDA key pass's dataflow on CPU: `emulate_scores` uses the kernel's own query operand
(`query_operand`), channel map and group sums, so these tests check everything but the CUDA
source's arithmetic, which `checks.check_token_scores_cuda` checks on the GPU against the same
emulation and float64 scores."""

import pytest
import torch

from kvbench.kernels import checks
from kvbench.kernels import reference as ref
from kvbench.kernels import token_scores_cuda as tc

SM = 128**-0.5 * 1.4426950408889634


def test_channel_map_is_the_plane_layout_and_a_permutation():
    ch = tc.channel_map()  # [8 products, 4 lanes, 4 halves]
    assert sorted(ch.flatten().tolist()) == list(range(128))
    # product m = 2 jb + hp, lane t, half (k = 2t + e or 2t + 8 + e): byte jb of word 2t + e, plane 2 hp (+1)
    m, t, e = 5, 3, 1
    jb, hp = m // 2, m % 2
    assert int(ch[m, t, e]) == 32 * (2 * hp) + 4 * (2 * t + e) + jb
    assert int(ch[m, t, 2 + e]) == 32 * (2 * hp + 1) + 4 * (2 * t + e) + jb


@pytest.mark.parametrize("group", [32, 64, 128])
def test_query_operand_rows_hold_their_group_only(group):
    q = torch.randn(2, 3, 128).half()
    op = tc.query_operand(q, group)  # [B, H, 8, NG, 4, 4]
    ng = 128 // group
    assert op.shape == (2, 3, 8, ng, 4, 4)
    ch = tc.channel_map()
    for r in range(ng):
        want = torch.where((ch // group == r)[None, None], q[..., ch], torch.zeros((), dtype=q.dtype))
        assert torch.equal(op[:, :, :, r], want)
    assert torch.equal(op.sum(3), q[..., ch])  # every channel in exactly one row


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("b,h,cap,lens", [(2, 3, 37, [37, 20]), (3, 8, 19, [19, 1, 8])])
def test_emulated_kernel_matches_float64_reference(group, b, h, cap, lens):
    gen = torch.Generator().manual_seed(group + cap)
    kc, ks, kz = checks._store(gen, b, h, cap, 128, 2, group, "cpu")
    q = torch.randn(b, h, 128, generator=gen)
    q[..., 7] *= 30.0  # an outlier query channel
    q = q.half()
    lengths = torch.tensor(lens)
    got = tc.emulate_scores(q, kc, ks, kz, lengths, SM, group_size=group)
    k = ref.unpack_per_token(kc, ks, kz, 2, group, True).double()
    want = torch.einsum("bhd,bhcd->bhc", q.double(), k) * SM
    valid = (torch.arange(cap)[None, None, :] < lengths[:, None, None]).expand_as(got)
    assert torch.isneginf(got[~valid]).all()
    # exact codes, fp16 query as given, fp32 products: only float32 rounding remains
    assert (got.double() - want)[valid].abs().max() <= 1e-5 * want[valid].abs().max()


def test_source_is_specialized_and_checked():
    src = tc.source(4, tiles=2)
    assert "#define NG 4" in src and "#define U 2" in src and "__NG__" not in src
    with pytest.raises(ValueError, match="groups a row"):
        tc.source(3)


def test_cuda_read_refused_cleanly_off_gpu():
    from kvbench.kernels import decode_mha

    gen = torch.Generator().manual_seed(1)
    k = checks._store(gen, 1, 2, 16, 128, 2, 64, "cpu")
    v = checks._store(gen, 1, 2, 16, 128, 2, 64, "cpu")
    q = torch.randn(1, 2, 128).half()
    with pytest.raises(ValueError, match="the CUDA read needs"):
        decode_mha.decode_per_token_mha(q, *k, *v, torch.tensor([16]), 0.1, bits=2, group_size=64, impl="cuda")
    with pytest.raises(ValueError, match="impl must be"):
        decode_mha.decode_per_token_mha(q, *k, *v, torch.tensor([16]), 0.1, bits=2, group_size=64, impl="fast")


@pytest.mark.parametrize("b,h,capg,nq", [(2, 3, 5, [160, 64]), (3, 2, 3, [96, 0, 32])])
def test_kivi_emulated_key_pass_matches_float64_reference(b, h, capg, nq):
    """`kivi_scores_cuda.emulate_scores` (fp16 q s per group and channel on exact codes, fp32 bias)
    against float64 q . dequantized keys; -inf past each row's quantized tokens."""
    from kvbench.kernels import kivi_scores_cuda as kq
    from kvbench.quant import QuantSpec, Quantized, dequantize

    gen = torch.Generator().manual_seed(capg)
    kc, ks, kz, _ = checks._kivi_store(gen, b, h, capg, 128, 2, 32, "cpu")
    q = checks._query(gen, b, h, 128, "cpu").half()
    nq = torch.tensor(nq)
    got = kq.emulate_scores(q, kc, ks, kz, nq, SM)
    k = dequantize(Quantized(ref.unpack(kc, 2, 32), ks[..., None], kz[..., None]), QuantSpec(2, 32, integer_zero=False))
    want = torch.einsum("bhd,bhgdt->bhgt", q.double(), k.double()).reshape(b, h, capg * 32) * SM
    valid = (torch.arange(capg * 32)[None, None] < nq[:, None, None]).expand_as(got)
    assert torch.isneginf(got[~valid]).all()
    assert (got.double() - want)[valid].abs().max() <= checks.REL_BOUND * want[valid].abs().max()


@pytest.mark.parametrize("option,match", [(dict(scores_impl="cuda"), "CUDA key pass needs"),
                                          (dict(values_impl="cuda"), "CUDA values pass needs"),
                                          (dict(values_impl="fast"), "values_impl must be"),
                                          (dict(scores_impl="fast"), "scores_impl must be")])
def test_kivi_cuda_passes_refused_cleanly_off_gpu(option, match):
    from kvbench.kernels import decode_kivi_mha as km

    gen = torch.Generator().manual_seed(3)
    kc, ks, kz, v = checks._kivi_store(gen, 1, 2, 2, 128, 2, 32, "cpu")
    q = torch.randn(1, 2, 128).half()
    with pytest.raises(ValueError, match=match):
        km.decode_kivi_mha(q, kc, ks, kz, *v, torch.tensor([64]), 0.1, bits=2, group_size=32, **option)
