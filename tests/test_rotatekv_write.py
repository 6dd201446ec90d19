"""RotateKV's fused key write (kvbench/kernels/rotatekv_write.py) against its plain-torch reference,
and a RotateKVPackedCache append through the fused path against the torch path.

On CPU the kernels run under TRITON_INTERPRET=1 in a subprocess (the variable must be set before
triton is imported), as in tests/test_kernels.py. Keys: codes, scales and zeros bit for bit
(C = 192 with a non-power-of-two key block, 512, 4096; bits 2/4/8; scattered and skipped rows).
Values (in-kernel Hadamard, as quarot's fused write): at most 0.5% of codes one step off.
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
from kvbench.kernels import rotatekv_write as rw
fn = {"write": rw.check_rotatekv_write, "append": rw.check_rotatekv_append}[sys.argv[1]]
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
@pytest.mark.parametrize("what", ["write", "append"])
def test_rotatekv_write_interpreted(what):
    results = _interpret(what)
    assert results
    bad = [r for r in results if not r["ok"]]
    assert not bad, bad
    if what == "append":
        assert all(r["keys_exact"] and r["fused_calls"] > 0 for r in results)


def test_reference_matches_packed_cache_layout():
    """The reference's contract on its own (no triton): codes in natural channel order, grouped by gid."""
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


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or not HAS_TRITON, reason="needs a CUDA GPU and triton")
def test_rotatekv_write_on_gpu():
    from kvbench.kernels import rotatekv_write as rw

    results = rw.check_rotatekv_write("cuda") + rw.check_rotatekv_append("cuda")
    results += rw.check_rotatekv_append("cuda", dtype=torch.float16)
    bad = [r for r in results if not r["ok"]]
    assert not bad, json.dumps(bad, indent=1)
