"""Teacher-forced perplexity read token by token through decode steps, packed against simulated.

Perplexity windows are prefills, which packed caches read through their torch dequantize path;
here every token after the first is a decode step (one query per row), so packed caches read
through the fused decode kernels on CUDA. Same windows, same model, both modes; prints and
writes the relative perplexity difference.

    python scripts/gpu_decode_ppl.py MODEL_PATH --tokens 512 --windows 2 --out decode_ppl.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch
import torch.nn.functional as F

from kvbench.calibration import calibrate
from kvbench.model import load_model
from kvbench.registry import methods
from kvbench.session import KVSession
from kvbench.windows import wikitext_windows

CASES = [
    ("kivi-2", "kivi", {"bits": 2, "group_size": 32, "residual": 128}),
    ("rotatekv-2", "rotatekv", {"bits": 2}),
    ("rotatekv-2-h1", "rotatekv", {"bits": 2, "head_group": 1}),
    ("quarot-2", "quarot", {"bits": 2, "group_size": 64}),
]


def decode_nll(lm, method, window: torch.Tensor) -> tuple[float, int]:
    session = KVSession(method, lm.geometry)
    ids = window.to(lm.device)[None]
    nll, n = 0.0, 0
    for t in range(ids.shape[1] - 1):
        pos = torch.tensor([[t]], device=lm.device)
        logits = lm.forward(session, ids[:, t : t + 1], pos, logits_to_keep=1)[0, -1]
        nll += float(F.cross_entropy(logits[None], ids[0, t + 1 : t + 2]))
        n += 1
    return nll, n


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--windows", type=int, default=2)
    p.add_argument("--dtype", default="float16")
    p.add_argument("--out")
    p.add_argument("--exact-kernels", action="store_true",
                   help="RotateKV's fused read in float32 arithmetic (decode_attention.ROTATEKV_EXACT)")
    p.add_argument("--cases", nargs="+", choices=[c[0] for c in CASES], help="labels to run (default: all)")
    a = p.parse_args()
    if a.exact_kernels:
        from kvbench.kernels import decode_attention

        decode_attention.ROTATEKV_EXACT = True
    lm = load_model("smollm2-135m", a.model, "cuda", a.dtype)
    windows, source = wikitext_windows(lm, a.tokens, a.windows)
    rows = []
    for label, name, params in CASES:
        if a.cases and label not in a.cases:
            continue
        row = {"method": label, "params": params}
        for mode in ("simulated", "packed"):
            m = methods.get(name)(mode=mode, **params)
            if m.needs_calibration:
                calibrate(lm, m)
            start = time.perf_counter()
            nll = n = 0
            for w in windows:
                a_, b_ = decode_nll(lm, m, w)
                nll, n = nll + a_, n + b_
            row[f"{mode}_ppl"] = math.exp(nll / n)
            row[f"{mode}_s"] = round(time.perf_counter() - start, 1)
            print(f"{label:16s} {mode:9s} ppl {row[f'{mode}_ppl']:.4f} ({row[f'{mode}_s']} s)", flush=True)
        kernel = getattr(m.new_cache(0, lm.geometry), "kernel_supported", lambda: False)()
        row["fused_kernel"] = bool(kernel)
        row["rel_diff"] = row["packed_ppl"] / row["simulated_ppl"] - 1
        rows.append(row)
        if a.out:  # each finished case on disk before the next starts
            with open(a.out, "w") as f:
                json.dump({"rows": rows}, f, indent=1)
        print(f"{label:16s} simulated {row['simulated_ppl']:.4f} packed {row['packed_ppl']:.4f} "
              f"rel {100 * row['rel_diff']:+.3f}% kernel={kernel}", flush=True)
    out = {"source": source, "tokens_per_window": a.tokens, "windows": len(windows), "dtype": a.dtype,
           "exact_kernels": a.exact_kernels,
           "device": torch.cuda.get_device_name(), "rows": rows}
    if a.out:
        with open(a.out, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
