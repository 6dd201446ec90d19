"""Correctness checks of the decode kernels against kvbench.kernels.reference, shared by
tests/test_kernels.py (CPU, TRITON_INTERPRET=1, small shapes) and benchmarks/kernels_gpu.py (GPU).

Inputs: random codes (every code value occurs), fp16 scales spanning 0.01..0.5 with a few rows
x50 (outliers), random zeros, fp16 queries with outlier channels; lengths that are not multiples
of the block or group sizes, batch > 1 with different lengths per row, GQA (2 query heads per KV
head) and MHA.

Error bound (stated): the kernels compute dot products in fp16 with fp32 accumulation, so
max |kernel - reference| <= 2e-3 * max |reference| on the merged attention output (1e-5 for
RotateKV's float32 `exact` read), and
|lse - lse_ref| <= 1e-3 * max(1, max |lse_ref|), the reference computed in float32 from the same
packed data.
"""

from __future__ import annotations

import math

import torch

from kvbench.kernels import decode_attention as da
from kvbench.kernels import reference as ref
from kvbench.packing import pack

REL_BOUND = 2e-3


def _store(gen, batch, streams, cap, n, bits, group, device, float_zero=False):
    codes = torch.randint(0, 1 << bits, (batch, streams, cap, n), generator=gen, dtype=torch.uint8)
    # Dequantized values of order 1, outlier tokens x8 (scores of order 10, as in real models).
    scale = (torch.rand(batch, streams, cap, n // group, generator=gen) * 0.5 + 0.05) * 4 / (1 << bits)
    scale[:, :, ::7] *= 8.0
    if float_zero:
        zero = -scale * (1 << bits) / 2 + torch.randn(batch, streams, cap, n // group, generator=gen) * 0.1
    else:
        zero = torch.randint(0, 1 << bits, (batch, streams, cap, n // group), generator=gen).float()
    return pack(codes, bits).to(device), scale.half().to(device), zero.half().to(device)


def _query(gen, b, hq, d, device):
    q = torch.randn(b, hq, d, generator=gen)
    q[..., 5] *= 8.0
    return (q * 0.3).half().to(device)


def _compare(name, out, lse, r_out, r_lse, results, rel_bound=REL_BOUND):
    a = ref.merge_partials([(out, lse)])
    r = ref.merge_partials([(r_out, r_lse)])
    err = float((a - r).abs().max())
    bound = rel_bound * float(r.abs().max())
    got, want = torch.logsumexp(lse, -1), r_lse[..., 0]
    seen = torch.isfinite(want)  # rows with no tokens have lse -inf, and must get it
    any_seen = bool(seen.any())
    lse_err = float((got[seen] - want[seen]).abs().max()) if any_seen else 0.0
    lse_bound = 1e-3 * max(1.0, float(want[seen].abs().max()) if any_seen else 1.0)
    empty_ok = bool(torch.isneginf(got[~seen]).all())
    results.append({"kernel": name, "max_abs_err": err, "bound": bound, "lse_err": lse_err,
                    "ok": err <= bound and empty_ok and lse_err <= lse_bound})


def check_per_token(device, small=True, results=None):
    results = [] if results is None else results
    gen = torch.Generator().manual_seed(0)
    b, hkv, gq, d = (2, 2, 2, 64) if small else (4, 8, 4, 128)
    cap = 83 if small else 1000
    lengths = torch.tensor([83, 37] if small else [1000, 999, 517, 1]).to(device)
    for bits, group, int_zero, fold in ((2, 32, True, False), (4, 16, False, False), (8, 64, True, False),
                                        (2, 8, True, False), (2, 64, True, True), (4, 64, False, True)):
        k = _store(gen, b, hkv, cap, d, bits, group, device, not int_zero)
        v = _store(gen, b, hkv, cap, d, bits, group, device, not int_zero)
        q = _query(gen, b, hkv * gq, d, device)
        o, lse = da.decode_per_token(q, *k, *v, lengths, d**-0.5, bits=bits, group_size=group,
                                     integer_zero=int_zero, num_splits=3 if small else None,
                                     block_n=16 if small else 64, fold_offset=fold, mha=False)  # the tensor-core kernel
        ro, rl = ref.ref_decode_per_token(q.float(), *k, *v, lengths, d**-0.5, bits=bits, group_size=group,
                                          integer_zero=int_zero)
        _compare(f"per_token bits={bits} G={group} int_zero={int_zero} fold={fold}", o, lse, ro, rl, results)
    return results


def check_gqa_cuda(device, results=None):
    """Grouped queries (2 and 4 query heads a KV head) through the CUDA passes, as `decode_per_token`
    and `decode_kivi` route them on a GPU (one program a KV row at 4 query heads with one or two
    groups a row, else one a query head): 2-bit per-token K/V in groups of 32, 64 and 128 (quarot's
    rotated storage too) and KIVI's, ragged lengths, against the float references."""
    from kvbench.kernels import decode_kivi_mha, decode_mha_cuda

    results = [] if results is None else results
    gen = torch.Generator().manual_seed(11)
    b, hkv, d, cap = 3, 4, 128, 777
    lengths = torch.tensor([777, 700, 65], device=device)
    for gq, group, hadamard in ((4, 64, False), (2, 32, False), (4, 128, False), (4, 64, True), (2, 64, False)):
        k = _store(gen, b, hkv, cap, d, 2, group, device)
        v = _store(gen, b, hkv, cap, d, 2, group, device)
        q = _query(gen, b, hkv * gq, d, device)
        if not decode_mha_cuda.use_cuda(None, q, k[1], v[1], 2, group, True, "check_gqa_cuda"):
            continue  # (no CUDA device with NVRTC: nothing here takes these passes)
        o, lse = da.decode_per_token(q, *k, *v, lengths, d**-0.5, bits=2, group_size=group, hadamard=hadamard)
        def reference(qr, k=k, v=v, group=group):
            return ref.ref_decode_per_token(qr.float(), *k, *v, lengths, d**-0.5, bits=2, group_size=group,
                                            integer_zero=True)
        # (quarot's stored K and V are rotated: the reference reads them with H q and rotates its output back)
        ro, rl = da.hadamard_read(q, reference) if hadamard else reference(q)
        _compare(f"grouped queries gq={gq} per_token G={group}" + (" quarot" if hadamard else ""), o, lse, ro, rl,
                 results)
    capg = 24
    for gq in (2, 4):
        kc, ks, kz, v = _kivi_store(gen, b, hkv, capg, d, 2, 32, device)
        q = _query(gen, b, hkv * gq, d, device)
        nq = torch.tensor([capg * 32, 11 * 32, 0], device=device)
        if not decode_kivi_mha.cuda_passes_fit(q, ks, v[0], v[1], 2, 32):
            continue
        o, lse = da.decode_kivi(q, kc, ks, kz, *v, nq, d**-0.5, bits=2, group_size=32)
        ro, rl = ref.ref_decode_kivi(q.float(), kc, ks, kz, *v, nq, d**-0.5, bits=2, group_size=32)
        _compare(f"grouped queries gq={gq} kivi G=32", o, lse, ro, rl, results)
    return results


def check_per_token_mha(device, small=True, results=None):
    """The kernels for one query head per KV head (`decode_mha`'s Triton kernel and, where it fits,
    the two CUDA passes of `decode_mha_cuda`), every bit width, integer and float zeros, one to
    four groups a row, ragged lengths and empty splits."""
    from kvbench.kernels import decode_mha, decode_mha_cuda

    results = [] if results is None else results
    gen = torch.Generator().manual_seed(5)
    b, h, d = (3, 2, 64) if small else (4, 32, 128)
    cap = 83 if small else 3000
    lengths = torch.tensor([83, 37, 1] if small else [3000, 2999, 1517, 1]).to(device)
    for bits, group, int_zero in ((2, 64, True), (2, 32, True), (2, 16, True), (4, 64, False), (4, 32, True),
                                  (8, 64, True), (2, 128, True)):
        if not decode_mha.supports(1, d, bits, group):
            continue
        k = _store(gen, lengths.numel(), h, cap, d, bits, group, device, not int_zero)
        v = _store(gen, lengths.numel(), h, cap, d, bits, group, device, not int_zero)
        q = _query(gen, lengths.numel(), h, d, device)
        ro, rl = ref.ref_decode_per_token(q.float(), *k, *v, lengths, d**-0.5, bits=bits, group_size=group,
                                          integer_zero=int_zero)
        impls = ["triton"] + (["cuda"] if decode_mha_cuda.fits(q, k[1], v[1], bits, group, int_zero) else [])
        for impl in impls:
            o, lse = decode_mha.decode_per_token_mha(q, *k, *v, lengths, d**-0.5, bits=bits, group_size=group,
                                                     integer_zero=int_zero, num_splits=3 if small else None,
                                                     block_n=16 if small else 64, impl=impl)
            _compare(f"per_token_mha {impl} bits={bits} G={group} int_zero={int_zero}", o, lse, ro, rl, results)
        if (bits, group) == (2, 64):  # K and V stored Hadamard-rotated (quarot): q and the outputs rotated inside
            from kvbench.hadamard import hadamard_matrix

            hm = hadamard_matrix(d, torch.float32, device)
            rho, rhl = ref.ref_decode_per_token((q.float() @ hm).half().float(), *k, *v, lengths, d**-0.5, bits=bits,
                                                group_size=group, integer_zero=int_zero)
            for impl in impls:
                o, lse = decode_mha.decode_per_token_mha(q, *k, *v, lengths, d**-0.5, bits=bits, group_size=group,
                                                         integer_zero=int_zero, num_splits=3 if small else None,
                                                         block_n=16 if small else 64, impl=impl, hadamard=True)
                _compare(f"per_token_mha {impl} hadamard bits={bits} G={group}", o, lse, rho @ hm, rhl, results)
    return results


def check_token_scores_cuda(device, results=None):
    """The CUDA key pass for per-token keys (`token_scores_cuda`) against its torch emulation (same
    operands and channel map) and the float64 scores: groups of 32, 64 and 128, lengths off the
    16-token tile, batch > 1, an outlier query channel, splits that end mid-tile."""
    from kvbench.kernels import token_scores_cuda as tc

    results = [] if results is None else results
    gen = torch.Generator().manual_seed(7)
    b, h, cap = 3, 8, 701
    lengths = torch.tensor([701, 650, 3], device=device)
    sm = 128**-0.5 * 1.4426950408889634
    for group, splits in ((64, 1), (128, 3), (32, 5)):
        kc, ks, kz = _store(gen, b, h, cap, 128, 2, group, device)
        q = _query(gen, b, h, 128, device).half()
        scr = torch.full((b, h, cap), float("nan"), device=device)
        tmax = torch.full((b, h, -(-cap // 16)), float("nan"), device=device)
        split_len = -(-cap // splits // tc.STEP) * tc.STEP
        tc.token_scores(q, kc, ks, kz, lengths, sm, scr, group_size=group, split_len=split_len,
                        num_splits=-(-cap // split_len), tile_max=tmax)
        emu = tc.emulate_scores(q, kc, ks, kz, lengths, sm, group_size=group)
        k = ref.unpack_per_token(kc, ks, kz, 2, group, True).double()
        want = torch.einsum("bhd,bhcd->bhc", q.double(), k) * sm
        valid = torch.isfinite(emu)
        err_ref = float((scr.double() - want)[valid].abs().max())
        scale = float(want[valid].abs().max())
        # each 16-token tile's maximum, over its valid tokens, exactly (tiles past a row's end unread)
        padded = torch.where(valid, scr, torch.full_like(scr, float("-inf")))
        padded = torch.nn.functional.pad(padded, (0, tmax.shape[-1] * 16 - cap), value=float("-inf"))
        want_max = padded.reshape(b, h, -1, 16).amax(-1)
        seen = torch.isfinite(want_max)
        max_ok = bool(torch.equal(tmax[seen], want_max[seen]))
        results.append({"kernel": f"token_scores_cuda G={group} splits={splits}", "max_abs_err": err_ref,
                        "bound": REL_BOUND * scale, "err_vs_emulation": float((scr - emu)[valid].abs().max()),
                        "tile_max_exact": max_ok,
                        "ok": bool(err_ref <= REL_BOUND * scale and not scr[valid].isnan().any() and max_ok)})
    return results


def _kivi_store(gen, b, hkv, capg, d, bits, group, device):
    """Random KIVI packed K (channel-major per group of tokens, an outlier channel) and V."""
    pt = group * bits // 8
    kc = torch.randint(0, 256, (b, hkv, capg, d, pt), generator=gen, dtype=torch.uint8).to(device)
    ks = ((torch.rand(b, hkv, capg, d, generator=gen) * 0.5 + 0.05) * 4 / (1 << bits))
    ks[:, :, :, 3] *= 8.0  # outlier channel
    ks = ks.half().to(device)
    kz = (torch.randn(b, hkv, capg, d, generator=gen) * 2).half().to(device)
    v = _store(gen, b, hkv, capg * group, d, bits, group, device, float_zero=True)
    return kc, ks, kz, v


def check_kivi(device, small=True, results=None):
    results = [] if results is None else results
    gen = torch.Generator().manual_seed(1)
    b, hkv, gq, d = (2, 2, 2, 64) if small else (4, 8, 4, 128)
    for bits, group in ((2, 32), (4, 16), (2, 16)):
        capg = 5 if small else 40
        kc, ks, kz, v = _kivi_store(gen, b, hkv, capg, d, bits, group, device)
        q = _query(gen, b, hkv * gq, d, device)
        nq = torch.tensor([capg * group, 2 * group] + [group] * (b - 2)).to(device)
        o, lse = da.decode_kivi(q, kc, ks, kz, *v, nq, d**-0.5, bits=bits, group_size=group,
                                num_splits=2 if small else None, groups_per_tile=2 if small else None,
                                mha=False)  # the tensor-core kernel
        ro, rl = ref.ref_decode_kivi(q.float(), kc, ks, kz, *v, nq, d**-0.5, bits=bits, group_size=group)
        _compare(f"kivi bits={bits} G={group}", o, lse, ro, rl, results)
    return results


def check_kivi_mha(device, small=True, results=None):
    """KIVI's CUDA-core kernel for one query head per KV head (`decode_kivi_mha`): bit widths and
    group sizes it takes, ragged quantized lengths including an empty row, empty splits."""
    from kvbench.kernels import decode_kivi_mha as km

    results = [] if results is None else results
    gen = torch.Generator().manual_seed(7)
    b, h, d = (3, 2, 64) if small else (4, 32, 128)
    for bits, group in ((2, 32), (2, 16), (2, 64), (4, 32), (8, 32)):
        if not km.supports(1, d, bits, group):
            continue
        capg = 7 if small else 100
        kc, ks, kz, v = _kivi_store(gen, b, h, capg, d, bits, group, device)
        q = _query(gen, b, h, d, device)
        nq = torch.tensor([capg * group, 2 * group, 0] + [(capg - 1) * group] * (b - 3)).to(device)
        ro, rl = ref.ref_decode_kivi(q.float(), kc, ks, kz, *v, nq, d**-0.5, bits=bits, group_size=group)
        # both passes in the Triton kernel; (2-bit rows of 128 on CUDA) the values pass on the tensor
        # cores after the Triton key pass, and (groups of 32) both passes in CUDA
        impls = [("triton", "triton")]
        if str(device).startswith("cuda") and d == 128 and bits == 2:
            impls += [("triton", "cuda")] + ([("cuda", "cuda")] if group == 32 else [])
        for scores_impl, values_impl in impls:
            o, lse = km.decode_kivi_mha(q, kc, ks, kz, *v, nq, d**-0.5, bits=bits, group_size=group,
                                        num_splits=3 if small else None, groups_per_tile=2 if small else None,
                                        block_n=16 if small else 64, values_impl=values_impl,
                                        scores_impl=scores_impl)
            _compare(f"kivi_mha keys {scores_impl} values {values_impl} bits={bits} G={group}", o, lse, ro, rl,
                     results)
    return results


def rotatekv_inputs(gen, b, hkv, gq, d, cap, bits, group, head_group, device, theta=10000.0):
    from kvbench.rope import rope_tables

    ngrp, c = hkv // head_group, hkv * d
    kc = torch.randint(0, 256, (b, ngrp, cap, head_group * d * bits // 8), generator=gen, dtype=torch.uint8)
    ks = (torch.rand(b, 1, cap, c // group, generator=gen) * 0.5 + 0.05) * 4 / (1 << bits)
    ks[:, :, ::5] *= 8.0
    kz = torch.randint(0, 1 << bits, (b, 1, cap, c // group), generator=gen).float()
    inv = torch.randperm(c, generator=gen)
    gid = (inv // group).to(torch.int32)
    v = _store(gen, b, hkv, cap, d, bits, min(group, d), device)
    pos = torch.arange(cap)[None].expand(b, cap).to(torch.int32).contiguous()
    cos, sin = rope_tables(torch.arange(cap)[None], d, theta, dtype=torch.float16)
    return (kc.to(device), ks.half().to(device), kz.half().to(device), gid.to(device), *v, pos.to(device),
            cos[0].contiguous().to(device), sin[0].contiguous().to(device))


def check_rotatekv(device, small=True, results=None):
    results = [] if results is None else results
    gen = torch.Generator().manual_seed(2)
    b, hkv, gq, d = (2, 4, 2, 64) if small else (4, 8, 2, 128)
    cap = 45 if small else 700
    lengths = torch.tensor([45, 23] if small else [700, 699, 311, 2]).to(device)
    for head_group, pre_rope, bits, group, perm in ((2, True, 2, 32, True), (2, False, 2, 64, True),
                                                    (1, True, 4, 16, True), (4, True, 2, 64, True),
                                                    (2, True, 2, d, False), (4, False, 4, d, False)):
        if hkv % head_group:
            continue
        args = rotatekv_inputs(gen, b, hkv, gq, d, cap, bits, group, head_group, device)
        kc, ks, kz, gid, vc, vs, vz, pos, cos, sin = args
        if not perm:  # identity permutation: the kernel's no-gather path
            gid = None
        q = _query(gen, b, hkv * gq, d, device)
        vg = min(group, d)
        ref_gid = gid if gid is not None else (torch.arange(hkv * d, device=device) // group).to(torch.int32)
        o, lse = da.decode_rotatekv(q, kc, ks, kz, gid, vc, vs, vz, lengths, pos, cos, sin, d**-0.5, bits=bits,
                                    group_size=vg, head_group=head_group, pre_rope=pre_rope,
                                    num_splits=2 if small else None, block_n=16 if small else None)
        ro, rl = ref.ref_decode_rotatekv(q.float(), kc, ks, kz, ref_gid, vc, vs, vz, lengths, pos, cos, sin, d**-0.5,
                                         bits=bits, group_size=vg, head_group=head_group, pre_rope=pre_rope)
        _compare(f"rotatekv hg={head_group} pre_rope={pre_rope} bits={bits} G={group} permuted={perm}", o, lse, ro, rl,
                 results)
        # float32 arithmetic (`exact`): the reference's to float32 rounding, 1e-5 relative
        o, lse = da.decode_rotatekv(q.float(), kc, ks, kz, gid, vc, vs, vz, lengths, pos, cos, sin, d**-0.5, bits=bits,
                                    group_size=vg, head_group=head_group, pre_rope=pre_rope, exact=True,
                                    num_splits=2 if small else None, block_n=16 if small else None)
        _compare(f"rotatekv exact hg={head_group} pre_rope={pre_rope} bits={bits} G={group} permuted={perm}", o, lse,
                 ro, rl, results, rel_bound=1e-5)
    return results


def check_rotatekv_mha(device, small=True, results=None):
    """decode_rotatekv_mha (one query head per KV head, a byte holding every head of the group)
    against the reference: permuted and per-head groups, pre- and post-RoPE, 2/4/8 bits."""
    from kvbench.kernels.decode_rotatekv_mha import decode_rotatekv_mha

    results = [] if results is None else results
    gen = torch.Generator().manual_seed(3)
    b, hkv, d = (2, 4, 64) if small else (4, 8, 128)
    cap = 45 if small else 700
    lengths = torch.tensor([45, 23] if small else [700, 699, 311, 2]).to(device)
    # (head group, pre-RoPE, bits, key group, permuted, stacked heads, two passes ("f16": fp16 dequantization))
    for head_group, pre_rope, bits, group, perm, stack, two in (
            (4, True, 2, d, True, False, False), (4, True, 2, d, True, True, False), (4, False, 2, d, True, False, False),
            (4, True, 2, d, False, False, False), (4, True, 2, d // 2, True, True, False),
            (2, True, 4, d, True, False, False), (2, False, 4, d, False, False, False), (1, True, 8, d, True, False, False),
            (4, True, 2, d, True, False, True), (4, False, 2, d, False, False, True), (2, True, 4, d, True, False, True),
            (4, True, 2, d, True, True, True), (1, True, 8, d, True, False, True),
            (4, True, 2, d, True, False, "f16"), (4, True, 2, d, False, False, "f16"), (2, True, 4, d, True, False, "f16"),
            # the hand-laid CUDA scores pass (head_dim 128 only: the GPU shapes)
            *(((4, True, 2, d, True, False, "cuda"), (4, True, 2, d, False, False, "cuda"),
               (4, False, 2, d, True, False, "cuda"), (4, False, 2, d, False, False, "cuda"))
              if str(device).startswith("cuda") and d == 128 else ())):
        args = rotatekv_inputs(gen, b, hkv, 1, d, cap, bits, group, head_group, device)
        kc, ks, kz, gid, vc, vs, vz, pos, cos, sin = args
        if not perm:
            gid = None
        q = _query(gen, b, hkv, d, device)
        ref_gid = gid if gid is not None else (torch.arange(hkv * d, device=device) // group).to(torch.int32)
        o, lse = decode_rotatekv_mha(q, kc, ks, kz, gid, vc, vs, vz, lengths, pos, cos, sin, d**-0.5, bits=bits,
                                     group_size=group, head_group=head_group, pre_rope=pre_rope,
                                     num_splits=2 if small else None, stack_heads=stack, two_pass=bool(two),
                                     f16_dequant=two == "f16",
                                     scores_impl="cuda" if two == "cuda" else "triton" if two else None)
        ro, rl = ref.ref_decode_rotatekv(q.float(), kc, ks, kz, ref_gid, vc, vs, vz, lengths, pos, cos, sin, d**-0.5,
                                         bits=bits, group_size=group, head_group=head_group, pre_rope=pre_rope)
        _compare(f"rotatekv_mha hg={head_group} pre_rope={pre_rope} bits={bits} G={group} permuted={perm}"
                 + (" stacked" if stack else "") + (" two-pass" if two else "") + (" f16" if two == "f16" else "")
                 + (" cuda-scores" if two == "cuda" else ""),
                 o, lse,
                 ro, rl, results)
    return results


def reference_rotatekv_scores(q, kc, ks, kz, gid, pos, cos, sin, sm_scale, pre_rope=True):
    """float64 scores [B, H, cap] of pre-RoPE RotateKV keys with 4-head groups of 128 at 2 bits:
    dequantize (gid: each channel's scale column, None for one a head), the unnormalized H_512,
    RoPE at each key's position (`pre_rope=False`: none, the keys were rotated after RoPE), dot
    with q, times sm_scale."""
    from kvbench.hadamard import hadamard_matrix
    from kvbench.rope import apply_rope

    b, ngrp, cap, _ = kc.shape
    hkv, dev = ngrp * 4, kc.device
    gg = (torch.arange(hkv * 128, device=dev) // 128) if gid is None else gid.long()
    codes = ref.unpack(kc, 2, 512).double()
    idx = gg.reshape(ngrp, 512)[None, :, None, :].expand(b, ngrp, cap, 512)
    s_full = torch.gather(ks[:, 0].double()[:, None].expand(b, ngrp, cap, ks.shape[-1]), 3, idx)
    z_full = torch.gather(kz[:, 0].double()[:, None].expand(b, ngrp, cap, kz.shape[-1]), 3, idx)
    k = ((codes - z_full) * s_full) @ (hadamard_matrix(512, torch.float64, dev) * 512**0.5)
    k = k.reshape(b, ngrp, cap, 4, 128).transpose(2, 3).reshape(b, hkv, cap, 128)
    if pre_rope:
        k = apply_rope(k, cos[pos.long()].double(), sin[pos.long()].double())
    return torch.einsum("bhd,bhcd->bhc", q.double(), k) * sm_scale


def check_rotatekv_scores_cuda(device, results=None):
    """The hand-laid CUDA scores pass against its torch emulation (same operands, fp16 rounding
    points) and against the float reference's scores, at GPU shapes: permuted and per-head groups,
    lengths that are not multiples of the 8-token tile, batch > 1, Llama-2's 32 heads; pre-RoPE keys
    and the post-RoPE build."""
    from kvbench.kernels import rotatekv_scores_cuda as rc
    from kvbench.kernels.decode_attention import split_plan

    results = [] if results is None else results
    gen = torch.Generator().manual_seed(5)
    # 8, 16 and 32 key groups a token: each width of the kernel's scale-row loads (4, 8, 16 bytes a lane)
    for b, hkv, cap, lens in ((4, 8, 700, [700, 699, 311, 2]), (3, 16, 129, [129, 64, 1]), (2, 32, 333, [333, 17])):
        for perm, pre in ((True, True), (False, True), (True, False), (False, False)):
            kc, ks, kz, gid, *_, pos, cos, sin = rotatekv_inputs(gen, b, hkv, 1, 128, cap, 2, 128, 4, device)
            g = gid if perm else None
            q = _query(gen, b, hkv, 128, device).half()
            lengths = torch.tensor(lens, device=device)
            sm = 128**-0.5 * 1.4426950408889634 / 512**0.5
            ngrp = hkv // 4
            scr = torch.full((b, hkv, cap), float("nan"), device=device)
            ns, nit = split_plan(cap, 32, b * ngrp, device, per_sm=2)
            rc.rotatekv_scores(q, kc, ks, kz, g, lengths, pos, cos, sin, sm, scr, split_len=nit * 32, num_splits=ns,
                               pre_rope=pre)
            emu = rc.emulate_scores(q, kc, ks, kz, g, lengths, pos, cos, sin, sm, pre_rope=pre)
            want = reference_rotatekv_scores(q, kc, ks, kz, g, pos, cos, sin, sm, pre_rope=pre)
            valid = torch.isfinite(emu)
            err_emu = float((scr - emu)[valid].abs().max())
            err_ref = float((scr.double() - want)[valid].abs().max())
            scale = float(want[valid].abs().max())
            results.append({"kernel": f"rotatekv_scores_cuda b={b} hkv={hkv} cap={cap} permuted={perm}"
                                      + ("" if pre else " post-RoPE"),
                            "max_abs_err": err_ref, "bound": REL_BOUND * scale, "err_vs_emulation": err_emu,
                            "ok": bool(err_ref <= REL_BOUND * scale and not scr[valid].isnan().any())})
    return results


def check_kivi_scores_cuda(device, results=None):
    """KIVI's CUDA key pass (`kivi_scores_cuda`) against its torch emulation and the float64 scores,
    with each 16-token tile's maximum exact: ragged quantized lengths (an empty row), batch > 1, an
    outlier channel in the scales, several splits."""
    from kvbench.kernels import kivi_scores_cuda as kq

    results = [] if results is None else results
    gen = torch.Generator().manual_seed(8)
    b, h, capg = 3, 8, 37
    cap = capg * 32
    for per in (64, 8):  # groups a split: one split; five (smaller than a program's 32-group step)
        kc, ks, kz, _ = _kivi_store(gen, b, h, capg, 128, 2, 32, device)
        q = _query(gen, b, h, 128, device).half()
        nq = torch.tensor([cap, 11 * 32, 0], device=device)
        sm = 128**-0.5 * 1.4426950408889634
        scr = torch.full((b, h, cap), float("nan"), device=device)
        tmax = torch.full((b, h, cap // 16), float("nan"), device=device)
        kq.kivi_scores(q, kc, ks, kz, nq, sm, scr, tmax, split_groups=per, num_splits=-(-capg // per))
        emu = kq.emulate_scores(q, kc, ks, kz, nq, sm)
        kfull = ref.dequantize(ref.Quantized(ref.unpack(kc, 2, 32), ks[..., None], kz[..., None]),
                               ref.QuantSpec(2, 32, integer_zero=False)).double()  # [B, H, capg, D, 32]
        want = torch.einsum("bhd,bhgdt->bhgt", q.double(), kfull).reshape(b, h, cap) * sm
        valid = torch.isfinite(emu)
        err = float((scr.double() - want)[valid].abs().max())
        scale = float(want[valid].abs().max())
        padded = torch.where(valid, scr, torch.full_like(scr, float("-inf"))).reshape(b, h, -1, 16).amax(-1)
        seen = torch.isfinite(padded)
        max_ok = bool(torch.equal(tmax[seen], padded[seen]))
        results.append({"kernel": f"kivi_scores_cuda groups a split={per}", "max_abs_err": err, "bound": REL_BOUND * scale,
                        "err_vs_emulation": float((scr - emu)[valid].abs().max()), "tile_max_exact": max_ok,
                        "ok": bool(err <= REL_BOUND * scale and not scr[valid].isnan().any() and max_ok)})
    return results


def check_values_cuda(device, results=None):
    """The tensor-core values pass (`values_cuda`) against the float reference: softmax(2**scores)
    @ dequantized values, groups of 32, 64 and 128, integer and float zeros, several splits, lengths
    off the 64-token step, and scales in rows not aligned to their size (one load a scale)."""
    from kvbench.kernels import values_cuda as vc

    results = [] if results is None else results
    gen = torch.Generator().manual_seed(6)
    b, h, cap = 4, 8, 700
    lengths = torch.tensor([700, 699, 311, 2], device=device)
    for group, splits, int_zero, aligned in ((128, None, True, True), (64, None, True, True), (64, 3, True, True),
                                             (32, None, False, True), (32, 2, True, True), (32, None, False, False),
                                             (64, None, True, False)):
        vcodes, vscale, vzero = _store(gen, b, h, cap, 128, 2, group, device, float_zero=not int_zero)
        if not aligned:  # the same values in rows of 128 / group + 1 halves: views whose rows are unaligned
            ng = 128 // group
            vscale, vzero = (torch.cat([x, x[..., :1]], -1)[..., :ng] for x in (vscale, vzero))
        scores = (torch.randn(b, h, cap, generator=gen) * 3).to(device)
        o, lse = vc.values_from_scores(scores, vcodes, vscale, vzero, lengths, group_size=group, num_splits=splits,
                                       integer_zero=int_zero)
        v = ref.unpack_per_token(vcodes, vscale, vzero, 2, group, int_zero).double()
        valid = torch.arange(cap, device=device)[None, None, :] < lengths[:, None, None]
        ln = scores.double() * math.log(2.0)
        ln = torch.where(valid, ln, torch.full_like(ln, float("-inf")))
        w = torch.softmax(ln, -1)
        r_out = (w[..., None] * v).sum(2)[:, :, None].float()
        r_lse = torch.logsumexp(ln, -1)[:, :, None].float()
        _compare(f"values_cuda G={group} int_zero={int_zero} splits={splits or 'auto'}"
                 + ("" if aligned else " unaligned scale rows"), o, lse, r_out, r_lse, results)
    return results


def check_packed_caches(device, results=None):
    """packed_decode (kernels + fp partials + LSE merge + rotations) against the packed caches'
    own torch read path, after a left-padded prefill and decode steps."""
    import math

    from kvbench.method import KVGeometry, NewTokens
    from kvbench.rope import apply_rope, rope_tables

    results = [] if results is None else results
    b, d = 3, 64
    from methods.kivi import KIVI
    from methods.quarot import QuaRot
    from methods.rotatekv import RotateKV
    from methods.rtn import RTN

    gen = torch.Generator().manual_seed(3)
    rkv = RotateKV(mode="packed", head_group=2, sinks=3)
    rkv.load_calibration_state({"perm.0": torch.randperm(4 * d, generator=gen)})
    # SmolLM2's geometry (9 query heads on 3 KV heads: 3 a KV head, not a power of two), RotateKV
    # with a 1-head Hadamard: the fused read that scripts/gpu_decode_ppl.py measures
    smol = RotateKV(mode="packed", head_group=1, sinks=2)
    smol.load_calibration_state({"perm.0": torch.randperm(3 * d, generator=gen)})
    cases = [("rtn-2", RTN(mode="packed", bits=2, group_size=32)), ("quarot-4", QuaRot(mode="packed", bits=4)),
             ("kivi-2", KIVI(mode="packed", bits=2, group_size=16, residual=8)), ("rotatekv-2", rkv),
             ("rotatekv-2-post", RotateKV(mode="packed", head_group=1, pre_rope=False, reorder=False, sinks=0)),
             ("rotatekv-4-noperm", RotateKV(mode="packed", bits=4, head_group=4, reorder=False, sinks=2))]
    # MHA (one query head per KV head) takes decode_mha's kernel where the layout allows
    # and RotateKV's 4-head groups at 2 bits decode_rotatekv_mha's (pre-RoPE permuted; post-RoPE per-head groups)
    rkv_mha = RotateKV(mode="packed", head_group=4, sinks=3)
    rkv_mha.load_calibration_state({"perm.0": torch.randperm(4 * d, generator=gen)})
    mha = [("rtn-2 MHA", RTN(mode="packed", bits=2, group_size=16)), ("quarot-2 MHA", QuaRot(mode="packed", bits=2)),
           ("rotatekv-2-post MHA", RotateKV(mode="packed", head_group=1, pre_rope=False, reorder=False, sinks=2)),
           ("rotatekv-2 hg4 MHA", rkv_mha),
           ("rotatekv-2-post hg4 MHA", RotateKV(mode="packed", head_group=4, pre_rope=False, reorder=False, sinks=0)),
           ("kivi-2 MHA", KIVI(mode="packed", bits=2, group_size=16, residual=8))]
    lengths = [40, 29, 7]
    runs = ([(n, m, 8, 4) for n, m in cases] + [(n, m, 4, 4) for n, m in mha]
            + [("rotatekv-2 h1, 9/3 heads", smol, 9, 3)])
    for name, method, h, hkv in runs:
        geom = KVGeometry(num_layers=1, num_heads=h, num_kv_heads=hkv, head_dim=d, hidden_size=32, rope_theta=1e4)
        cache = method.new_cache(0, geom)
        t = max(lengths)
        pos = torch.tensor([[-1] * (t - n) + list(range(n)) for n in lengths])
        for step in range(3):
            bt = pos.shape[1]
            k_pre = torch.randn(b, hkv, bt, d, generator=gen)
            k_pre[..., 3] *= 10
            v = torch.randn(b, hkv, bt, d, generator=gen)
            cos, sin = rope_tables(pos, d, 1e4)
            li = torch.randn(b, bt, 32, generator=gen)
            if bt > 2:
                li[:, 2, :3] += 50
            new = NewTokens(k_pre=k_pre.to(device), k=apply_rope(k_pre, cos, sin).to(device), v=v.to(device),
                            cos=cos.to(device), sin=sin.to(device), positions=pos.to(device),
                            layer_input=li.to(device), is_prefill=step == 0)
            cache.append(new)
            pos = torch.tensor(lengths)[:, None] + step
        q = torch.randn(b, h, 1, d, generator=gen).to(device)
        qpos = (torch.tensor(lengths)[:, None] + 1).to(device)
        out = da.packed_decode(cache, q, 1 / math.sqrt(d)).float()
        import os

        os.environ["KVBENCH_PACKED_KERNELS"] = "0"
        try:
            r = cache.attend(q, qpos, 1 / math.sqrt(d)).float()
        finally:
            del os.environ["KVBENCH_PACKED_KERNELS"]
        err = float((out - r).abs().max())
        bound = REL_BOUND * float(r.abs().max())
        results.append({"kernel": f"packed_decode {name}", "max_abs_err": err, "bound": bound, "ok": err <= bound})
    return results


def run_all(device, small=True):
    results = []
    check_per_token(device, small, results)
    check_per_token_mha(device, small, results)
    check_kivi(device, small, results)
    check_kivi_mha(device, small, results)
    check_rotatekv(device, small, results)
    check_rotatekv_mha(device, small, results)
    if str(device).startswith("cuda"):
        check_rotatekv_scores_cuda(device, results)
        check_values_cuda(device, results)
        check_token_scores_cuda(device, results)
        check_kivi_scores_cuda(device, results)
        check_gqa_cuda(device, results)
    check_packed_caches(device, results)
    check_fp_partial(device, results)
    check_merge(device, results)
    return results


def check_write(device, results=None):
    """The write kernel against kvbench.quant + kvbench.packing: codes, scales and zeros equal
    bit for bit without rotation; with rotation at most 0.5% of codes differ, by one step."""
    from kvbench.kernels import quant_write as qw
    from kvbench.packing import unpack

    results = [] if results is None else results
    gen = torch.Generator().manual_seed(4)
    cases = [(64, 2, 32, 1.0, True, False, 37), (128, 4, 64, 0.9, False, False, 37), (64, 8, 16, 1.0, True, False, 37),
             (64, 2, 64, 0.8, True, True, 37), (128, 2, 128, 1.0, True, True, 37)]
    if device != "cpu":
        # Enough groups to see a rounding difference that hits 1e-4 of them (an FMA-contracted
        # clip product did, on the H100: the small cases passed it).
        cases += [(128, 2, 64, 0.8, True, False, 40000), (64, 2, 64, 0.8, False, False, 40000)]
    for n, bits, group, clip, iz, rot, rows in cases:
        x = torch.randn(rows, n, generator=gen)
        x[:, 3] *= 30.0
        x[5] = 0.25  # a constant row: scale clamps to its minimum
        x = x.half().to(device)
        kw = dict(bits=bits, group_size=group, clip_ratio=clip, integer_zero=iz, rotate=rot)
        # Write into scattered rows of a bigger buffer, as a cache append does.
        m = rows + 13
        dest = torch.randperm(m, generator=gen)[:rows].to(device)
        out = (torch.zeros(m, n * bits // 8, dtype=torch.uint8, device=device),
               torch.zeros(m, n // group, dtype=torch.float16, device=device),
               torch.zeros(m, n // group, dtype=torch.float16, device=device))
        codes, scale, zero = qw.quantize_pack_rows(x, dest=dest, out=out, **kw)
        rc, rs, rz = qw.reference_quantize_pack_rows(x.float(), **kw)
        codes, scale, zero = codes[dest], scale[dest], zero[dest]
        name = f"write n={n} bits={bits} G={group} clip={clip} int_zero={iz} rotate={rot} rows={rows}"
        if not rot:
            ok = torch.equal(codes.cpu(), rc.cpu()) and torch.equal(scale.cpu(), rs.cpu()) and torch.equal(zero.cpu(), rz.cpu())
            results.append({"kernel": name, "ok": bool(ok), "exact": True})
        else:
            a, r = unpack(codes.cpu(), bits, n).int(), unpack(rc.cpu(), bits, n).int()
            frac = float((a != r).float().mean())
            step = int((a - r).abs().max())
            srel = float(((scale.float() - rs.float()).abs() / rs.float()).max())
            results.append({"kernel": name, "ok": frac <= 5e-3 and step <= 1 and srel <= 2e-3,
                            "codes_differing": frac, "max_step": step, "scale_rel_err": srel})
    return results


def check_fp_partial(device, results=None):
    """`fp_partial.fp_partial_fused` against `reference.fp_partial`: MHA and GQA (3 and 4 query
    heads a KV head), 1 to 160 tokens, random validity with an empty row, fp16 K/V viewed out of a
    bigger buffer (strided), an outlier channel, NaN and inf planted in the slots that are not valid
    (whether a kernel skips their loads or selects them away after, none may reach the output).
    Bound: 1e-5 of the largest |output| (float32)."""
    from kvbench.kernels import fp_partial as fp_partial_mod
    from kvbench.kernels.fp_partial import fp_partial_fused

    results = [] if results is None else results
    gen = torch.Generator().manual_seed(8)
    for b, hkv, gq, s, d in ((3, 4, 1, 20, 128), (2, 3, 3, 160, 64), (4, 2, 4, 37, 64), (2, 2, 1, 1, 64)):
        buf_k = torch.randn(b, hkv, s + 5, d, generator=gen)
        buf_k[..., 7] *= 30
        k = buf_k.half().to(device)[:, :, 2 : 2 + s]
        v = torch.randn(b, hkv, s + 5, d, generator=gen).half().to(device)[:, :, 3 : 3 + s]
        q = torch.randn(b, hkv * gq, d, generator=gen).to(device)
        valid = torch.rand(b, s, generator=gen) < 0.7
        valid[0] = True
        valid[-1] = False  # no full-precision token in this row
        valid = valid.to(device)
        ro, rl = ref.fp_partial(q, k, v, valid, d**-0.5)
        k, v = k.clone(), v.clone()
        k.masked_fill_(~valid[:, None, :, None], float("nan"))
        v.masked_fill_(~valid[:, None, :, None], float("inf"))
        parts = fp_partial_fused(q, k, v, valid, d**-0.5)  # (o [B, Hq, S, D], lse [B, Hq, S]): S splits
        o, lse = ref.merge_partials([parts]), torch.logsumexp(parts[1], -1)
        ro, rl = ro[:, :, 0], rl[..., 0]
        err = float((o - ro).abs().max())
        bound = 1e-5 * max(1.0, float(ro.abs().max()))
        seen = torch.isfinite(rl)
        lse_err = float(((lse[seen] - rl[seen]).abs() / rl[seen].abs().clamp_min(1.0)).max()) if bool(seen.any()) else 0.0
        empty_ok = bool(torch.isneginf(lse[~seen]).all())
        results.append({"kernel": f"fp_partial B={b} Hkv={hkv} GQ={gq} S={s}", "splits": parts[0].shape[2],
                        "max_abs_err": err, "bound": bound, "lse_rel_err": lse_err,
                        "ok": err <= bound and lse_err <= 1e-5 and empty_ok})
    # a ring window (KIVI's): validity from (n, nq) in the kernel, wrapping past the last slot
    w = 48
    n = torch.tensor([0, 17, 100, 131]).to(device)
    nq = torch.tensor([0, 0, 64, 96]).to(device)
    k = torch.randn(4, 2, w, 64, generator=gen).half().to(device)
    v = torch.randn(4, 2, w, 64, generator=gen).half().to(device)
    q = torch.randn(4, 2, 64, generator=gen).to(device)
    held = fp_partial_mod.ring_valid(n, nq, w)
    ro, _ = ref.fp_partial(q, k, v, held, 0.125)
    k, v = k.masked_fill(~held[:, None, :, None], float("nan")), v.masked_fill(~held[:, None, :, None], float("-inf"))
    parts = fp_partial_fused(q, k, v, None, 0.125, ring=(n, nq))
    err = float((ref.merge_partials([parts]) - ro[:, :, 0]).abs().max())
    results.append({"kernel": "fp_partial ring window", "max_abs_err": err,
                    "ok": err <= 1e-5 * max(1.0, float(ro.abs().max())) and bool(parts[1][0].isneginf().all())})
    return results


def check_merge(device, results=None):
    """`merge.merge_partials_fused` against `reference.merge_partials`: one and two partials, 1 to
    130 splits, empty splits, a row with no keys at all (zeros), fp32 and fp16 output. Bound: 1e-6
    of the largest |output| for fp32, fp16's rounding (2**-11 relative) for fp16."""
    from kvbench.kernels.merge import merge_partials_fused

    results = [] if results is None else results
    gen = torch.Generator().manual_seed(9)
    for b, h, d, splits in ((2, 3, 64, (1,)), (3, 2, 128, (5, 4)), (1, 4, 64, (130, 1)), (2, 2, 128, (2, 7))):
        parts = []
        for s in splits:
            o = torch.randn(b, h, s, d, generator=gen) * 3
            lse = torch.randn(b, h, s, generator=gen) * 4
            lse[0, 0, 0] = float("-inf")  # an empty split
            lse[-1, -1] = float("-inf")  # a row with no keys in this partial
            o[lse.isinf()] = 0.0
            parts.append((o.to(device), lse.to(device)))
        want = ref.merge_partials(parts)
        for dtype, rel in ((torch.float32, 1e-6), (torch.float16, 2.0**-10)):
            got = merge_partials_fused(parts, dtype)
            err = float((got.float() - want).abs().max())
            bound = rel * max(1.0, float(want.abs().max()))
            results.append({"kernel": f"merge B={b} H={h} D={d} splits={splits} {str(dtype)[6:]}", "max_abs_err": err,
                            "bound": bound, "ok": got.dtype == dtype and err <= bound
                            and bool((got[-1, -1] == 0).all())})  # no keys in any partial: zeros
    return results


def torch_and_fused_appends(make, news, device):
    """Two caches from `make()` fed the same appends: the first through the torch write (kernels
    off), the second through the fused Triton write (on CUDA; forced on under the interpreter)."""
    import os

    from kvbench import packed_cache as pc

    plain, fused = make(), make()
    os.environ["KVBENCH_PACKED_KERNELS"] = "0"
    try:
        for new in news:
            plain.append(new)
    finally:
        del os.environ["KVBENCH_PACKED_KERNELS"]
    saved = pc.kernels_enabled
    if device == "cpu":  # the interpreter runs the kernels on CPU tensors
        pc.kernels_enabled = lambda x: True
    try:
        for new in news:
            fused.append(new)
    finally:
        pc.kernels_enabled = saved
    return plain, fused


def check_fused_append(device, results=None):
    """A packed cache's fused Triton write (CUDA; forced on under the interpreter) stores the
    same codes, scales and zeros as its torch write: exactly for rtn, and for quarot (rotation
    in the kernel) up to rare one-step code differences; over a prefill of left-padded rows and
    then decode steps (one token a row, written at each row's length by `quantize_pack_decode`;
    keys and values are views with gaps into one tensor, as the stacked projections give them),
    with the same slot positions and lengths; fp16's cache too (`check_fused_static_decode`)."""
    from kvbench import packed_cache as pc
    from kvbench.method import NewTokens
    from kvbench.packing import unpack
    from kvbench.quant import QuantSpec
    from kvbench.rope import apply_rope, rope_tables

    results = [] if results is None else results
    gen = torch.Generator().manual_seed(5)
    b, hkv, d = 3, 2, 64
    lengths = [11, 6, 3]
    t = max(lengths)
    pos = torch.tensor([[-1] * (t - n) + list(range(n)) for n in lengths])
    k_pre = torch.randn(b, hkv, t, d, generator=gen)
    k_pre[..., 2] *= 20
    v = torch.randn(b, hkv, t, d, generator=gen)
    cos, sin = rope_tables(pos, d, 1e4)
    news = [NewTokens(k_pre=k_pre.to(device), k=apply_rope(k_pre, cos, sin).to(device), v=v.to(device),
                      cos=cos.to(device), sin=sin.to(device), positions=pos.to(device), layer_input=None,
                      is_prefill=True)]
    for step in range(3):  # decode steps: one token a row at position lengths[b] + step
        dpos = torch.tensor(lengths)[:, None] + step
        k1 = torch.randn(b, hkv, 1, d, generator=gen)
        k1[..., 2] *= 20
        dcos, dsin = rope_tables(dpos, d, 1e4)
        # k_pre, k and v as views with gaps into one [B, 1, 3 H D] tensor (the stacked projections')
        stacked = torch.cat([x.transpose(1, 2).reshape(b, 1, -1) for x in (
            k1, apply_rope(k1, dcos, dsin), torch.randn(b, hkv, 1, d, generator=gen))], -1).to(device)
        kp, kr, v1 = (x.view(b, 1, hkv, d).transpose(1, 2) for x in stacked.split(hkv * d, -1))
        news.append(NewTokens(k_pre=kp, k=kr, v=v1, cos=dcos.to(device), sin=dsin.to(device),
                              positions=dpos.to(device), layer_input=None, is_prefill=False))
    stored = [n + len(news) - 1 for n in lengths]
    for name, make, exact in (("rtn-2", lambda: pc.RTNPackedCache(QuantSpec(2, 32), False, hkv, d), True),
                              ("rtn-4 pre-RoPE", lambda: pc.RTNPackedCache(QuantSpec(4, 64, 0.9), True, hkv, d), True),
                              ("quarot-2", lambda: pc.QuaRotPackedCache(QuantSpec(2, 64), hkv, d), False)):
        plain, fused = torch_and_fused_appends(make, news, device)
        ok = torch.equal(plain.lengths.cpu(), fused.lengths.cpu()) and plain.lengths.tolist() == stored
        info = {}
        for row, n in enumerate(stored):
            ok &= torch.equal(plain.positions[row, :n].cpu(), fused.positions[row, :n].cpu())
        for sa, sb in ((plain.kstore, fused.kstore), (plain.vstore, fused.vstore)):
            # Compare the stored slots only (scratch slots of padding are not written by both).
            for row, n in enumerate(stored):
                a = unpack(sa.codes[row, :, :n].cpu(), 2 if "-2" in name else 4, d).int()
                c = unpack(sb.codes[row, :, :n].cpu(), 2 if "-2" in name else 4, d).int()
                if exact:
                    ok &= torch.equal(a, c) and torch.equal(sa.scale[row, :, :n].cpu(), sb.scale[row, :, :n].cpu()) \
                        and torch.equal(sa.zero[row, :, :n].cpu(), sb.zero[row, :, :n].cpu())
                else:
                    frac = float((a != c).float().mean())
                    info["codes_differing"] = max(info.get("codes_differing", 0.0), frac)
                    ok &= frac <= 5e-3 and int((a - c).abs().max()) <= 1
        results.append({"kernel": f"fused append {name}", "ok": bool(ok), **info})
    check_fused_static_decode(news, device, results)
    check_fused_kivi_decode(device, results)
    return results


def check_fused_static_decode(news, device, results=None):
    """fp16's cache (`decode.StaticKVCache`): decode tokens written by `kv_write.write_token` (one
    launch) store exactly what its three scatters store, for left-padded rows (`news`: a prefill,
    then decode tokens whose keys and values are views with gaps, as stacked projections give)."""
    from kvbench.decode import StaticKVCache
    from kvbench.method import KVGeometry

    results = [] if results is None else results
    b, hkv, _, d = news[0].k.shape
    geometry = KVGeometry(1, hkv, hkv, d, hkv * d, 1e4)

    def make():
        cache = StaticKVCache(geometry)
        cache.reserve(b, 24, device, torch.float32)
        return cache

    plain, fused = torch_and_fused_appends(make, news, device)
    same = all(torch.equal(x.cpu(), y.cpu()) for x, y in ((plain.k, fused.k), (plain.v, fused.v),
                                                          (plain.pos, fused.pos)))
    results.append({"kernel": "fused append fp16 (static cache) decode steps", "ok": same
                    and plain.cursor == fused.cursor})
    return results


def check_fused_kivi_decode(device, results=None):
    """KIVI's decode append through the fused row writer stores exactly what its torch path
    stores, over decode steps that move some rows' quantization boundary and not others'."""
    from kvbench import packed_cache as pc
    from kvbench.method import NewTokens
    from kvbench.quant import QuantSpec

    results = [] if results is None else results
    gen = torch.Generator().manual_seed(6)
    b, hkv, d, g = 3, 2, 64, 16
    lengths = [30, 17, 5]
    t = max(lengths)
    pos = torch.tensor([[-1] * (t - n) + list(range(n)) for n in lengths])
    steps = [(torch.randn(b, hkv, t, d, generator=gen), torch.randn(b, hkv, t, d, generator=gen), pos, True)]
    for s in range(2 * g + 3):
        k, v = torch.randn(b, hkv, 1, d, generator=gen), torch.randn(b, hkv, 1, d, generator=gen)
        k[..., 5] *= 25
        steps.append((k, v, torch.tensor(lengths)[:, None] + s, False))
    news = [NewTokens(k_pre=k.half().to(device), k=k.half().to(device), v=v.half().to(device), cos=None, sin=None,
                      positions=p.to(device), layer_input=None, is_prefill=prefill) for k, v, p, prefill in steps]
    a, c = torch_and_fused_appends(
        lambda: pc.KIVIPackedCache(QuantSpec(2, g, integer_zero=False), 8, hkv, d, capacity=t + len(steps)), news, device)
    same = [torch.equal(x.cpu(), y.cpu()) for x, y in (
        (a.k_codes, c.k_codes), (a.k_scale, c.k_scale), (a.k_zero, c.k_zero), (a.vstore.codes, c.vstore.codes),
        (a.vstore.scale, c.vstore.scale), (a.vstore.zero, c.vstore.zero), (a.nq, c.nq), (a.n, c.n),
        (a.win_k, c.win_k), (a.win_v, c.win_v))]
    results.append({"kernel": "fused append kivi-2 decode steps", "ok": all(same),
                    "quantized_rows": [int(x) for x in c.nq.cpu()]})
    return results


def check_glue(device, results=None):
    """`glue.rms_norm`, `glue.silu_mul` and `glue.rope` against the torch ops they replace (fp16 and
    fp32; RoPE on the model's non-contiguous q/k views, 1 to 37 tokens: bit-exact; SiLU-mul within an
    fp16 ulp of torch's, and the same bits on the two halves of one tensor; RMSNorm within 2e-3 of
    the largest output), and a tiny random Llama's logits with the session's `fused_glue` and
    `fuse_projections` on against off (one prefill and two decode steps, fp16 cache); stacking the
    projections leaves the torch path's logits bit for bit."""
    import transformers.models.llama.modeling_llama as llama

    from kvbench import params as P
    from kvbench.kernels import glue
    from kvbench.model import fuse_projections
    from kvbench.registry import methods
    from kvbench.rope import apply_rope
    from kvbench.session import KVSession
    from kvbench.speed_models import load_random_model

    results = [] if results is None else results
    gen = torch.Generator().manual_seed(10)
    for dt in (torch.float16, torch.float32):
        x = (torch.randn(3, 2, 96, generator=gen) * 3).to(dt).to(device)
        norm = llama.LlamaRMSNorm(96, eps=1e-5).to(device).requires_grad_(False)
        norm.weight.data = torch.randn(96, generator=gen).to(dt).to(device)
        want, got = norm(x), glue.rms_norm(x, norm.weight, 1e-5)
        err = float((got.float() - want.float()).abs().max())
        results.append({"kernel": f"glue rms_norm {str(dt)[6:]}", "max_abs_err": err,
                        "ok": got.dtype == dt and err <= 2e-3 * float(want.abs().max())})
        gate, up = (torch.randn(4, 7, 300, generator=gen).to(dt).to(device) for _ in range(2))
        want, got = torch.nn.functional.silu(gate) * up, glue.silu_mul(gate, up)
        err = float((got.float() - want.float()).abs().max())
        results.append({"kernel": f"glue silu_mul {str(dt)[6:]}", "max_abs_err": err,
                        "ok": got.dtype == dt and err <= 1e-3 * float(want.abs().max())})
        halves = torch.cat([gate, up], -1).split(300, -1)  # a fused gate-up output's two views
        got_views = glue.silu_mul(*halves)
        results.append({"kernel": f"glue silu_mul {str(dt)[6:]} on the halves of one tensor",
                        "ok": torch.equal(got_views, got) and got_views.is_contiguous()})
        for t in (1, 5, 37):
            q = torch.randn(2, t, 3, 64, generator=gen).to(dt).to(device).transpose(1, 2)  # the model's view
            ang = torch.randn(2, t, 32, generator=gen)
            emb = torch.cat([ang, ang], -1)
            cos, sin = emb.cos().to(dt).to(device), emb.sin().to(dt).to(device)
            want, got = apply_rope(q, cos, sin), glue.rope(q, cos, sin)
            diff = (got.float() - want.float()).abs()
            results.append({"kernel": f"glue rope {str(dt)[6:]} T={t}", "max_abs_err": float(diff.max()),
                            "differing": float((diff > 0).float().mean()), "strides": [got.stride(), q.stride()],
                            "ok": torch.equal(got, want) and got.stride() == q.stride()})
            qkv = torch.randn(2, t, 3 * 3 * 64, generator=gen).to(dt).to(device)  # one stacked GEMM's output
            k = qkv.split(3 * 64, -1)[1].view(2, t, 3, 64).transpose(1, 2)
            got = glue.rope(k, cos, sin)
            results.append({"kernel": f"glue rope {str(dt)[6:]} T={t} on a view with gaps",
                            "strides": [got.stride(), k.stride()], "ok": torch.equal(got, apply_rope(k, cos, sin))
                            and got.stride() == torch.empty_like(k).stride()})
    lm = load_random_model("tiny", "random:tiny", device=str(device), dtype="float16" if device != "cpu" else "float32")
    method = P.build(methods.get("fp16"), {}, "fp16")
    ids = torch.randint(lm.model.config.vocab_size, (2, 9), generator=gen).to(device)

    def run(fused):
        session = KVSession(method, lm.geometry)
        session.fused_glue = fused
        out = [lm.forward(session, ids, torch.arange(9, device=device).expand(2, 9), logits_to_keep=1)]
        for step in range(2):
            out.append(lm.forward(session, ids[:, step:step + 1], torch.full((2, 1), 9 + step, device=device),
                                  logits_to_keep=1))
        return torch.cat(out, 1)

    plain = run(False)
    weights = sum(p.numel() for p in lm.model.parameters())
    fuse_projections(lm.model)  # the Linears' weights become views: the torch path gives the same bits
    plain_after = run(False)
    results.append({"kernel": "fuse_projections: torch path unchanged, no extra weights", "ok": torch.equal(
        plain_after, plain) and sum(p.numel() for p in lm.model.parameters()) == weights
        and lm.model.model.layers[0].self_attn.q_proj.weight.data_ptr()
        == lm.model.model.layers[0].self_attn.kvbench_qkv[0].data_ptr()})
    err = float((run(True) - plain).abs().max())
    results.append({"kernel": "glue: tiny Llama, fused glue and stacked projections against torch glue",
                    "max_abs_err": err, "ok": err <= 2e-2 * max(1.0, float(plain.abs().max()))})
    return results
