"""What bounds RotateKV's CUDA key pass: the shipped build against copies of it with part of the
per-element work removed. The copies' scores are wrong on purpose; they are timing bounds, not
candidate kernels. Llama-2-7B shape, B8 x 8192, alternating on one machine (`kernel_ab.compare`).

    python benchmarks/kernel_bounds.py --out bounds.json

Variants (each a text substitution in `rotatekv_scores_cuda._SOURCE`, so they track the shipped
source and fail loudly when it changes):
- **no lookups**: every element dequantized with two registers the lane already holds standing in
  for its group's (zero, scale): the calibrated permutation's per-element lookups (2 PRMT + 1 LDS
  an element) and the pairing PRMTs gone, as a group map uniform over a lane's elements would
  allow. The scale rows' staging (volatile stores, ~3% of the loop) stays, so this bound is a
  little above what such a design would take;
- **pair lookups**: one 8-byte lookup a pair of channels instead of two 4-byte ones and no pairing
  PRMTs (what a permutation that keeps both channels of a pair in one group would cost);
- **no butterfly** (pre-RoPE build only): the in-thread H_4 x H_8 stages skipped;
- both removals together.
The time left with both removed is what the rest (loads, code extraction, staging, the products,
RoPE, the reduction) costs: a floor for any faster key pass of this structure.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import kernel_ab  # noqa: E402

from kvbench.kernels import rotatekv_scores_cuda  # noqa: E402

LOOKUP = """    const unsigned l0 = lds(prmt(o, lbase, 0x7604 | ((2 * k3) << 4)));
    const unsigned l1 = lds(prmt(o, lbase, 0x7604 | ((2 * k3 + 1) << 4)));
    return hmul2(hsub2(x, prmt(l0, l1, 0x5410)), prmt(l0, l1, 0x7632));"""
PAIR_LOOKUP = """    unsigned l0, l1;
    asm volatile("ld.shared.v2.b32 {%0, %1}, [%2];" : "=r"(l0), "=r"(l1)
                 : "r"(prmt(o, lbase, 0x7604 | ((2 * k3) << 4)) & ~7u));
    return hmul2(hsub2(x, l0), l1);"""
NO_LOOKUP = """    return hmul2(hsub2(x, o), lbase);"""
BUTTERFLY = "        // H_4 (heads) x H_8 (a), unnormalized, in fp16x2\n#pragma unroll\n        for (int k3 = 0; k3 < 2; ++k3) {"
NO_BUTTERFLY = BUTTERFLY.replace("k3 < 2", "k3 < 0")

VARIANTS = {
    "no lookups": [(LOOKUP, NO_LOOKUP)],
    "pair lookups": [(LOOKUP, PAIR_LOOKUP)],
    "no butterfly": [(BUTTERFLY, NO_BUTTERFLY)],
    "no lookups, no butterfly": [(LOOKUP, NO_LOOKUP), (BUTTERFLY, NO_BUTTERFLY)],
}


def edited_module(name: str, subs, workdir: Path):
    """A copy of `rotatekv_scores_cuda` with `subs` applied to its kernel source."""
    text = Path(rotatekv_scores_cuda.__file__).read_text()
    for old, new in subs:
        if old not in text:
            raise SystemExit(f"kernel_bounds: variant {name!r} no longer matches rotatekv_scores_cuda's source")
        text = text.replace(old, new)
    path = workdir / f"rotatekv_scores_{len(list(workdir.iterdir()))}.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--workdir", default="/tmp/kvbench-kernel-bounds")
    args = ap.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    rows = {}
    for post in (False, True):
        launcher, outputs = kernel_ab.rotatekv_scores_bench(post)
        variants = [("shipped", launcher(rotatekv_scores_cuda, 2, 2))]
        for name, subs in VARIANTS.items():
            if post and any(old == BUTTERFLY for old, _ in subs):
                continue  # the post-RoPE build has no butterfly
            variants.append((name, launcher(edited_module(name, subs, workdir), 2, 2)))
        kind = "post-RoPE" if post else "pre-RoPE"
        print("==", kind, flush=True)
        rows[kind] = kernel_ab.compare(variants, outputs, args.rounds)
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "what": __doc__, "variants": rows}, f, indent=1)


if __name__ == "__main__":
    main()
