"""Where a decode step's GPU time goes: every kernel of one step, per method, on a CUDA GPU.

    python benchmarks/decode_profile.py --out results/gpu/decode_profile.json [--methods fp16 quarot-2 ...]

Same set-up as `decode_latency` in benchmarks/gpu.yaml (Llama-2-7B shape, random fp16 weights,
batch 8, cache filled to 8192 tokens, fixed-length steps over 8193 tokens): the step is run
eagerly under torch.profiler and each kernel's device time is summed per
step, grouped into kinds (attention kernel, its torch glue, cache write, GEMMs, norms, ...).
Kernel durations are the same in a CUDA-graph replay; what capture removes is the launch gaps,
so the step's captured time is printed beside the kernels' sum (the difference is idle GPU
time between kernels). One JSON with the per-kernel table of every method.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

# label -> (method, params): the rows of benchmarks/gpu.yaml
METHODS = {
    "fp16": ("fp16", {"mode": "packed"}),
    "quarot-2": ("quarot", {"mode": "packed", "bits": 2, "group_size": 64}),
    "kivi-2": ("kivi", {"mode": "packed", "bits": 2, "group_size": 32, "residual": 128}),
    "rotatekv-2": ("rotatekv", {"mode": "packed", "bits": 2}),
    "rotatekv-2-postrope-h1": ("rotatekv", {"mode": "packed", "bits": 2, "pre_rope": False, "head_group": 1,
                                            "reorder": False}),
}

# kernel-name fragments -> kind (first match wins)
KINDS = [
    ("attention kernel", ("_decode_", "_kivi_", "flash", "fmha", "attention", "token_scores", "values_from_scores",
                          "rotatekv_scores", "kivi_scores")),
    ("gemm", ("gemm", "gemv", "sm90_xmma", "cutlass", "nvjet", "splitk")),
    ("write (quantize/pack)", ("quant_write", "_write", "pack")),
    ("hadamard", ("hadamard",)),
    ("copy/fill", ("copy", "fill", "memset", "memcpy")),
]


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, keys in KINDS:
        if any(k in low for k in keys):
            return kind
    return "other elementwise/reduction"


def profile_method(label: str, batch: int, context: int, steps: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    from kvbench import params as P
    from kvbench.decode import DecodeEngine, free_cuda
    from kvbench.gpu_timing import time_each
    from kvbench.model import load_model
    from kvbench.registry import methods

    name, params = METHODS[label]
    method = P.build(methods.get(name), params, label)
    lm = load_model("llama-2-7b", "random:llama-2-7b", device="cuda", dtype="float16")
    if method.needs_calibration:  # as `kvbench run` does (needs the calibration text: KVBENCH_DATA_DIR)
        from kvbench.calibration import calibrate

        calibrate(lm, method)
    engine = DecodeEngine(lm, method, batch, context + 16, seed=0)
    try:
        engine.fill(context)
        engine.fix_length(context + 1)
        # The caches' capturable paths (the sync-free RoPE-table write), so the profiled eager steps
        # run the kernels a captured replay runs
        if not engine.graph_safe:
            raise RuntimeError(f"decode_profile: {label}'s caches cannot be captured")
        for _ in range(3):
            engine.step(advance=False)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                engine.step(advance=False)
            torch.cuda.synchronize()
        per = defaultdict(lambda: [0.0, 0])
        for e in prof.events():
            if e.device_type.name != "CUDA":
                continue
            per[e.name][0] += e.time_range.elapsed_us() / 1e3 / steps  # ms per step
            per[e.name][1] += 1
        rows = sorted(((n, t, c // steps) for n, (t, c) in per.items()), key=lambda r: -r[1])
        kinds = defaultdict(float)
        for n, t, _ in rows:
            kinds[kind_of(n)] += t
        eager = time_each(lambda: engine.step(advance=False), 20, 3).median_ms
        captured = None
        if engine.capture(advance=False):
            captured = time_each(lambda: engine.step(advance=False), 50, 5).median_ms
        out = {
            "glue": engine.glue,
            "kernels_ms_per_step": sum(t for _, t, _ in rows),
            "eager_step_ms": eager,
            "captured_step_ms": captured,
            "kinds_ms": dict(sorted(kinds.items(), key=lambda kv: -kv[1])),
            "launches_per_step": sum(c for *_, c in rows),
            "top": [{"kernel": n[:160], "ms": round(t, 4), "calls": c, "kind": kind_of(n)} for n, t, c in rows[:40]],
        }
        return out
    finally:
        engine.close()
        engine = lm = None  # drop the model and caches before freeing
        free_cuda()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--out", default="")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("decode_profile: needs a CUDA GPU (this machine has none)", file=sys.stderr)
        return 2
    from kvbench.gpu_timing import device_name
    from kvbench.results import environment

    result = {"device": device_name(), "env": environment("cuda"), "batch": a.batch, "context": a.context,
              "methods": {}}
    for label in a.methods:
        try:
            r = profile_method(label, a.batch, a.context, a.steps)
        except Exception as e:  # one method failing must not lose the others
            r = {"error": f"{type(e).__name__}: {e}"}
        result["methods"][label] = r
        if a.out:
            os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
            with open(a.out, "w") as f:
                json.dump(result, f, indent=1)
        if "error" in r:
            print(f"== {label}: {r['error']}")
            continue
        cap = r["captured_step_ms"]
        print(f"== {label}: kernels {r['kernels_ms_per_step']:.2f} ms/step ({r['launches_per_step']} launches), "
              f"eager {r['eager_step_ms']:.2f}, captured {cap if cap is None else round(cap, 2)}")
        for k, t in r["kinds_ms"].items():
            print(f"   {k:28s} {t:8.3f} ms")
        for row in r["top"][:12]:
            print(f"   {row['ms']:8.3f} ms x{row['calls']:<4d} {row['kernel'][:100]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
