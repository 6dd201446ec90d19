"""Each method's simulated cache against a float64 reference written from its definition.

Inputs: outlier channels, an odd length, GQA (9 query heads over 3 KV heads), batch 2 with one
left-padded row. References use explicit matrices and loops; the caches use the fast paths.
"""

import math

import pytest
import torch

from kvbench.hadamard import hadamard_matrix
from kvbench.quant import QuantSpec, fake_quantize_reference
from kvbench.registry import methods
from kvbench.rope import apply_rope
from kvbench.rotation import grouped_hadamard, inverse_permutation, sink_tokens
from tests.helpers import GEOMETRY, assert_matches_reference, random_tokens

G = GEOMETRY


def _stored(method, new):
    cache = method.new_cache(0, G)
    cache.append(new)
    return cache


def test_fp16_stores_exactly():
    new = random_tokens()
    cache = _stored(methods.get("fp16")(), new)
    assert torch.equal(cache.k, new.k) and torch.equal(cache.v, new.v)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("keys", ["post_rope", "pre_rope"])
def test_rtn_matches_reference(bits, keys):
    new = random_tokens(seed=bits)
    method = methods.get("rtn")(bits=bits, group_size=32, keys=keys)
    cache = _stored(method, new)
    spec = QuantSpec(bits, 32)
    if keys == "pre_rope":
        ref_k = apply_rope(fake_quantize_reference(new.k_pre, spec), new.cos.double(), new.sin.double())
    else:
        ref_k = fake_quantize_reference(new.k, spec)
    assert_matches_reference(cache.k, ref_k)
    assert_matches_reference(cache.v, fake_quantize_reference(new.v, spec))


def test_quarot_matches_reference():
    new = random_tokens(seed=5)
    cache = _stored(methods.get("quarot")(bits=2, group_size=64), new)
    h = hadamard_matrix(64, torch.float64)
    spec = QuantSpec(2, 64)
    for got, x in ((cache.k, new.k), (cache.v, new.v)):
        ref = fake_quantize_reference(x.double() @ h.T, spec) @ h
        assert_matches_reference(got, ref)


def _reference_attention(q, keys_for, v_for, q_pos, k_pos, scaling):
    """Loop reference: keys_for(b, t, s) / v_for(b, t, s) give the vector query t sees for key s."""
    b_, hq, tq, d = q.shape
    groups = hq // G.num_kv_heads
    out = torch.zeros(b_, hq, tq, d, dtype=torch.float64)
    for b in range(b_):
        for t in range(tq):
            if q_pos[b, t] < 0:
                continue
            visible = [s for s in range(k_pos.shape[1]) if 0 <= k_pos[b, s] <= q_pos[b, t]]
            for h in range(hq):
                kv = h // groups
                ks = torch.stack([keys_for(b, t, s)[kv] for s in visible])
                vs = torch.stack([v_for(b, t, s)[kv] for s in visible])
                w = torch.softmax(ks @ q[b, h, t].double() * scaling, 0)
                out[b, h, t] = w @ vs
    return out


def test_kivi_attention_matches_per_query_reference():
    """At query t, keys below Q(t) = floor((t+1-R)/G)*G are quantized (whole groups), others exact."""
    group, residual = 8, 12
    new = random_tokens(length=45, pads=(0, 7), seed=11)
    method = methods.get("kivi")(bits=2, group_size=group, residual=residual)
    cache = _stored(method, new)
    q = torch.randn(2, G.num_heads, 45, G.head_dim, generator=torch.Generator().manual_seed(1))
    scaling = G.head_dim**-0.5
    out = cache.attend(q, new.positions, scaling)

    spec = QuantSpec(2, group, integer_zero=False)
    kq = torch.empty_like(new.k, dtype=torch.float64)
    for b, pad in enumerate((0, 7)):
        n = 45 - pad
        full = n // group * group
        keys = new.k[b, :, pad : pad + full].double()  # [H, full, D]
        grouped = keys.reshape(G.num_kv_heads, full // group, group, G.head_dim).transpose(-1, -2)
        kq[b, :, pad : pad + full] = fake_quantize_reference(grouped, spec).transpose(-1, -2).reshape(keys.shape)
    vq = fake_quantize_reference(new.v, spec)

    def boundary(b, t):
        return max(int(new.positions[b, t]) + 1 - residual, 0) // group * group

    def keys_for(b, t, s):
        return kq[b, :, s] if new.positions[b, s] < boundary(b, t) else new.k[b, :, s].double()

    def v_for(b, t, s):
        return vq[b, :, s] if new.positions[b, s] < boundary(b, t) else new.v[b, :, s].double()

    ref = _reference_attention(q, keys_for, v_for, new.positions, new.positions, scaling)
    real = new.positions >= 0
    assert torch.allclose(out.double()[real[:, None, :, None].expand_as(out)], ref[real[:, None, :, None].expand_as(ref)], atol=2e-4)


def test_kivi_decode_matches_prefill():
    """Appending token by token gives the same attention as one prefill (same boundaries)."""
    new = random_tokens(batch=1, length=30, pads=(0,), seed=2)
    method = methods.get("kivi")(bits=2, group_size=4, residual=8)
    q = torch.randn(1, G.num_heads, 30, G.head_dim, generator=torch.Generator().manual_seed(3))
    prefill = _stored(method, new).attend(q, new.positions, 0.125)
    cache = method.new_cache(0, G)
    outs = []
    for t in range(30):
        step = random_tokens(batch=1, length=30, pads=(0,), seed=2)
        for name in ("k_pre", "k", "v", "cos", "sin", "positions", "layer_input"):
            setattr(step, name, getattr(step, name)[:, :, t : t + 1] if name in ("k_pre", "k", "v") else getattr(step, name)[:, t : t + 1])
        cache.append(step)
        outs.append(cache.attend(q[:, :, t : t + 1], step.positions, 0.125))
    assert torch.allclose(torch.cat(outs, 2), prefill, atol=1e-5)


def _rotatekv_reference(method, new, perm, block):
    """k_stored = P . blockdiag(H) . k_pre, quantized per token; read: P^-1, H, RoPE. float64."""
    b, h, t, d = new.k_pre.shape
    x = new.k_pre.double().transpose(1, 2).reshape(b, t, h * d)
    hb = torch.block_diag(*[hadamard_matrix(block, torch.float64)] * (h * d // block))
    stored = (x @ hb.T)[..., perm]
    spec = QuantSpec(method.bits, method.resolved_group(G), method.resolved_clip())
    restored = fake_quantize_reference(stored, spec)[..., inverse_permutation(perm)] @ hb
    k = apply_rope(restored.reshape(b, t, h, d).transpose(1, 2), new.cos.double(), new.sin.double())
    hv = hadamard_matrix(d, torch.float64)
    v = fake_quantize_reference((new.v.double().transpose(1, 2).reshape(b, t, h * d).reshape(b, t, h, d) @ hv.T).reshape(b, t, h * d), spec)
    v = (v.reshape(b, t, h, d) @ hv).transpose(1, 2)
    return k, v


def test_rotatekv_matches_reference():
    new = random_tokens(seed=7)
    method = methods.get("rotatekv")(bits=2, sinks=0)
    perm = torch.randperm(G.kv_channels, generator=torch.Generator().manual_seed(0))
    method.load_calibration_state({"perm.0": perm})
    cache = _stored(method, new)
    ref_k, ref_v = _rotatekv_reference(method, new, perm, block=3 * 64)
    assert_matches_reference(cache.k, ref_k)
    assert_matches_reference(cache.v, ref_v)


def test_rotation_and_reorder_round_trip_is_identity():
    x = torch.randn(2, 11, G.kv_channels, dtype=torch.float64)
    perm = torch.randperm(G.kv_channels)
    stored = grouped_hadamard(x, 192)[..., perm]
    back = grouped_hadamard(stored[..., inverse_permutation(perm)], 192, inverse=True)
    assert torch.allclose(back, x, atol=1e-12)


def test_sink_detection_finds_planted_massive_activations():
    x = torch.randn(2, 50, 96)
    x[0, 0, 5] = 400.0
    x[0, 17, 9] = -350.0
    x[1, 30, 1] = 500.0
    x[1, 2, 2] = 900.0  # a padding position of row 1: never a sink
    valid = torch.ones(2, 50, dtype=torch.bool)
    valid[1, :4] = False
    sinks = sink_tokens(x, valid, count=2)
    assert sinks[0].nonzero().flatten().tolist() == [0, 17]
    assert sinks[1, 30] and not sinks[1, :4].any()


def _cache_kv(seed=9, **params):
    new = random_tokens(seed=seed)
    new.layer_input[0, 4, 0] = 1e4  # a massive activation in row 0, token 4
    new.layer_input[1, 20, 3] = 1e4
    method = methods.get("rotatekv")(**params)
    if method.reorder:
        method.load_calibration_state({"perm.0": torch.randperm(G.kv_channels, generator=torch.Generator().manual_seed(1))})
    cache = _stored(method, new)
    return new, cache.k, cache.v


def test_rotatekv_sinks_keep_their_tokens_exact_and_change_nothing_else():
    new, k_sink, v_sink = _cache_kv(sinks=1)  # the one planted activation per row
    _, k_none, v_none = _cache_kv(sinks=0)
    sink = torch.zeros(2, new.k.shape[2], dtype=torch.bool)
    sink[0, 4] = sink[1, 20] = True
    assert torch.equal(k_sink[:, :, sink[0]][0], new.k[0][:, sink[0]])
    mask = ~sink[:, None, :, None].expand_as(k_sink)
    assert torch.equal(k_sink[mask], k_none[mask]) and torch.equal(v_sink[mask], v_none[mask])
    assert not torch.equal(k_sink, k_none)


def test_rotatekv_reorder_changes_keys_only():
    _, k_on, v_on = _cache_kv(reorder=True, sinks=0)
    _, k_off, v_off = _cache_kv(reorder=False, sinks=0)
    assert not torch.equal(k_on, k_off)
    assert torch.equal(v_on, v_off)


def test_rotatekv_pre_rope_switch_changes_keys_only():
    _, k_pre, v_pre = _cache_kv(pre_rope=True, reorder=False, sinks=0)
    _, k_post, v_post = _cache_kv(pre_rope=False, reorder=False, sinks=0)
    assert not torch.equal(k_pre, k_post)
    assert torch.equal(v_pre, v_post)


def test_rotatekv_decode_tokens_are_always_quantized():
    new = random_tokens(batch=1, length=1, pads=(0,), prefill=False, start=40)
    new.layer_input[:] = 1e4
    method = methods.get("rotatekv")(reorder=False, sinks=20)
    cache = _stored(method, new)
    assert not torch.equal(cache.k, new.k)


def test_every_rotatekv_combination_runs():
    for reorder in (True, False):
        for pre_rope in (True, False):
            for sinks in (0, 20):
                for head_group in (1, 3):
                    _cache_kv(reorder=reorder, pre_rope=pre_rope, sinks=sinks, head_group=head_group, bits=3)


@pytest.mark.parametrize(
    "name,params,context,expected",
    [
        ("fp16", {}, 1024, 16.0),
        ("rtn", {"bits": 2, "group_size": 64}, 1024, 2.5),
        ("rtn", {"bits": 4, "group_size": 32}, 1024, 5.0),
        ("quarot", {"bits": 2, "group_size": 64}, 1024, 2.5),
        # 1024 - 128 = 896 quantized tokens (28 groups of 32) at 2 + 32/32 bits, 128 at 16 bits
        ("kivi", {"bits": 2, "group_size": 32, "residual": 128}, 1024, (896 * 3 + 128 * 16) / 1024),
        # 2048: 1920 quantized at 3 bits + 128 exact
        ("kivi", {"bits": 2, "group_size": 32, "residual": 128}, 2048, (1920 * 3 + 128 * 16) / 2048),
        # group 64 = head_dim: 2.5 bits; at most 20 sink tokens at 16 bits
        ("rotatekv", {"bits": 2}, 2048, (20 * 16 + 2028 * 2.5) / 2048),
        ("rotatekv", {"bits": 4, "sinks": 0}, 2048, 4.5),
    ],
)
def test_avg_bits_formula(name, params, context, expected):
    assert math.isclose(methods.get(name)(**params).avg_bits(G, context), expected)
