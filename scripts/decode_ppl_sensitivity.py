"""How far a decode-step perplexity moves when every attention output is perturbed by a relative
noise far below what separates two correct implementations (fp16 rounding is ~5e-4).

Teacher-forced decode on CPU, simulated mode, the same windows as `scripts/gpu_decode_ppl.py`; each
method once unperturbed, then with o * (1 + eps * N(0, 1)) for each eps and seed. A method whose
2-bit codes flip under such noise (they quantize keys computed from the perturbed hidden states)
shows spreads of several percent on one window, which bounds what a packed-against-simulated
comparison on that window can resolve.

    python scripts/decode_ppl_sensitivity.py --tokens 256 --windows 1 --out results/...json
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import torch

from kvbench.calibration import calibrate
from kvbench.model import load_model
from kvbench.registry import methods
from kvbench.session import KVSession
from kvbench.windows import wikitext_windows

from gpu_decode_ppl import decode_nll  # noqa: E402  the same teacher-forced decode loop (this script's directory)

CASES = [
    ("fp16", "fp16", {}),
    ("kivi-2", "kivi", {"bits": 2, "group_size": 32, "residual": 128}),
    ("rotatekv-2", "rotatekv", {"bits": 2}),
    ("rotatekv-2-h1", "rotatekv", {"bits": 2, "head_group": 1}),
]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2")
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--windows", type=int, default=1)
    p.add_argument("--eps", type=float, nargs="+", default=[1e-4, 1e-3])
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--out")
    a = p.parse_args()
    lm = load_model("smollm2-135m", a.model, "cpu", "float32")
    windows, source = wikitext_windows(lm, a.tokens, a.windows)
    noise = {"eps": 0.0, "gen": None}
    attention = KVSession.attention

    def perturbed(self, *args, **kwargs):
        o = attention(self, *args, **kwargs)
        if noise["eps"]:
            o = o * (1 + noise["eps"] * torch.randn(o.shape, generator=noise["gen"]))
        return o

    KVSession.attention = perturbed
    rows = []
    for label, name, params in CASES:
        m = methods.get(name)(mode="simulated", **params)
        if m.needs_calibration:
            calibrate(lm, m)
        runs = [(0.0, None)] + [(e, s) for e in a.eps for s in range(a.seeds)]
        row = {"method": label, "params": params, "runs": []}
        for eps, seed in runs:
            noise["eps"], noise["gen"] = eps, torch.Generator().manual_seed(seed or 0)
            nll = n = 0
            for w in windows:
                a_, b_ = decode_nll(lm, m, w)
                nll, n = nll + a_, n + b_
            row["runs"].append({"eps": eps, "seed": seed, "ppl": math.exp(nll / n)})
        base = row["runs"][0]["ppl"]
        row["max_rel_shift"] = max(abs(r["ppl"] / base - 1) for r in row["runs"][1:])
        rows.append(row)
        print(f"{label:14s} ppl {base:.3f}; perturbed: " + ", ".join(f"{r['eps']:g}/{r['seed']}: {r['ppl']:.3f}"
              for r in row["runs"][1:]) + f"; max shift {100 * row['max_rel_shift']:.2f}%", flush=True)
        if a.out:  # each finished method on disk before the next starts
            with open(a.out, "w") as f:
                json.dump({"source": source, "tokens_per_window": a.tokens, "windows": len(windows), "rows": rows},
                          f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
