"""The default decode-attention kernels at the Llama-2-7B shape (batch 8, context 8192), each called
a few times, for Nsight Compute to read their hardware counters (where the stalls are):

    ncu --clock-control none -k 'regex:rotatekv_scores|kivi_scores|token_scores|values_from_scores' \
        --set full -o prof python benchmarks/ncu_decode_kernels.py --only rotatekv kivi quarot
    ncu -i prof.ncu-rep --page details > details.txt

The inputs are `kernels_gpu.methods`' (the same random codes, scales and permutation), and each
method's first configuration is the one its launcher takes by default.
"""

from __future__ import annotations

import argparse
import importlib.util
import os

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
METHODS = {"rotatekv": "rotatekv-2 (pre-RoPE, 4-head Hadamard, permuted channels, default)",
           "kivi": "kivi-2 (G32, R128)", "quarot": "quarot-2 (G64)"}


def _kernels_gpu():
    spec = importlib.util.spec_from_file_location("kernels_gpu", os.path.join(_HERE, "kernels_gpu.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="+", choices=sorted(METHODS), default=sorted(METHODS))
    ap.add_argument("--calls", type=int, default=2, help="calls of each method's kernels (the first compiles)")
    args = ap.parse_args()
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
