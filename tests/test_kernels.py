"""Triton decode/write kernels against their plain-torch references.

On CPU they run under TRITON_INTERPRET=1 in a subprocess (the variable must be set before triton
is imported, and other tests import it first), on small shapes: lengths that are not multiples
of the block or group sizes, batch > 1 with per-row lengths, GQA, outliers. Bounds (see
kvbench/kernels/checks.py): max |kernel - reference| <= 2e-3 * max |reference| on attention
outputs, lse within 1e-3 relative; the write kernel's codes, scales and zeros equal the torch
quantizer's exactly. GPU tests (same checks on bigger shapes) are marked cuda and skipped
without CUDA.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_TRITON = importlib.util.find_spec("triton") is not None

_SCRIPT = r"""
import json, sys
from kvbench.kernels import checks, rotatekv_write
what = sys.argv[1]
fn = {"per_token": checks.check_per_token, "per_token_mha": checks.check_per_token_mha, "kivi": checks.check_kivi,
      "kivi_mha": checks.check_kivi_mha, "rotatekv": checks.check_rotatekv,
      "rotatekv_mha": checks.check_rotatekv_mha, "packed": checks.check_packed_caches, "write": checks.check_write,
      "append": checks.check_fused_append, "fp_partial": checks.check_fp_partial, "merge": checks.check_merge,
      "glue": checks.check_glue,
      "rotatekv_write": rotatekv_write.check_rotatekv_write,
      "rotatekv_append": rotatekv_write.check_rotatekv_append}[what]
print("RESULTS" + json.dumps(fn("cpu")))
"""


def _interpret(what: str) -> list[dict]:
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, what], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULTS")][-1]
    return json.loads(line[len("RESULTS"):])


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("what", ["per_token", "per_token_mha", "kivi", "kivi_mha", "rotatekv", "rotatekv_mha", "packed",
                                  "write", "append", "fp_partial", "merge", "glue", "rotatekv_write",
                                  "rotatekv_append"])
def test_kernels_interpreted(what):
    results = _interpret(what)
    assert results
    bad = [r for r in results if not r["ok"]]
    assert not bad, bad


def test_imports_without_triton_calls_raise():
    # The modules import anywhere; calling a kernel without triton raises a clear error.
    from kvbench.kernels import decode_attention, quant_write

    if decode_attention.is_available():
        pytest.skip("triton is installed here")
    with pytest.raises(RuntimeError, match="triton"):
        decode_attention.decode_per_token(*([None] * 9), 1.0, bits=2, group_size=32)
    with pytest.raises(RuntimeError, match="triton"):
        quant_write.quantize_pack_rows(torch.zeros(1, 64), bits=2, group_size=32)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_rotatekv_mha_options_that_do_not_apply_are_refused():
    # f16_dequant and maxnreg tune the two-pass read's scores kernel: asking for them where they
    # would be ignored is an error, raised before any launch
    from kvbench.kernels.decode_rotatekv_mha import decode_rotatekv_mha

    b, h, d, cap = 1, 4, 64, 8
    kc = torch.zeros(b, 1, cap, d, dtype=torch.uint8)
    scale = torch.ones(b, 1, cap, h, dtype=torch.float16)
    vc = torch.zeros(b, h, cap, d // 4, dtype=torch.uint8)
    vs = torch.ones(b, h, cap, 1, dtype=torch.float16)
    common = (torch.zeros(b, h, d, dtype=torch.float16), kc, scale, scale, None, vc, vs, vs,
              torch.full((b,), cap), torch.zeros(b, cap, dtype=torch.int32), None, None, d**-0.5)
    kw = dict(bits=2, group_size=d, head_group=4)
    with pytest.raises(ValueError, match="two-pass"):
        decode_rotatekv_mha(*common, **kw, two_pass=False, f16_dequant=True)
    with pytest.raises(ValueError, match="two-pass"):
        decode_rotatekv_mha(*common, **kw, two_pass=False, maxnreg=168)
    with pytest.raises(ValueError, match="pre-RoPE"):
        decode_rotatekv_mha(*common, **kw, pre_rope=False, f16_dequant=True)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_decode_write_arguments_are_checked_before_any_launch():
    # the decode-step writes' contracts, refused with a clear error on CPU tensors (no launch)
    from kvbench.kernels.quant_write import kivi_ring_append
    from kvbench.kernels.rotatekv_write import quantize_pack_grouped

    b, h, d, w = 2, 3, 64, 8
    tok, win, n = torch.zeros(b, h, 1, d), torch.zeros(b, h, w, d), torch.zeros(b, dtype=torch.long)
    with pytest.raises(ValueError, match="one token a row"):
        kivi_ring_append(torch.zeros(b, h, 2, d), tok, win, win, n, n, n, residual=4, group_size=4)
    with pytest.raises(ValueError, match="counters"):
        kivi_ring_append(tok, tok, win, win, n, n, torch.zeros(b + 1, dtype=torch.long), residual=4, group_size=4)
    rot, gid = torch.zeros(b, 192), (torch.arange(192) // 64).to(torch.int32)
    kw = dict(bits=2, num_qgroups=3, key_block=192, codes_out=torch.zeros(b * 8, 48, dtype=torch.uint8),
              scale_out=torch.zeros(b * 8, 3, dtype=torch.float16), zero_out=torch.zeros(b * 8, 3, dtype=torch.float16),
              capacity=8, lengths=torch.zeros(b, dtype=torch.long), token_positions=torch.zeros(b, dtype=torch.long))
    with pytest.raises(ValueError, match="lengths mode"):
        quantize_pack_grouped(rot, gid, **kw, dest=torch.zeros(b, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="int32"):
        quantize_pack_grouped(rot, gid, **kw, slot_positions=torch.zeros(b, 8, dtype=torch.long))


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_grouped_queries_route_to_the_cuda_passes_where_they_fit(monkeypatch):
    # On a GPU, grouped queries take the one-query-a-row CUDA passes (per-token and KIVI reads)
    # instead of the tensor-core kernels, which were slower than fp16 on a Llama-3-8B shape. Here the
    # "fits" answers are forced and the passes replaced by recorders: the routing alone, on CPU.
    from kvbench.kernels import decode_attention as da
    from kvbench.kernels import decode_kivi_mha, decode_mha_cuda

    calls = []
    monkeypatch.setattr(decode_mha_cuda, "use_cuda", lambda *a, **k: True)
    monkeypatch.setattr(decode_mha_cuda, "decode_per_token_mha_cuda",
                        lambda q, *a, **k: calls.append(("per_token", q.shape[1], k["hadamard"])) or "cuda")
    monkeypatch.setattr(decode_kivi_mha, "cuda_passes_fit", lambda *a: True)
    monkeypatch.setattr(decode_kivi_mha, "decode_kivi_mha", lambda q, *a, **k: calls.append(
        ("kivi", q.shape[1], k["scores_impl"], k["values_impl"])) or "cuda")
    b, hkv, gq, d, cap = 1, 2, 4, 128, 64
    q = torch.zeros(b, hkv * gq, d, dtype=torch.float16)
    k = (torch.zeros(b, hkv, cap, d // 4, dtype=torch.uint8), torch.ones(b, hkv, cap, 2, dtype=torch.float16),
         torch.zeros(b, hkv, cap, 2, dtype=torch.float16))
    n = torch.full((b,), cap)
    assert da.decode_per_token(q, *k, *k, n, d**-0.5, bits=2, group_size=64, hadamard=True) == "cuda"
    kc = torch.zeros(b, hkv, cap // 32, d, 8, dtype=torch.uint8)
    ks = torch.ones(b, hkv, cap // 32, d, dtype=torch.float16)
    assert da.decode_kivi(q, kc, ks, ks, *k, n, d**-0.5, bits=2, group_size=32) == "cuda"
    assert calls == [("per_token", hkv * gq, True), ("kivi", hkv * gq, "cuda", "cuda")]
    # mha=False still forces the tensor-core kernel (the GPU checks use it to keep that kernel covered)
    monkeypatch.setattr(da, "_decode_per_token_fast_kernel", {(b * hkv, 1): lambda *a, **k: calls.append("tc")})
    calls.clear()
    da.decode_per_token(q, *k, *k, n, d**-0.5, bits=2, group_size=64, mha=False, num_splits=1)
    assert calls == ["tc"]


def test_side_stream_is_off_on_cpu():
    from kvbench.kernels import side_stream

    assert side_stream.fork("cpu") is None
    with side_stream.on(None):
        side_stream.join(None)


def test_merge_partials_is_exact():
    from kvbench.kernels.reference import fp_partial, merge_partials

    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 16, generator=gen)
    k = torch.randn(2, 2, 30, 16, generator=gen)
    v = torch.randn(2, 2, 30, 16, generator=gen)
    valid = torch.ones(2, 30, dtype=torch.bool)
    whole = merge_partials([fp_partial(q, k, v, valid, 0.25)])
    a = valid.clone()
    a[:, 11:] = False
    parts = [fp_partial(q, k, v, a, 0.25), fp_partial(q, k, v, ~a, 0.25),
             fp_partial(q, k, v, torch.zeros_like(a), 0.25)]  # an empty split too
    torch.testing.assert_close(merge_partials(parts), whole, rtol=1e-5, atol=1e-6)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or not HAS_TRITON, reason="needs a CUDA GPU and triton")
def test_kernels_on_gpu():
    from kvbench.kernels import checks, rotatekv_write

    results = checks.run_all("cuda", small=False) + checks.check_write("cuda") + checks.check_fused_append("cuda")
    results += checks.check_glue("cuda")
    results += rotatekv_write.check_rotatekv_write("cuda") + rotatekv_write.check_rotatekv_append("cuda")
    results += rotatekv_write.check_rotatekv_append("cuda", dtype=torch.float16)
    bad = [r for r in results if not r["ok"]]
    assert not bad, json.dumps(bad, indent=1)


def test_rotatekv_write_reference_layout():
    """RotateKV's write reference on its own (no triton): codes in natural channel order, quantized
    in the groups of the permuted order, as RotateKVPackedCache stores them."""
    from kvbench.kernels.rotatekv_write import reference_quantize_pack_grouped
    from kvbench.packing import unpack
    from kvbench.quant import QuantSpec, quantize

    gen = torch.Generator().manual_seed(0)
    c, group, kb = 192, 64, 96
    x = torch.randn(5, c, generator=gen)
    perm = torch.randperm(c, generator=gen)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(c)
    gid = (inv // group).to(torch.int32)  # stored channel i = rotated perm[i], group i // G
    codes, scale, zero = reference_quantize_pack_grouped(x, gid, bits=2, num_qgroups=c // group, key_block=kb)
    q = quantize(x[:, perm], QuantSpec(2, group))
    assert torch.equal(unpack(codes, 2, kb).reshape(5, c), q.codes[:, inv])
    assert torch.equal(scale, q.scale) and torch.equal(zero, q.zero)


def test_split_plan_covers_the_context():
    """Splits x tiles per split x block covers max_len, with no empty split; eagerly the tiles per
    split are a power of two (few recompiles as a context grows). No CUDA graph is being captured
    here, so this is the eager plan; the capture plan is exercised on the GPU."""
    from kvbench.kernels.decode_attention import split_plan

    for max_len, block, programs, per_sm in ((8192, 64, 256, 4), (8208, 64, 256, 4), (8192, 16, 64, 2), (1, 64, 8, 2),
                                             (100_000, 64, 1, 2), (257, 16, 256, 4)):
        ns, per = split_plan(max_len, block, programs, per_sm=per_sm)
        tiles = -(-max_len // block)
        assert per & (per - 1) == 0 and ns * per >= tiles and (ns - 1) * per < tiles
    assert split_plan(8192, 64, 256, per_sm=4) == (2, 64)  # the MHA kernel's plan at the benchmark shape
    assert split_plan(1000, 64, 8, num_splits=3) == (2, 8)  # 16 tiles: 3 splits of 6 round up to 2 of 8
