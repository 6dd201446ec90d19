"""Where RotateKV's 4-bit perplexity loss comes from on SmolLM2 (docs/rotatekv.md, issue 3).

    python benchmarks/rotatekv4_diagnostics.py --out results/rotatekv4_diagnostics

Runs `kvbench run` in-process on WikiText-2 perplexity windows (8 x 2048 by default) for
RotateKV-4 variants that its parameters cannot express, by wrapping the method's fake quantizer:
keys only or values only quantized, and a separate key group size. A diagnostic, not a method:
the wrapped runs are labelled as such and live in their own output folder. The quantizer is
called once for keys, then once for values, per appended chunk (RotateKVCache.compress).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile

import yaml

import kvbench.methods.rotatekv as rotatekv_module
from kvbench import windows
from kvbench.cli import main as kvbench_main

# label -> (which side is quantized, key group size override, rotatekv params)
VARIANTS = {
    "rotatekv-4": ("both", None, {}),
    "rotatekv-4 keys only": ("keys", None, {}),
    "rotatekv-4 values only": ("values", None, {}),
    "rotatekv-4 key groups of 32": ("both", 32, {}),
    "rotatekv-4 key groups of 16": ("both", 16, {}),
    "rotatekv-4 clip 0.9": ("both", None, {"clip_ratio": 0.9}),
    "rotatekv-4 no reorder": ("both", None, {"reorder": False}),
    "rotatekv-4 after RoPE": ("both", None, {"pre_rope": False}),
}


def wrap_quantizer(side: str, key_group: int | None):
    original = rotatekv_module.fake_quantize
    calls = {"n": 0}

    def fake_quantize(x, spec):
        is_key = calls["n"] % 2 == 0
        calls["n"] += 1
        if (side == "keys" and not is_key) or (side == "values" and is_key):
            return x
        if is_key and key_group:
            spec = dataclasses.replace(spec, group_size=key_group)
        return original(x, spec)

    rotatekv_module.fake_quantize = fake_quantize
    return lambda: setattr(rotatekv_module, "fake_quantize", original)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results/rotatekv4_diagnostics")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--device", default="auto")
    a = ap.parse_args(argv)
    worst = 0
    for label, (side, key_group, params) in [("fp16", ("both", None, None))] + list(VARIANTS.items()):
        method = {"name": "fp16"} if params is None else {
            "name": "rotatekv", "label": label, "params": {"bits": 4, **params}}
        config = {"output": a.out, "seed": 0, "device": a.device, "dtype": "float32",
                  "models": [{"name": "smollm2-135m", "path": "smollm2"}], "methods": [method],
                  "tasks": [{"name": "perplexity",
                             "params": {"seq_len": a.seq_len, "max_windows": a.windows}}]}
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "config.yaml")
            with open(path, "w") as f:
                yaml.safe_dump(config, f, sort_keys=False)
            restore = wrap_quantizer(side, key_group)
            windows._nll_memo.clear()  # same parameters, different (wrapped) quantizer
            try:
                worst = max(worst, kvbench_main(["run", path]))
            finally:
                restore()
    return worst


if __name__ == "__main__":
    sys.exit(main())
