"""A/B of the hand-laid CUDA decode passes on one machine: Llama-2-7B shape, B8 x 8192. Each
variant is timed per call within a CUDA graph of 20 calls (`gpu_timing.amortized_ms`), the variants alternating over rounds
(so clock and thermal drift fall on all of them alike), and its outputs are compared with the
first variant's, bit for bit, at full and at ragged lengths.

    python benchmarks/kernel_ab.py rotatekv_scores --out ab.json [--baseline old.py] [--variants 2,2 3,3]
    python benchmarks/kernel_ab.py values --out ab.json --baseline old_values_cuda.py
    python benchmarks/kernel_ab.py kivi_scores --out ab.json --baseline old_kivi_scores_cuda.py
    python benchmarks/kernel_ab.py token_scores --out ab.json --baseline old_token_scores_cuda.py
    python benchmarks/kernel_ab.py fp_partial --out ab.json --baseline old_fp_partial.py

`--baseline` names a copy of an older module (`git show REV:kvbench/kernels/rotatekv_scores_cuda.py`,
`.../values_cuda.py` or `.../kivi_scores_cuda.py`), timed first. `--variants` are launch settings of
the shipped module: for `rotatekv_scores`, `min_blocks,splits_per_sm` (programs an SM its registers
are held to, splits an SM; default 2,2; `--post` times the post-RoPE build); for `values`, split
counts or `auto` (the launcher's plan; the default), timed on the three value layouts the decode
reads use (RotateKV's groups of 128, quarot's of 64 rotated back, KIVI's of 32 with float zeros)
and compared after merging the splits;
for `kivi_scores`, `splits[,min_blocks]` (splits a row, each timed for the baseline too; its
scores and 16-token tile maxima are compared); for `token_scores` (quarot's layout), none (the
baseline, then the shipped module); for `fp_partial` (the full-precision tokens' Triton
kernel: KIVI's window, RotateKV's sinks), PROGRAMS_PER_SM values or `auto`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import statistics

import torch

from kvbench.kernels import checks, nvrtc
from kvbench.kernels import kivi_scores_cuda, rotatekv_scores_cuda, values_cuda
from kvbench.gpu_timing import amortized_ms
from kvbench.kernels.decode_attention import split_plan

B, HEADS, CAP = 8, 32, 8192
RAGGED = [CAP, 5001, 33, 8100, 1, 4097, 7777, 257]


def _module(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def compare(variants, outputs, rounds):
    """variants: [(name, run(lengths) -> tensors)]; outputs of each against the first's; then times
    at full length, alternating."""
    dev = torch.device("cuda")
    lengths = {"full": torch.full((B,), CAP, device=dev), "ragged": torch.tensor(RAGGED, device=dev)}
    ref = {k: outputs(variants[0][1], n) for k, n in lengths.items()}
    rows = {}
    for name, run in variants:
        row = rows.setdefault(name, {})
        for k, n in lengths.items():
            got = outputs(run, n)
            row[f"{k}_bit_identical"] = all(torch.equal(x, y) for x, y in zip(got, ref[k]))
            row[f"{k}_max_abs_diff"] = max(float((x - y).abs().max()) for x, y in zip(got, ref[k]))
    times = {name: [] for name, _ in variants}
    for _ in range(rounds):
        for name, run in variants:
            times[name].append(amortized_ms(lambda run=run: run(lengths["full"])))
    for name, ts in times.items():
        rows[name].update(ms_median=statistics.median(ts), ms_all=ts)
        print(name, {k: v for k, v in rows[name].items() if k != "ms_all"}, flush=True)
    return rows


def rotatekv_scores_bench(post: bool):
    """(launcher, outputs) for the key pass at this file's shape: `launcher(mod, min_blocks, per_sm)`
    runs module `mod`'s build (a copy of `rotatekv_scores_cuda`); `outputs` gives its scores."""
    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(0)
    kc, ks, kz, gid, *_, pos, cos, sin = checks.rotatekv_inputs(gen, B, HEADS, 1, 128, CAP, 2, 128, 4, "cuda")
    q = torch.randn(B, HEADS, 128, generator=gen).half().cuda()
    sm = 128**-0.5 * 1.4426950408889634 / math.sqrt(512)  # the butterfly is unnormalized
    scr = torch.empty(B, HEADS, CAP, device=dev)

    kind = dict(post_rope=True) if post else {}  # (modules from before the post-RoPE build take no such argument)

    def launcher(mod, min_blocks, per_sm):
        kernel = nvrtc.compile_source(mod.source(32, min_blocks, **kind), "rotatekv_scores", dev)
        ns, nit = split_plan(CAP, 32, B * HEADS // 4, "cuda", per_sm=per_sm)

        def run(lengths):
            saved = mod._kernel
            mod._kernel = lambda *a, **k: kernel
            try:
                return mod.rotatekv_scores(q, kc, ks, kz, gid, lengths, pos, cos, sin, sm, scr, split_len=nit * 32,
                                           num_splits=ns, min_blocks=min_blocks,
                                           **({"pre_rope": False} if post else {}))
            finally:
                mod._kernel = saved
        return run

    def outputs(run, lengths):
        scr.fill_(float("nan"))
        run(lengths)
        valid = torch.arange(CAP, device=dev)[None, None] < lengths[:, None, None]
        return [torch.where(valid, scr, torch.zeros_like(scr))]
    return launcher, outputs


def rotatekv_scores(args):
    launcher, outputs = rotatekv_scores_bench(args.post)
    variants = []
    if args.baseline:
        variants.append(("baseline", launcher(_module(args.baseline, "baseline"), 2, 2)))
    for spec in args.variants or ["2,2"]:
        mb, sp = (int(x) for x in spec.split(","))
        variants.append((f"min_blocks={mb} splits_per_sm={sp}", launcher(rotatekv_scores_cuda, mb, sp)))
    return compare(variants, outputs, args.rounds)


def _merged(run, lengths):
    """The values pass's split partials merged by their log-sum-exp weights (so that split counts compare)."""
    o, lse = run(lengths)
    w = torch.softmax(torch.nan_to_num(lse, neginf=-1e30), -1)
    return [(o * w[..., None]).sum(2)]


def _against_baseline(run_of, old, shipped, setting, specs):
    """[(name, run)]: the baseline module at its defaults, then the shipped one at each of `specs`
    (integers for `setting`, or "auto": its own default; the default list is ["auto"])."""
    return [("baseline", run_of(old))] + [(f"shipped, {setting}={v}", run_of(shipped, None if v == "auto" else int(v)))
                                          for v in specs or ["auto"]]


def values(args):
    """The baseline module (default splits), then the shipped one at each of `--variants`' split
    counts ("auto": the launcher's plan)."""
    if not args.baseline:
        raise SystemExit("kernel_ab.py values: --baseline (an older values_cuda.py) is required")
    dev = torch.device("cuda")
    old = _module(args.baseline, "baseline")
    gen = torch.Generator().manual_seed(0)
    scores = (torch.randn(B, HEADS, CAP, generator=gen) * 2).to(dev)
    rows = {}
    for layout, group, integer_zero, rotate_out in (("G128 (rotatekv)", 128, True, False),
                                                    ("G64 rotated (quarot)", 64, True, True),
                                                    ("G32 float zeros (kivi)", 32, False, False)):
        vc, vs, vz = checks._store(gen, B, HEADS, CAP, 128, 2, group, dev, float_zero=not integer_zero)

        def run_of(mod, splits=None):
            return lambda lengths: mod.values_from_scores(scores, vc, vs, vz, lengths, group_size=group,
                                                          integer_zero=integer_zero, rotate_out=rotate_out,
                                                          num_splits=splits)
        print(layout, flush=True)
        rows[layout] = compare(_against_baseline(run_of, old, values_cuda, "splits", args.variants), _merged,
                               args.rounds)
    return rows


def kivi_scores(args):
    if not args.baseline:
        raise SystemExit("kernel_ab.py kivi_scores: --baseline (an older kivi_scores_cuda.py) is required")
    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(0)
    capg = CAP // 32
    kc, ks, kz, _ = checks._kivi_store(gen, B, HEADS, capg, 128, 2, 32, dev)
    q = torch.randn(B, HEADS, 128, generator=gen).half().to(dev)
    scr = torch.empty(B, HEADS, CAP, device=dev)
    tmax = torch.empty(B, HEADS, CAP // 16, device=dev)
    def run_of(mod, splits, min_blocks=None):  # `splits` programs a row, the groups shared evenly (as captured)
        step = mod.WARPS * mod.GROUPS_PER_WARP  # groups a program takes an iteration
        tiles = -(-capg // step)
        per = -(-tiles // splits)
        kw = {} if min_blocks is None else {"min_blocks": min_blocks}
        return lambda lengths: mod.kivi_scores(q, kc, ks, kz, lengths // 32 * 32, 128**-0.5 * 1.4426950408889634,
                                               scr, tmax, split_groups=per * step, num_splits=-(-tiles // per), **kw)

    def outputs(run, lengths):
        scr.fill_(float("nan"))
        tmax.fill_(float("nan"))
        run(lengths)
        return [torch.nan_to_num(scr.clone(), nan=0.0), torch.nan_to_num(tmax.clone(), nan=0.0)]

    old = _module(args.baseline, "baseline")
    variants = [(f"baseline, splits={args.baseline_splits}", run_of(old, args.baseline_splits))]
    for spec in args.variants or []:  # "splits" or "splits,min_blocks"
        splits, *mb = (int(x) for x in spec.split(","))
        mb = mb[0] if mb else None
        variants += [(f"baseline, splits={splits}, min_blocks={mb}", run_of(old, splits, mb)),
                     (f"shipped, splits={splits}, min_blocks={mb}", run_of(kivi_scores_cuda, splits, mb))]
    return compare(variants, outputs, args.rounds)


def token_scores(args):
    """The per-token key pass (rtn, quarot) in quarot's layout (groups of 64, query rotated in the
    kernel): the baseline module, then the shipped one, each at its captured split plan; scores and
    16-token tile maxima compared."""
    if not args.baseline:
        raise SystemExit("kernel_ab.py token_scores: --baseline (an older token_scores_cuda.py) is required")
    from kvbench.kernels import token_scores_cuda

    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(0)
    kc, ks, kz = checks._store(gen, B, HEADS, CAP, 128, 2, 64, dev)
    q = torch.randn(B, HEADS, 128, generator=gen).half().to(dev)
    scr = torch.empty(B, HEADS, CAP, device=dev)
    tmax = torch.empty(B, HEADS, CAP // 16, device=dev)

    def run_of(mod):
        tiles = -(-CAP // mod.STEP)
        ns = max(1, min(mod.SPLITS_PER_SM * torch.cuda.get_device_properties(0).multi_processor_count // (B * HEADS),
                        tiles, 64))  # as `split_plan` sizes a captured grid
        per = -(-tiles // ns)
        return lambda lengths: mod.token_scores(q, kc, ks, kz, lengths, 128**-0.5 * 1.4426950408889634, scr,
                                                group_size=64, split_len=per * mod.STEP, num_splits=-(-tiles // per),
                                                tile_max=tmax, rotate_q=True)

    def outputs(run, lengths):
        scr.fill_(float("nan"))
        tmax.fill_(float("nan"))
        run(lengths)
        return [torch.nan_to_num(scr.clone(), nan=0.0), torch.nan_to_num(tmax.clone(), nan=0.0)]

    return compare([("baseline", run_of(_module(args.baseline, "baseline"))), ("shipped", run_of(token_scores_cuda))],
                   outputs, args.rounds)


def fp_partial(args):
    """The full-precision tokens' partial (`fp_partial.fp_partial_fused`) of KIVI-2's 160-slot ring
    window and RotateKV-2's 20 sinks at B8 x 32 heads: the baseline module, then the shipped one at
    each of `--variants`' PROGRAMS_PER_SM (default: its own)."""
    if not args.baseline:
        raise SystemExit("kernel_ab.py fp_partial: --baseline (an older fp_partial.py) is required")
    from kvbench.kernels import fp_partial as shipped

    dev = torch.device("cuda")
    old = _module(args.baseline, "baseline")
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(B, HEADS, 128, generator=gen).half().to(dev)
    rows = {}
    for case, slots in (("kivi-2 window (160-slot ring)", 160), ("rotatekv-2 sinks (20)", 20)):
        k = torch.randn(B, HEADS, slots, 128, generator=gen).half().to(dev)
        v = torch.randn(B, HEADS, slots, 128, generator=gen).half().to(dev)
        if slots == 160:
            n, nq = torch.full((B,), CAP, device=dev), torch.full((B,), CAP - 144, device=dev)
            call = {"valid": None, "ring": (n, nq)}
        else:
            call = {"valid": torch.ones(B, slots, dtype=torch.bool, device=dev), "ring": None}

        def run_of(mod, per_sm=None):
            def run(lengths):  # (the lengths are the packed read's: not used here)
                saved = mod.PROGRAMS_PER_SM
                mod.PROGRAMS_PER_SM = per_sm or saved
                try:
                    return mod.fp_partial_fused(q, k, v, call["valid"], 128**-0.5, ring=call["ring"])
                finally:
                    mod.PROGRAMS_PER_SM = saved
            return run
        print(case, flush=True)
        rows[case] = compare(_against_baseline(run_of, old, shipped, "programs_per_sm", args.variants), _merged,
                             args.rounds)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("kernel", choices=["rotatekv_scores", "values", "kivi_scores", "token_scores", "fp_partial"])
    ap.add_argument("--out", required=True)
    ap.add_argument("--baseline", default=None)
    ap.add_argument("--variants", nargs="+", default=None)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--post", action="store_true", help="rotatekv_scores: the post-RoPE build (keys rotated after RoPE)")
    ap.add_argument("--baseline-splits", type=int, default=2, help="kivi_scores: the baseline's splits a row")
    args = ap.parse_args()
    rows = {"rotatekv_scores": rotatekv_scores, "values": values, "kivi_scores": kivi_scores,
            "token_scores": token_scores, "fp_partial": fp_partial}[args.kernel](args)
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "kernel": args.kernel, "variants": rows}, f, indent=1)


if __name__ == "__main__":
    main()
