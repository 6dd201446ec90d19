"""The CUDA scores pass's dataflow on CPU: `emulate_scores` uses the kernel's own operands (the A
fragments from `query_operands`, which the kernel builds from two staged values a row, and the
packed group indices) and index maps, so these tests check everything but the CUDA source's
arithmetic, which `checks.check_rotatekv_scores_cuda` checks
on the GPU against the same emulation and the float64 reference."""

import math

import pytest
import torch

from kvbench.kernels import checks
from kvbench.kernels import rotatekv_scores_cuda as rc

SM = 128**-0.5 * 1.4426950408889634 / math.sqrt(512)


def _inputs(seed, b, hkv, cap, outliers=False):
    gen = torch.Generator().manual_seed(seed)
    kc, ks, kz, gid, *_, pos, cos, sin = checks.rotatekv_inputs(gen, b, hkv, 1, 128, cap, 2, 128, 4, "cpu")
    q = torch.randn(b, hkv, 128, generator=gen)
    if outliers:  # a few query channels 30x larger, as massive activations make them
        q[..., torch.randint(0, 128, (4,), generator=gen)] *= 30.0
    return q.half(), kc, ks, kz, gid, pos, cos, sin


@pytest.mark.parametrize("permuted", [True, False])
@pytest.mark.parametrize("b,hkv,cap,lens,outliers", [(2, 8, 37, [37, 20], False), (3, 32, 19, [19, 1, 8], True)])
def test_emulated_kernel_matches_float64_reference(permuted, b, hkv, cap, lens, outliers):
    q, kc, ks, kz, gid, pos, cos, sin = _inputs(7, b, hkv, cap, outliers)
    g = gid if permuted else None
    lengths = torch.tensor(lens)
    got = rc.emulate_scores(q, kc, ks, kz, g, lengths, pos, cos, sin, SM)
    want = checks.reference_rotatekv_scores(q, kc, ks, kz, g, pos, cos, sin, SM)
    valid = torch.arange(cap)[None, None, :] < lengths[:, None, None]
    assert torch.isneginf(got[~valid.expand_as(got)]).all()
    err = (got.double() - want)[valid.expand_as(got)].abs().max()
    assert err <= checks.REL_BOUND * want[valid.expand_as(want)].abs().max()


@pytest.mark.parametrize("permuted", [True, False])
@pytest.mark.parametrize("b,hkv,cap,lens,outliers", [(2, 8, 37, [37, 20], False), (3, 32, 19, [19, 1, 8], True)])
def test_emulated_post_rope_kernel_matches_float64_reference(permuted, b, hkv, cap, lens, outliers):
    """The POST build: H_128 q (rounded once to fp16), H_4's signs and the fp16 keys in one
    accumulating product, against q . H_512 k in float64 with no RoPE; and it must differ from the
    pre-RoPE scores (the keys' positions are not applied)."""
    q, kc, ks, kz, gid, pos, cos, sin = _inputs(9, b, hkv, cap, outliers)
    g = gid if permuted else None
    lengths = torch.tensor(lens)
    got = rc.emulate_scores(q, kc, ks, kz, g, lengths, pos, cos, sin, SM, pre_rope=False)
    want = checks.reference_rotatekv_scores(q, kc, ks, kz, g, pos, cos, sin, SM, pre_rope=False)
    valid = (torch.arange(cap)[None, None, :] < lengths[:, None, None]).expand_as(got)
    assert torch.isneginf(got[~valid]).all()
    err = (got.double() - want)[valid].abs().max()
    assert err <= checks.REL_BOUND * want[valid].abs().max()
    rope = checks.reference_rotatekv_scores(q, kc, ks, kz, g, pos, cos, sin, SM)
    assert (rope - want)[valid].abs().max() > 100 * err


def test_exact_arithmetic_leaves_only_operand_rounding():
    """Without the fp16 rounding of keys the emulation differs from float64 only by the fp16 query
    operands (a much tighter bound): the index maps themselves are exact."""
    q, kc, ks, kz, gid, pos, cos, sin = _inputs(8, 2, 8, 16)
    got = rc.emulate_scores(q, kc, ks, kz, gid, torch.tensor([16, 16]), pos, cos, sin, SM, fp16=False)
    want = checks.reference_rotatekv_scores(q, kc, ks, kz, gid, pos, cos, sin, SM)
    assert (got.double() - want).abs().max() <= 1e-3 * want.abs().max()


def test_query_fragments_are_two_values_times_the_lanes_column_signs():
    """The kernel does not load `query_operands`' fragments: its prologue builds them, per (head, a',
    row g, t1), from u = q_f + q_(f+64) (t1 = 0) or q_f - q_(f+64) and v = q_(f+64) - q_f or
    q_f + q_(f+64), each rounded once to fp16, XORing in the signs of H16[bu(g)] at the lane's
    columns 2t, 2t+1 (words 0 and 1) and 2t+8, 2t+9 (words 2 and 3). That identity
    (H16[bu | 4][k] = H16[bu][k] (-1)^(bit 2 of k), bit 2 of k = bit 1 of t for all four columns)
    must give the host's fragments bit for bit, extreme values included, up to the sign of a zero
    (where q_f = -q_(f+64) the XOR gives -0 and the host +0: the same in every product sum, the
    accumulator starting at +0; the GPU check found the scores bit-identical)."""
    gen = torch.Generator().manual_seed(11)
    q = (torch.randn(2, 8, 128, generator=gen) * 4).half()
    q[0, 0, 3], q[0, 0, 67], q[1, 2, 10], q[1, 2, 74] = 6e4, -3e-5, 1.5, -1.5  # overflow-edge and q_f = -q_(f+64)
    want = rc.query_operands(q).view(torch.float16).reshape(2, 8, 8, 32, 8)  # [B, H, a', lane, half]
    qf = q.float()
    got = torch.empty_like(want)
    for lane in range(32):
        g, t = lane // 4, lane % 4
        t1 = t >> 1
        bu = 8 * (g >> 2) + 2 * ((g >> 1) & 1) + (g & 1)
        sign = [(-1.0) ** bin(bu & k).count("1") for k in (2 * t, 2 * t + 1, 2 * t + 8, 2 * t + 9)]
        for ap in range(8):
            f = rc.freq_of(ap, g)
            a, c = qf[..., f], qf[..., f + 64]
            u = (a - c if t1 else a + c).half()
            v = (a + c if t1 else c - a).half()
            # halves: (g, 2t) (g, 2t+1) (g+8, 2t) (g+8, 2t+1) (g, 2t+8) (g, 2t+9) (g+8, 2t+8) (g+8, 2t+9)
            for e, (val, s) in enumerate(((u, 0), (u, 1), (v, 0), (v, 1), (u, 2), (u, 3), (v, 2), (v, 3))):
                got[:, :, ap, lane, e] = val * sign[s]
    differ = got.view(torch.int16) != want.view(torch.int16)
    assert torch.equal(got, want) and differ.any()  # the planted q_f = -q_(f+64) makes the signed zeros
    assert (got[differ] == 0).all()


def test_group_offsets_hold_each_elements_group_in_the_kernels_order():
    gen = torch.Generator().manual_seed(0)
    gid = (torch.randperm(2 * 512, generator=gen) // 128).to(torch.int32)
    off = rc.group_offsets(gid, 2)
    assert off.shape == (2, 4, 32) and off.dtype == torch.int32
    grp = off.view(torch.uint8).reshape(2, 4, 128).long()  # [head group, t, element]
    # element e of quad position t: channel j = 32 t + 16 k3 + 8 k0 + a of head slot h', e = (h' 8 + a) 4 + 2 k3 + k0
    for hp, a, k3, k0, t in ((2, 5, 1, 0, 3), (0, 0, 0, 0, 0), (3, 7, 1, 1, 2)):
        e = (hp * 8 + a) * 4 + 2 * k3 + k0
        assert int(grp[1, t, e]) == int(gid[512 + hp * 128 + 32 * t + 16 * k3 + 8 * k0 + a])
    assert sorted(grp[0].reshape(-1).tolist()) == sorted(gid[:512].tolist())  # every channel once


def test_group_offsets_refuse_more_than_64_groups():
    with pytest.raises(ValueError, match="64 key groups"):
        rc.group_offsets(torch.arange(512, dtype=torch.int32) // 4, 1)  # 128 groups


def test_source_is_specialized_and_checked():
    src = rc.source(32, min_blocks=2)
    assert "#define NQ 32" in src and "__launch_bounds__(128, 2)" in src and "__NQ__" not in src
    assert "#define POST 0" in src
    post = rc.source(32, post_rope=True)
    assert "#define POST 1" in post and f"__launch_bounds__(128, {rc.MIN_BLOCKS_POST})" in post
    with pytest.raises(ValueError, match="multiple of 8"):
        rc.source(12)


@pytest.mark.parametrize("pre_rope", [True, False])
def test_cuda_scores_refused_cleanly_off_gpu(pre_rope):
    from kvbench.kernels.decode_rotatekv_mha import decode_rotatekv_mha

    gen = torch.Generator().manual_seed(1)
    kc, ks, kz, gid, vc, vs, vz, pos, cos, sin = checks.rotatekv_inputs(gen, 1, 4, 1, 128, 8, 2, 128, 4, "cpu")
    q = torch.randn(1, 4, 128).half()
    with pytest.raises(ValueError, match="CUDA scores kernel needs"):
        decode_rotatekv_mha(q, kc, ks, kz, gid, vc, vs, vz, torch.tensor([8]), pos, cos, sin, 0.1, bits=2,
                            group_size=128, head_group=4, scores_impl="cuda", pre_rope=pre_rope)


def test_both_key_kinds_are_supported_and_other_shapes_are_not():
    assert rc.supports(1, 128, 2, 4, 32, pre_rope=True) and rc.supports(1, 128, 2, 4, 32, pre_rope=False)
    assert not rc.supports(4, 128, 2, 4, 32) and not rc.supports(1, 64, 2, 4, 32)
    assert not rc.supports(1, 128, 4, 4, 32) and not rc.supports(1, 128, 2, 2, 32)
    assert not rc.supports(1, 128, 2, 4, 12) and not rc.supports(1, 128, 2, 4, 128)


@pytest.mark.parametrize("group,split_len,integer_zero", [(128, 64, True), (64, 192, True), (64, 128, False)])
def test_values_emulation_matches_float64_reference(group, split_len, integer_zero):
    """`values_cuda`'s arithmetic (fp16 weights p s on codes minus integer zeros, or plus p z for
    KIVI's float zeros; sum p; per split) against softmax(2**scores) @ dequantized values, merged
    over splits."""
    from kvbench.kernels import reference as ref
    from kvbench.kernels import values_cuda as vc

    gen = torch.Generator().manual_seed(2)
    b, h, cap = 2, 3, 300
    lengths = torch.tensor([300, 77])
    vcodes, vscale, vzero = checks._store(gen, b, h, cap, 128, 2, group, "cpu", float_zero=not integer_zero)
    scores = torch.randn(b, h, cap, generator=gen) * 3
    o, lse = vc.emulate_values(scores, vcodes, vscale, vzero, lengths, group_size=group, split_len=split_len,
                               integer_zero=integer_zero)
    got = ref.merge_partials([(o, lse)])
    v = ref.unpack_per_token(vcodes, vscale, vzero, 2, group, integer_zero).double()
    valid = torch.arange(cap)[None, None, :] < lengths[:, None, None]
    ln = torch.where(valid, scores.double() * math.log(2.0), torch.tensor(float("-inf"), dtype=torch.float64))
    want = (torch.softmax(ln, -1)[..., None] * v).sum(2)
    assert (got.double() - want).abs().max() <= checks.REL_BOUND * want.abs().max()
    assert torch.allclose(torch.logsumexp(lse.double(), -1), torch.logsumexp(ln, -1), atol=1e-5)


def test_values_source_is_specialized():
    from kvbench.kernels import values_cuda as vc

    assert "#define NG 2" in vc.source(2) and "__NG__" not in vc.source(1)
    src = vc.source(1, tiles=8, integer_zero=False)
    assert "#define U 8" in src and "#define INTZ 0" in src and "__" + "U__" not in src
    with pytest.raises(ValueError, match="tiles"):
        vc.source(1, tiles=3)
    assert vc.supports(128, 2, 64) and not vc.supports(64, 2, 64) and not vc.supports(128, 4, 64)
