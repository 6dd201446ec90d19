"""A/B of source variants of RotateKV's CUDA key pass (`rotatekv_scores_cuda`) on one machine:
Llama-2-7B shape, B8 x 8192, the launcher's split plan. Each variant is timed as 20 launches
captured in a CUDA graph, the variants alternating over rounds (so clock and thermal drift fall on
all of them alike), and its scores are compared with the first variant's, bit for bit, at full
and at ragged lengths.

    python benchmarks/rotatekv_scores_ab.py --out ab.json [--baseline path/to/old_module.py]

`--baseline` names a copy of an older `rotatekv_scores_cuda.py` (e.g. from `git show`) to time
first; the shipped module's variants are its `source()` switches.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import statistics

import torch

from kvbench.kernels import checks, nvrtc
from kvbench.kernels import rotatekv_scores_cuda as shipped
from kvbench.kernels.decode_attention import split_plan


def _module(path):
    spec = importlib.util.spec_from_file_location("rotatekv_scores_baseline", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _launcher(mod, src, device):
    kernel = nvrtc.compile_source(src, "rotatekv_scores", device)

    def run(*args, **kw):
        saved = mod._kernel
        mod._kernel = lambda *a, **k: kernel
        try:
            return mod.rotatekv_scores(*args, **kw)
        finally:
            mod._kernel = saved
    return run


def _graph_ms(fn, calls=20, reps=15):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    ts = []
    for _ in range(reps):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        graph.replay()
        e1.record()
        e1.synchronize()
        ts.append(e0.elapsed_time(e1) / calls)
    return statistics.median(ts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--baseline", default=None)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    dev = torch.device("cuda")
    variants = []
    if args.baseline:
        old = _module(args.baseline)
        variants.append(("baseline", _launcher(old, old.source(32), dev)))
    for fs in (False, True):
        for pp in (False, True):
            variants.append((f"frag_staged={fs} ping_pong={pp}",
                             _launcher(shipped, shipped.source(32, frag_staged=fs, ping_pong=pp), dev)))

    gen = torch.Generator().manual_seed(0)
    b, hkv, cap = 8, 32, 8192
    kc, ks, kz, gid, *_, pos, cos, sin = checks.rotatekv_inputs(gen, b, hkv, 1, 128, cap, 2, 128, 4, "cuda")
    q = torch.randn(b, hkv, 128, generator=gen).half().cuda()
    sm = 128**-0.5 * 1.4426950408889634 / math.sqrt(512)  # the butterfly is unnormalized
    ns, nit = split_plan(cap, 32, b * hkv // 4, "cuda", per_sm=2)
    full = torch.full((b,), cap, device=dev)
    ragged = torch.tensor([cap, 5001, 33, 8100, 1, 4097, 7777, 257], device=dev)

    def scores(run, lengths):
        scr = torch.full((b, hkv, cap), float("nan"), device=dev)
        run(q, kc, ks, kz, gid, lengths, pos, cos, sin, sm, scr, split_len=nit * 32, num_splits=ns)
        valid = torch.arange(cap, device=dev)[None, None] < lengths[:, None, None]
        return torch.where(valid, scr, torch.zeros_like(scr))

    ref = {n: scores(variants[0][1], n_len) for n, n_len in (("full", full), ("ragged", ragged))}
    result = {"device": torch.cuda.get_device_name(), "splits": ns, "split_len": nit * 32, "variants": {}}
    for name, run in variants:
        row = {}
        for n, n_len in (("full", full), ("ragged", ragged)):
            s = scores(run, n_len)
            row[f"{n}_bit_identical"] = bool(torch.equal(s, ref[n]))
            row[f"{n}_max_abs_diff"] = float((s - ref[n]).abs().max())
        result["variants"][name] = row
    times = {name: [] for name, _ in variants}
    scr = torch.empty(b, hkv, cap, device=dev)
    for _ in range(args.rounds):
        for name, run in variants:
            times[name].append(_graph_ms(lambda: run(q, kc, ks, kz, gid, full, pos, cos, sin, sm, scr,
                                                     split_len=nit * 32, num_splits=ns)))
    for name, ts in times.items():
        result["variants"][name].update(ms_median=statistics.median(ts), ms_all=ts)
        print(name, result["variants"][name], flush=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
