"""The default decode-attention kernels at the Llama-2-7B shape (batch 8, context 8192), each called
a few times, for Nsight Compute to read their hardware counters (where the stalls are):

    ncu --clock-control none -k 'regex:rotatekv_scores|kivi_scores|token_scores|values_from_scores' \
        --set full -o prof python benchmarks/ncu_decode_kernels.py --only rotatekv kivi quarot
    ncu -i prof.ncu-rep --page details > details.txt
    ncu -i prof.ncu-rep --page raw --csv > raw.csv
    python benchmarks/ncu_decode_kernels.py --summarize raw.csv --out summary.json

The inputs are `kernels_gpu.methods`' (the same random codes, scales and permutation), and each
method's first configuration is the one its launcher takes by default (called eagerly, so a
launcher's split count is its eager plan, not a captured step's). `--summarize` condenses raw
exports (no GPU needed): per launch its duration, registers, issue-slot use, DRAM bytes,
instructions and the warps' stall shares.
"""

from __future__ import annotations

import argparse
import importlib.util
import os

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
METHODS = {"rotatekv": "rotatekv-2 (pre-RoPE, 4-head Hadamard, permuted channels, default)",
           "rotatekv-post": "rotatekv-2 (post-RoPE, 4-head Hadamard, permuted channels)",
           "kivi": "kivi-2 (G32, R128)", "quarot": "quarot-2 (G64)"}


def _kernels_gpu():
    spec = importlib.util.spec_from_file_location("kernels_gpu", os.path.join(_HERE, "kernels_gpu.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


STALLS = ["long_scoreboard", "wait", "selected", "short_scoreboard", "math_pipe_throttle", "dispatch_stall",
          "not_selected", "mio_throttle", "lg_throttle", "barrier", "no_instructions", "branch_resolving"]


def summarize(paths: list[str]) -> dict:
    """{raw csv path: [one dict a profiled launch]} from `ncu --page raw --csv` exports."""
    import csv

    def num(v):
        return float(v.replace(",", ""))

    out = {}
    for path in paths:
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
        header, launches = rows[0], rows[2:]  # (row 1: units)
        out[path] = []
        for row in launches:
            m = dict(zip(header, row))
            stalls = {k: num(m[f"smsp__pcsamp_warps_issue_stalled_{k}"]) for k in STALLS}
            total = sum(stalls.values()) or 1.0
            out[path].append({
                "kernel": m["Kernel Name"], "grid": m.get("launch__grid_size"),
                "duration_us": num(m["gpu__time_duration.sum"]), "registers": int(num(m["launch__registers_per_thread"])),
                "issue_active_pct": round(num(m["smsp__issue_active.avg.pct_of_peak_sustained_active"]), 1),
                "dram_read_MB": num(m["dram__bytes_read.sum"]), "instructions": num(m["smsp__inst_executed.sum"]),
                "stall_share_pct": {k: round(v / total * 100, 1) for k, v in stalls.items()},
                # how busy each execution pipe was (which one binds an issue-limited kernel)
                "pipe_pct": {k.split("__")[1].split(".")[0]: round(num(v), 1) for k, v in m.items()
                             if k.startswith("sm__inst_executed_pipe_") and k.endswith("pct_of_peak_sustained_active")
                             and v.strip() and num(v) >= 5.0},
            })
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="+", choices=sorted(METHODS), default=sorted(METHODS))
    ap.add_argument("--calls", type=int, default=2, help="calls of each method's kernels (the first compiles)")
    ap.add_argument("--summarize", nargs="+", metavar="RAW_CSV", help="condense raw exports instead of running")
    ap.add_argument("--out", help="--summarize: write the JSON here (else print it)")
    args = ap.parse_args()
    if args.summarize:
        import json

        text = json.dumps(summarize(args.summarize), indent=1)
        if args.out:
            with open(args.out, "w") as f:
                f.write(text)
        else:
            print(text)
        return
    all_methods = _kernels_gpu().methods(8, 32, 128, 8192, "cuda", False)
    with torch.no_grad():
        for key in args.only:
            variants, _ = all_methods[METHODS[key]]
            _, _, kernels = variants[0]
            for _ in range(args.calls):
                kernels()
            torch.cuda.synchronize()
            print(f"{key}: {args.calls} calls of {variants[0][0]}", flush=True)


if __name__ == "__main__":
    main()
