"""Launch sweep of the hand-laid two-pass read for per-token packed K/V, each pass alone and both:
`token_scores_cuda` (keys) and `values_cuda` (values, also RotateKV's and KIVI's values pass), with
U = tiles a warp loads before computing x splits an SM (the ninth session's runs also swept
register double-buffering and the values' operand layout, since removed: results/.../session9/);
then KIVI's key pass (`kivi_scores_cuda`) alone, then both per-token passes as `decode_mha_cuda`
runs them. Llama-2-7B shape (32 heads of 128, MHA),
batch 8, context 8192, 2 bits, groups of 64 (values also 32 with float zeros: KIVI's). 20 launches
captured in a CUDA graph, median over 20 replays; bandwidth over the bytes each pass must read,
as a fraction of this run's copy bandwidth. Usage: python benchmarks/two_pass_cuda_sweep.py --out F"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from kvbench.kernels import checks, decode_mha_cuda, kivi_scores_cuda as kq  # noqa: E402
from kvbench.kernels import token_scores_cuda as tc, values_cuda as vc  # noqa: E402
from kvbench.gpu_timing import amortized_ms  # noqa: E402
from kvbench.kernels.decode_attention import split_plan  # noqa: E402


def copy_gbps():
    n = 2**30 // 2
    src = torch.empty(n, dtype=torch.float16, device="cuda")
    dst = torch.empty_like(src)
    return 2 * n * 2 / (amortized_ms(lambda: dst.copy_(src), calls=5, reps=10) * 1e-3) / 1e9


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--both-only", action="store_true",
                    help="only both passes: key x values splits an SM, with and without the programmatic launch")
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    b, h, cap, group = 8, 32, 8192, 64
    kc, ks, kz = checks._store(gen, b, h, cap, 128, 2, group, "cuda")
    v = {(g, iz): checks._store(gen, b, h, cap, 128, 2, g, "cuda", float_zero=not iz)
         for g, iz in ((64, True), (32, False))}
    q = (torch.randn(b, h, 128, generator=gen) * 0.3).half().cuda()
    lengths = torch.full((b,), cap, device="cuda")
    scores = (torch.randn(b, h, cap, generator=gen) * 3).cuda()
    scr = torch.empty(b, h, cap, device="cuda")
    sm = 128**-0.5 * 1.4426950408889634
    bw = copy_gbps()
    rows = []

    def record(name, ms, nbytes, **cfg):
        gbps = nbytes / (ms * 1e-3) / 1e9
        rows.append(dict(pass_=name, **cfg, ms=ms, GBps=gbps, fraction_of_copy=gbps / bw))
        print(rows[-1], flush=True)

    key_bytes = b * h * cap * (32 + 4 * 128 // group)
    if not args.both_only:  # each pass alone, then KIVI's key pass
        for tiles in (1, 2, 4):
            for per_sm in (4, 8):
                ns, nit = split_plan(cap, tc.STEP, b * h, "cuda", per_sm=per_sm)

                def keys():
                    tc.token_scores(q, kc, ks, kz, lengths, sm, scr, group_size=group, split_len=nit * tc.STEP,
                                    num_splits=ns, tiles=tiles)

                record("token_scores G64", amortized_ms(keys), key_bytes + b * h * cap * 4, tiles=tiles, splits_per_sm=per_sm)
        for (g, iz), (vcodes, vscale, vzero) in v.items():
            val_bytes = b * h * cap * (32 + 4 * 128 // g + 4)  # codes, scale and zero, the score
            for tiles in (1, 2, 4, 8):
                for per_sm in (4, 8):

                    def values():
                        vc.values_from_scores(scores, vcodes, vscale, vzero, lengths, group_size=g, integer_zero=iz,
                                              splits_per_sm=per_sm, tiles=tiles)

                    record(f"values G{g} int_zero={iz}", amortized_ms(values), val_bytes, tiles=tiles, splits_per_sm=per_sm)
        # KIVI's key pass alone (groups of 32): splits an SM x programs an SM its registers are held to
        kk, kks, kkz, _ = checks._kivi_store(gen, b, h, cap // 32, 128, 2, 32, "cuda")
        nq = torch.full((b,), cap, device="cuda")
        kscr = torch.empty(b, h, cap, device="cuda")
        ktmax = torch.empty(b, h, cap // 16, device="cuda")
        kivi_key_bytes = b * h * cap * (32 + 16)  # codes, and a scale and zero a channel per 32 tokens
        for per_sm in (2, 4, 8):
            for min_blocks in (2, 3, 4):
                step = kq.WARPS * kq.GROUPS_PER_WARP
                ns_k, nit_k = split_plan(cap // 32, step, b * h, "cuda", per_sm=per_sm)

                def kivi_keys():
                    kq.kivi_scores(q, kk, kks, kkz, nq, sm, kscr, ktmax, split_groups=nit_k * step, num_splits=ns_k,
                                   min_blocks=min_blocks)

                record("kivi_scores G32", amortized_ms(kivi_keys), kivi_key_bytes + b * h * cap * 4, splits_per_sm=per_sm,
                       min_blocks=min_blocks)
    # both passes as decode_per_token_mha runs them (each its own launch settings), the packed bytes
    # of K and V; then the same with the values pass scanning the scores for each split's maximum
    # instead of reading the key pass's tile maxima
    vcodes, vscale, vzero = v[(64, True)]

    def both():
        decode_mha_cuda.decode_per_token_mha_cuda(q, kc, ks, kz, vcodes, vscale, vzero, lengths, 128**-0.5,
                                                  group_size=group)

    record("both passes G64", amortized_ms(both), 2 * key_bytes, splits_per_sm="own")
    ns, nit = split_plan(cap, tc.STEP, b * h, "cuda", per_sm=tc.SPLITS_PER_SM)

    def both_scan():
        tc.token_scores(q, kc, ks, kz, lengths, sm, scr, group_size=group, split_len=nit * tc.STEP, num_splits=ns)
        vc.values_from_scores(scr, vcodes, vscale, vzero, lengths, group_size=group)

    record("both passes G64, values scan the scores", amortized_ms(both_scan), 2 * key_bytes, splits_per_sm="own")
    # both passes, each pass's splits an SM swept, rtn's and quarot's reads, the values pass launched
    # programmatically (overlapping the key pass's end) or not
    tmax = torch.empty(b, h, -(-cap // 16), dtype=torch.float32, device="cuda")
    for rot in (False, True):
        for kps in (4, 8, 16):
            for vps in (2, 4, 8):
                for pdl in (True, False):
                    def both_cfg(rot=rot, kps=kps, vps=vps, pdl=pdl):
                        nsk, nitk = split_plan(cap, tc.STEP, b * h, "cuda", per_sm=kps)
                        tc.token_scores(q, kc, ks, kz, lengths, sm, scr, group_size=group, split_len=nitk * tc.STEP,
                                        num_splits=nsk, tile_max=tmax, rotate_q=rot)
                        vc.values_from_scores(scr, vcodes, vscale, vzero, lengths, group_size=group, splits_per_sm=vps,
                                              tile_max=tmax, rotate_out=rot, programmatic=pdl)

                    record("both passes G64" + (", quarot rotations" if rot else ""), amortized_ms(both_cfg),
                           2 * key_bytes, key_splits_per_sm=kps, values_splits_per_sm=vps, programmatic=pdl)
    json.dump(dict(device=torch.cuda.get_device_name(), copy_GBps=bw,
                   shape="B8 x 8192, 32 heads of 128, MHA, 2 bits", rows=rows), open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
