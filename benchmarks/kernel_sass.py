"""Compile a Triton kernel for an H100 (sm_90) on a machine without a GPU and summarize its SASS.

    python benchmarks/kernel_sass.py per_token_mha --bits 2 --group 64 [--dump out.sass]

Triton's wheel ships ptxas and nvdisasm, so the compiler's resource report (registers, spills,
shared memory) and the instruction mix of the inner loop can be read before spending device time:
what the kernel actually executes per packed code is the first number to predict speed from.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


def compile_sm90(fn, signature: dict, constexprs: dict, num_warps=4, num_stages=2):
    sig = dict(signature)
    for name in constexprs:
        sig[name] = "constexpr"
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def _cuobjdump(compiled, flag: str) -> str:
    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
        path = f.name
    try:
        return subprocess.run([os.path.join(bindir, "cuobjdump"), flag, path], capture_output=True, text=True,
                              check=True).stdout
    finally:
        os.unlink(path)


def sass_of(compiled) -> str:
    return _cuobjdump(compiled, "-sass")


def resources(compiled) -> str:
    """cuobjdump's resource line: REG, STACK (spills show as a stack frame), SHARED."""
    m = re.search(r"(REG:\d+ STACK:\d+ SHARED:\d+ LOCAL:\d+)", _cuobjdump(compiled, "-res-usage"))
    return m.group(1) if m else "?"


def summarize(sass: str) -> dict:
    """Opcode histogram of the whole kernel and of its longest backward-branch loop body."""
    lines = [ln for ln in sass.splitlines() if re.match(r"\s+/\*[0-9a-f]{4,}\*/", ln)]
    ops = []
    for ln in lines:
        m = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z0-9_.]+)", ln)
        if m:
            ops.append((int(m.group(1), 16), m.group(3), ln))
    loops = []
    for addr, op, ln in ops:
        if op.startswith("BRA"):
            t = re.search(r"0x([0-9a-f]+)", ln.split("BRA", 1)[1])
            if t and int(t.group(1), 16) < addr:
                loops.append((int(t.group(1), 16), addr))
    body = max(loops, key=lambda ab: ab[1] - ab[0]) if loops else None
    hist = collections.Counter(op.split(".")[0] for _, op, _ in ops)
    loop_hist = collections.Counter(op.split(".")[0] for a, op, _ in ops if body and body[0] <= a <= body[1])
    return {"total": len(ops), "hist": hist, "loop": body, "loop_hist": loop_hist}


def report(compiled, name: str) -> None:
    print(f"== {name}: {resources(compiled)}")
    s = summarize(sass_of(compiled))
    lh = s["loop_hist"]
    print(f"   instructions {s['total']}; main loop {sum(lh.values())}: "
          + ", ".join(f"{k} {v}" for k, v in lh.most_common(14)))


def per_token_mha(bits: int, group: int, block_n: int, num_warps: int, num_stages: int, d: int = 128):
    from kvbench.kernels.decode_mha import _decode_per_token_mha_kernel as k

    sig = {"q_ptr": "*fp16", "kw_ptr": "*i32", "ks_ptr": "*fp16", "kz_ptr": "*fp16", "vw_ptr": "*i32",
           "vs_ptr": "*fp16", "vz_ptr": "*fp16", "len_ptr": "*i32", "o_ptr": "*fp32", "lse_ptr": "*fp32",
           "sm_scale": "fp32", "cap": "i32",
           **{n: "i32" for n in ("ks_b", "ks_h", "ks_t", "vs_b", "vs_h", "vs_t")}}
    ce = dict(NIT=32, HKV=32, D=d, BITS=bits, G=group, INT_ZERO=True, BN=block_n, NS=2, TAU=8.0, ASM=True, PREFETCH=True)
    return compile_sm90(k, sig, ce, num_warps, num_stages), d * block_n * 2  # codes of K and V per tile


def kivi_mha(bits: int, group: int, block_n: int, num_warps: int, num_stages: int, d: int = 128):
    """KIVI's two-pass kernel; the longest loop is pass 1 (keys), so codes are its key codes."""
    from kvbench.kernels.decode_kivi_mha import KEY_LANES
    from kvbench.kernels.decode_kivi_mha import _kivi_mha_kernel as k

    sig = {"q_ptr": "*fp16", "kw_ptr": "*i32", "ks_ptr": "*fp16", "kz_ptr": "*fp16", "vw_ptr": "*i32",
           "vs_ptr": "*fp16", "vz_ptr": "*fp16", "nq_ptr": "*i64", "scr_ptr": "*fp32", "o_ptr": "*fp32",
           "lse_ptr": "*fp32", "sm_scale": "fp32", "capg": "i32", "capt": "i32", "vs_b": "i32", "vs_h": "i32",
           "vs_t": "i32"}
    gt = max(1, 32 * num_warps // (group * bits // 32 * KEY_LANES))
    ce = dict(NIT=8, HKV=32, D=d, BITS=bits, G=group, GT=gt, CT=KEY_LANES, BN=block_n, NS=2, ASM=True)
    return compile_sm90(k, sig, ce, num_warps, num_stages), gt * group * d


def _rotatekv_sig():
    return {"q_ptr": "*fp16", "kc_ptr": "*u8", "ks_ptr": "*fp16", "kz_ptr": "*fp16", "gid_ptr": "*i32",
            "vc_ptr": "*u8", "vs_ptr": "*fp16", "vz_ptr": "*fp16", "len_ptr": "*i32", "pos_ptr": "*i32",
            "cos_ptr": "*fp16", "sin_ptr": "*fp16", "h_ptr": "*fp16", "o_ptr": "*fp32", "lse_ptr": "*fp32",
            "sm_scale": "fp32", "cap": "i32"}


def rotatekv(bits: int, group: int, block_n: int, num_warps: int, num_stages: int, d: int = 128, hg: int = 4):
    """The first RotateKV read (pre-RoPE, 4-head Hadamard, permuted groups): key and value codes a tile."""
    from kvbench.kernels.decode_attention import _decode_rotatekv_kernel as k

    ce = dict(NIT=32, NGRP=32 // hg, HG=hg, GQ=1, D=d, BITS=bits, NQ=32 * d // group, G=d, PRE_ROPE=True,
              BM=16, BN=block_n, NS=2, GATHER=True, EXACT=False)
    return compile_sm90(k, _rotatekv_sig(), ce, num_warps, num_stages), 2 * hg * block_n * d


def rotatekv_mha(bits: int, group: int, block_n: int, num_warps: int, num_stages: int, d: int = 128, hg: int = 4,
                 pre_rope: bool = True, gather: bool = True, stack: bool = False):
    """RotateKV's MHA read (decode_rotatekv_mha): key and value codes a tile."""
    from kvbench.kernels.decode_rotatekv_mha import _rotatekv_mha_kernel as k

    sig = {**_rotatekv_sig(), "vw_ptr": "*i32", "vs_b": "i32", "vs_h": "i32", "vs_t": "i32"}
    sig.pop("vc_ptr")
    order = ["q_ptr", "kc_ptr", "ks_ptr", "kz_ptr", "gid_ptr", "vw_ptr", "vs_ptr", "vz_ptr", "len_ptr", "pos_ptr",
             "cos_ptr", "sin_ptr", "h_ptr", "o_ptr", "lse_ptr", "sm_scale", "cap", "vs_b", "vs_h", "vs_t"]
    ce = dict(NIT=32, NGRP=32 // hg, HG=hg, D=d, BITS=bits, NQ=32 * d // group, NQP=max(8, 32 * d // group), G=group,
              PRE_ROPE=pre_rope,
              BN=block_n, NS=2, GATHER=gather, TAU=8.0, ASM=True, STACK=stack)
    return compile_sm90(k, {n: sig[n] for n in order}, ce, num_warps, num_stages), 2 * hg * block_n * d


def rotatekv_mha_stacked(bits, group, block_n, num_warps, num_stages):
    """Pre-RoPE with the four heads stacked as the rows of one H_{D/2} product a half."""
    return rotatekv_mha(bits, group, block_n, num_warps, num_stages, stack=True)


def rotatekv_mha_4bit(bits, group, block_n, num_warps, num_stages):
    """The 2-head group at 4 bits (compiles the HG == 2 branches)."""
    return rotatekv_mha(4, group, block_n, num_warps, num_stages, hg=2)


def rotatekv_mha_post(bits, group, block_n, num_warps, num_stages):
    return rotatekv_mha(bits, group, block_n, num_warps, num_stages, pre_rope=False)


def rotatekv_mha_post_noreorder(bits, group, block_n, num_warps, num_stages):
    return rotatekv_mha(bits, group, block_n, num_warps, num_stages, pre_rope=False, gather=False)


def rotatekv_scores(bits: int, group: int, block_n: int, num_warps: int, num_stages: int, d: int = 128, hg: int = 4,
                    pre_rope: bool = True, gather: bool = True, stack: bool = False, f16: bool = False):
    """The key pass of RotateKV's two-pass MHA read, as the default read runs it (pre-RoPE,
    permuted, heads not stacked, fp32 dequantization): key codes a tile."""
    from kvbench.kernels.decode_rotatekv_mha import _rotatekv_scores_kernel as k

    sig = _rotatekv_sig()
    order = ["q_ptr", "kc_ptr", "ks_ptr", "kz_ptr", "gid_ptr", "len_ptr", "pos_ptr", "cos_ptr", "sin_ptr", "h_ptr",
             "scr_ptr", "sm_scale", "cap"]
    sig["scr_ptr"] = "*fp32"
    ce = dict(NIT=32, NGRP=32 // hg, HG=hg, D=d, BITS=bits, NQ=32 * d // group, NQP=max(8, 32 * d // group),
              PRE_ROPE=pre_rope, BN=block_n, GATHER=gather, STACK=stack, F16=f16, ASM=True)
    return compile_sm90(k, {n: sig[n] for n in order}, ce, num_warps, num_stages), hg * block_n * d


def rotatekv_scores_post_noreorder(bits, group, block_n, num_warps, num_stages):
    return rotatekv_scores(bits, group, block_n, num_warps, num_stages, pre_rope=False, gather=False, stack=False)


def values_from_scores(bits: int, group: int, block_n: int, num_warps: int, num_stages: int, d: int = 128):
    """The values pass of a two-pass read (decode_mha.values_from_scores): value codes a tile."""
    from kvbench.kernels.decode_mha import _values_from_scores_kernel as k

    sig = {"scr_ptr": "*fp32", "vw_ptr": "*i32", "vs_ptr": "*fp16", "vz_ptr": "*fp16", "len_ptr": "*i32",
           "o_ptr": "*fp32", "lse_ptr": "*fp32", "cap": "i32", "vs_b": "i32", "vs_h": "i32", "vs_t": "i32"}
    ce = dict(NIT=32, HKV=32, D=d, BITS=bits, G=group, INT_ZERO=True, BN=block_n, NS=2, ASM=True)
    return compile_sm90(k, sig, ce, num_warps, num_stages), block_n * d


KERNELS = {"per_token_mha": per_token_mha, "kivi_mha": kivi_mha, "rotatekv": rotatekv, "rotatekv_mha": rotatekv_mha,
           "rotatekv_mha_post": rotatekv_mha_post, "rotatekv_mha_4bit": rotatekv_mha_4bit,
           "rotatekv_mha_stacked": rotatekv_mha_stacked, "rotatekv_mha_post_noreorder": rotatekv_mha_post_noreorder,
           "rotatekv_scores": rotatekv_scores, "rotatekv_scores_post_noreorder": rotatekv_scores_post_noreorder,
           "values_from_scores": values_from_scores}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("kernel", choices=sorted(KERNELS))
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--block-n", type=int, nargs="+", default=[64])
    ap.add_argument("--num-warps", type=int, nargs="+", default=[4])
    ap.add_argument("--num-stages", type=int, default=2)
    ap.add_argument("--dump", help="write the SASS of the last variant here")
    a = ap.parse_args(argv)
    for bn in a.block_n:
        for nw in a.num_warps:
            compiled, codes = KERNELS[a.kernel](a.bits, a.group, bn, nw, a.num_stages)
            report(compiled, f"{a.kernel} bits={a.bits} G={a.group} BN={bn} warps={nw}")
            s = summarize(sass_of(compiled))
            per_thread = codes / (32 * nw)
            print(f"   codes per thread per iteration {per_thread:.0f}: "
                  f"{sum(s['loop_hist'].values()) / per_thread:.2f} instructions per code")
            if a.dump:
                open(a.dump, "w").write(sass_of(compiled))
    return 0


if __name__ == "__main__":
    sys.exit(main())
