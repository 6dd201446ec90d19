"""A/B of the captured decode step at large batches with and without `multiwave_splits`
(`kvbench.kernels.decode_attention`: splits a row for grids of more than one wave). Llama-2-7B shape,
random fp16 weights, each method at about its own max batch (the throughput cells of
`benchmarks/gpu.yaml`'s max-batch task: 4096 + 256 tokens reserved, filled to 4224), plus batch 8 x
8192 (one wave: the rule must not change it). One engine a cell; the step is captured again for
each variant, alternating over rounds, so clock drift falls on both.

    python benchmarks/wave_splits_ab.py --out ab.json [--cells rotatekv-2:202 quarot-2:195 ...]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from decode_profile import METHODS  # noqa: E402

METHODS = dict(METHODS, **{"rotatekv-2-postrope": ("rotatekv", {"mode": "packed", "bits": 2, "pre_rope": False})})
CELLS = ["fp16:30", "kivi-2:117", "quarot-2:195", "rotatekv-2:202", "rotatekv-2-postrope:202", "rotatekv-2:8@8192"]


def time_cell(lm, label: str, batch: int, context: int, capacity: int, rounds: int, reps: int) -> dict:
    from kvbench import params as P
    from kvbench.decode import DecodeEngine, free_cuda
    from kvbench.gpu_timing import time_each
    from kvbench.registry import methods

    name, params = METHODS[label]
    method = P.build(methods.get(name), params, label)
    if method.needs_calibration:
        from kvbench.calibration import calibrate

        calibrate(lm, method)
    engine = DecodeEngine(lm, method, batch, capacity, seed=0)
    times: dict[str, list[float]] = {"one split a row past one wave": [], "multiwave_splits": []}
    try:
        engine.fill(context)
        engine.fix_length(context + 1)
        for _ in range(rounds):
            for variant, env in (("one split a row past one wave", "0"), ("multiwave_splits", "1")):
                os.environ["KVBENCH_WAVE_SPLITS"] = env
                engine.graph = None
                gc.collect()
                torch.cuda.empty_cache()
                if not engine.capture(advance=False):
                    raise RuntimeError(f"{label} at {batch}: {engine.graph_error}")
                times[variant].append(time_each(lambda: engine.step(advance=False), reps, 3).median_ms)
    finally:
        os.environ.pop("KVBENCH_WAVE_SPLITS", None)
        engine.close()
        engine = None
        free_cuda()
    row = {"batch": batch, "context": context, "capacity": capacity}
    for variant, ts in times.items():
        row[variant] = {"step_ms_median": statistics.median(ts), "step_ms_all": ts,
                        "tok_s": batch * 1e3 / statistics.median(ts)}
    print(label, batch, {v: round(r["step_ms_median"], 3) for v, r in row.items() if isinstance(r, dict)}, flush=True)
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--cells", nargs="+", default=CELLS, help="label:batch, or label:batch@context (default 4224 "
                                                              "of 4352 + 16 reserved, the max-batch task's step)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    from kvbench.model import load_model

    lm = load_model("llama-2-7b", "random:llama-2-7b", device="cuda", dtype="float16")
    rows = {}
    for cell in args.cells:
        label, rest = cell.split(":")
        batch, _, ctx = rest.partition("@")
        context = int(ctx) if ctx else 4096 + 128
        capacity = context + 16 if ctx else 4096 + 256 + 16
        rows[cell] = time_cell(lm, label, int(batch), context, capacity, args.rounds, args.reps)
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
