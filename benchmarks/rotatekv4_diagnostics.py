"""Where RotateKV's 4-bit perplexity loss comes from on SmolLM2 (docs/rotatekv.md, issue 3).

    python benchmarks/rotatekv4_diagnostics.py --out results/rotatekv4_diagnostics

Runs `kvbench run` in-process on WikiText-2 perplexity windows (8 x 2048 by default) for
RotateKV-4 variants that its parameters cannot express, by wrapping the method's fake quantizer:
keys only or values only quantized, a separate key group size, and keys centred on their
calibrated channel means before quantization (the mean added back after). A diagnostic, not a
method: the wrapped runs are labelled as such and live in their own output folder. The quantizer
is called once for keys, then once for values, per appended chunk (RotateKVCache.compress).
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

# label -> (which side is quantized, key group size override, keys centred, rotatekv params)
VARIANTS = {
    "rotatekv-4": ("both", None, False, {}),
    "rotatekv-4 keys only": ("keys", None, False, {}),
    "rotatekv-4 values only": ("values", None, False, {}),
    "rotatekv-4 key groups of 32": ("both", 32, False, {}),
    "rotatekv-4 key groups of 16": ("both", 16, False, {}),
    "rotatekv-4 clip 0.9": ("both", None, False, {"clip_ratio": 0.9}),
    "rotatekv-4 no reorder": ("both", None, False, {"reorder": False}),
    "rotatekv-4 after RoPE": ("both", None, False, {"pre_rope": False}),
    "rotatekv-4 keys centred": ("both", None, True, {}),
    "rotatekv-4 keys centred, keys only": ("keys", None, True, {}),
}


def wrap_quantizer(side: str, key_group: int | None, center: bool):
    """Patch the method's quantizer (and, to centre keys, its calibration, so the channel means
    are kept next to the permutation, under a cache key of their own). Returns the undo."""
    original = rotatekv_module.fake_quantize
    original_compress = rotatekv_module.RotateKVCache.compress
    cls = rotatekv_module.RotateKV
    saved = {n: getattr(cls, n) for n in ("calibration_params", "calibration_state", "load_calibration_state")}
    calls = {"n": 0, "mean": 0.0}

    def fake_quantize(x, spec):
        is_key = calls["n"] % 2 == 0
        calls["n"] += 1
        if (side == "keys" and not is_key) or (side == "values" and is_key):
            return x
        if is_key and key_group:
            spec = dataclasses.replace(spec, group_size=key_group)
        if is_key and center:  # the keys arrive permuted: so are their means (compress, below)
            return original(x - calls["mean"], spec) + calls["mean"]
        return original(x, spec)

    def compress(cache, new):
        perm = cache.m.permutation(cache.layer_idx, cache.g, new.k.device)
        calls["mean"] = cache.m.key_means[cache.layer_idx].to(new.k.device)[perm]
        return original_compress(cache, new)

    def calibration_state(self):
        return {**saved["calibration_state"](self),
                **{f"mean.{i}": (s / self._counts[i]).float() for i, s in self._sums.items()}}

    def load_calibration_state(self, state):
        saved["load_calibration_state"](self, {k: v for k, v in state.items() if k.startswith("perm.")})
        self.key_means = {int(k.split(".")[1]): v for k, v in state.items() if k.startswith("mean.")}

    rotatekv_module.fake_quantize = fake_quantize
    if center:
        rotatekv_module.RotateKVCache.compress = compress
        cls.calibration_params = lambda self: {**saved["calibration_params"](self), "diagnostic": "key means"}
        cls.calibration_state = calibration_state
        cls.load_calibration_state = load_calibration_state

    def restore():
        rotatekv_module.fake_quantize = original
        rotatekv_module.RotateKVCache.compress = original_compress
        for n, f in saved.items():
            setattr(cls, n, f)

    return restore


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results/rotatekv4_diagnostics")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--device", default="auto")
    a = ap.parse_args(argv)
    worst = 0
    for label, (side, key_group, center, params) in [("fp16", ("both", None, False, None))] + list(VARIANTS.items()):
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
            restore = wrap_quantizer(side, key_group, center)
            windows._nll_memo.clear()  # same parameters, different (wrapped) quantizer
            try:
                worst = max(worst, kvbench_main(["run", path]))
            finally:
                restore()
    return worst


if __name__ == "__main__":
    sys.exit(main())
