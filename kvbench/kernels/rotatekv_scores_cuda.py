"""RotateKV's key pass (4-head Hadamard, 2 bits, head_dim 128) as a hand-laid CUDA kernel: pre-RoPE keys
(the method's default) and, in a second build, post-RoPE keys.

The Triton scores pass (`decode_rotatekv_mha._rotatekv_scores_kernel`) spends most of its time
moving data between layouts Triton picks (docs/kernel-notes.md, seventh session). Here every
register's meaning is fixed by hand around one tensor-core product, `mma.m16n8k16` with the keys as
its B operand (8 tokens a warp tile, one token a thread, 32 channels of each of the group's 4 heads):

* **channel numbering**: a key channel j of a head is j = 32 t + 16 k3 + 8 k0 + a, where t (0..3)
  is the lane's quad position, (k3, k0) pick the half-word of the B fragment and a (0..7) is kept
  in-thread. As H_128[i, j] = (-1)^popcount(i & j), H_128 = H_8 (over a) x H_16 (over
  k = 8 k3 + 4 t1 + 2 t0 + k0) whatever the bit order, and the H_512 of the group is H_4 (heads) x
  H_128. A thread's 32 key bytes of a token are contiguous: two 16-byte loads.
* **dequantization in fp16x2**: one PRMT puts the bytes of channels (k0 = 0, 1) into the two
  half-words, one LOP3 per head masks the head's bit plane (after a shift) and ORs the exponent of
  1024, so a half reads 1024 + c. Each channel's (1024 + z, s) pair of its quantization group is
  looked up in the token's scale row, staged in shared memory (the calibrated permutation: a
  per-channel group, packed four to a register; each lane has its own copy of its token's row, so
  the 32 lanes' lookups fall in 32 banks and one PRMT composes an address),
  then (v - (1024 + z)) * s: exact subtraction, one rounding.
* **H_4 x H_8 in-thread**: a 32-point butterfly over (head, a) on fp16x2 registers (5 stages).
* **H_16, RoPE and the query in one product**: RoPE pairs channel i with i + 64, which differ in
  one bit of k (the H_16 index), so for each head h and a' the product
  A_(h,a') [16 x 16] . W [16 x 8 tokens] gives U_f = q_i k_i + q_(i+64) k_(i+64) (rows 0-7) and
  V_f = q_(i+64) k_i - q_i k_(i+64) (rows 8-15) for 8 frequencies f at once, and a score is
  sum_f cos_f U_f + sin_f V_f (two FFMA). The A matrices (H_16 signs times query entries, fp16)
  are built from the queries in each program's prologue: a lane's fragment of (h, a') is two fp16
  values with the lane's column signs XORed in, staged whole for the loop (`query_operands` builds
  the same fragments on the host, for `emulate_scores`).
* **the loop**: a warp's next tile's global loads (and the positions of the one after it) issue
  first in each iteration, before its shared-memory traffic; the 8 lanes' partial scores of a token
  are summed by a 7-shuffle reduce-scatter.

**Post-RoPE keys** (`post_rope=True`, the POST build; `pre_rope: false` in the method): no RoPE sits
between the Hadamard and the query, so the group's H_512 = H_4 x H_128 moves to the query side. The
prologue takes H_128 q of the group's 4 queries (fp32 butterfly in shared memory, one fp16 rounding)
and builds, for each a, an A operand whose rows 0..3 are the heads' H_128 q_r at the lane's channels
(rows 4..15 zero), held in registers. The dequantized keys are the same B operands as above; 32
accumulating products, one accumulator a head slot h', combined by H_4's signs at the end, give each
head's scores in rows 0..3. No butterfly, no RoPE, no cross-lane sum: ~880 instructions a warp tile
against ~1385. The dequantization and its lookups are the pre-RoPE build's.

Contract: `rotatekv_scores(...)` writes the same scratch scores [B, H, cap] (fp32, log2 domain,
valid below each row's length) as `_rotatekv_scores_kernel`, so `decode_mha.values_from_scores`
reads the values after it. Error: products take fp16 operands with fp32 accumulation (as the
Triton pass's), and the dequantized keys and their 32-point butterfly are fp16 (about 2**-11
relative a stage); `kvbench.kernels.checks` compares with the float64-faithful reference at its
usual bound. Needs |zero point| < 1024 (1024 + z exact in fp16; 2-bit zeros are small).

The CUDA source is compiled at first use by NVRTC (`torch.cuda._compile_kernel`), so there is no
build step; `emulate_scores` runs the same dataflow (same operands, same index maps) in torch on
any device, which is what the CPU tests check.
"""

from __future__ import annotations

import torch

from kvbench.kernels import nvrtc

D = 128  # head_dim this kernel is laid out for
HG = 4  # heads a Hadamard group
TILE = 8  # tokens a warp tile (the product's N)
WARPS = 4


def supports(gq: int, head_dim: int, bits: int, head_group: int, nq: int, pre_rope: bool = True) -> bool:
    """Shapes this kernel takes. Both key kinds do: pre-RoPE (the default method) and post-RoPE
    (`pre_rope=False`, the POST build of `source`); the argument names the kind at the call sites."""
    return gq == 1 and head_dim == D and bits == 2 and head_group == HG and 0 < nq <= 64 and nq % 8 == 0


def _sylvester(n: int) -> torch.Tensor:
    i = torch.arange(n)
    pc = torch.zeros(n, n, dtype=torch.long)
    x = i[:, None] & i[None, :]
    while bool(x.any()):
        pc += x & 1
        x = x >> 1
    return 1.0 - 2.0 * (pc % 2).double()


def _frag_index() -> torch.Tensor:
    """[32 lanes, 8 halves] -> (row, col) flat index of a 16 x 16 A operand in the order
    mma.m16n8k16 wants it: regs (g, 2t..), (g+8, 2t..), (g, 2t+8..), (g+8, 2t+8..), g = lane / 4."""
    lane = torch.arange(32)
    g, t = lane // 4, lane % 4
    rows = torch.stack([g, g, g + 8, g + 8, g, g, g + 8, g + 8], 1)
    cols = torch.stack([2 * t, 2 * t + 1, 2 * t, 2 * t + 1, 2 * t + 8, 2 * t + 9, 2 * t + 8, 2 * t + 9], 1)
    return rows * 16 + cols


def freq_of(ap: int, n: int) -> int:
    """Frequency (channel i < 64) of U/V row n (0..7) of block a': n = 4 k3 + 2 t0 + k0, t1 = 0."""
    k3, t0, k0 = n >> 2, (n >> 1) & 1, n & 1
    return 32 * t0 + 16 * k3 + 8 * k0 + ap


_OPERAND_MAP: dict[str, torch.Tensor] = {}


def operand_map(device) -> torch.Tensor:
    """T [128, 8 a' x 32 lanes x 8 halves] (fp32) with A_frag = q @ T: the per-(a') 16 x 16 A operands
    in fragment order. Row n < 8 of block a' is U_f, row n + 8 is V_f, f = freq_of(a', n); column k is
    the H_16 index (k = 8 k3 + 4 t1 + 2 t0 + k0)."""
    key = str(device)
    if key not in _OPERAND_MAP:
        h16 = _sylvester(16)
        a = torch.zeros(D, 8, 16, 16, dtype=torch.float64)
        for ap in range(8):
            for n in range(8):
                f = freq_of(ap, n)
                bu = 8 * (n >> 2) + 2 * ((n >> 1) & 1) + (n & 1)  # t1 = 0
                bp = bu | 4  # the RoPE partner i + 64: t1 = 1
                a[f, ap, n] += h16[bu]
                a[f + 64, ap, n] += h16[bp]
                a[f + 64, ap, n + 8] += h16[bu]
                a[f, ap, n + 8] -= h16[bp]
        t = a.reshape(D, 8, 256)[:, :, _frag_index().reshape(-1)]  # [128, 8, 32 * 8]
        _OPERAND_MAP[key] = t.reshape(D, -1).float().to(device)
    return _OPERAND_MAP[key]


def query_operands(q: torch.Tensor) -> torch.Tensor:
    """A fragments [B, H, 8, 32, 4] int32 (fp16 pairs) from queries q [B, H, 128] (after RoPE)."""
    b, h, _ = q.shape
    a = (q.reshape(b * h, D).float() @ operand_map(q.device)).to(torch.float16)
    return a.reshape(b, h, 8, 32, 8).view(torch.int32)


def group_offsets(gid: torch.Tensor, ngrp: int) -> torch.Tensor:
    """Each element's quantization group (its column in the token's scale row), one byte an element,
    packed four to an int32 in the order the kernel reads them: [NGRP, 4 (t), 32 words]; element
    e = (h' * 8 + a) * 4 + k3 * 2 + k0 is byte e % 4 of word e // 4 for quad position t, channel
    j = 32 t + 16 k3 + 8 k0 + a of head slot h'. The kernel adds its staging area's row base to
    every byte and makes the byte the address's second byte (see `_SOURCE`)."""
    g = gid.reshape(ngrp, HG, D).long()
    a = torch.arange(8).view(1, 8, 1, 1)
    k3 = torch.arange(2).view(1, 1, 2, 1)
    k0 = torch.arange(2).view(1, 1, 1, 2)
    per_t = []
    for t in range(4):
        j = (32 * t + 16 * k3 + 8 * k0 + a).expand(HG, 8, 2, 2)
        per_t.append(torch.gather(g, 2, (j.reshape(1, HG, -1).expand(ngrp, HG, 32)).to(g.device)).reshape(ngrp, -1))
    grp_t = torch.stack(per_t, 1)  # [NGRP, 4 (t), 128] group of each element, e order
    if int(grp_t.max()) > 63:
        raise ValueError("rotatekv_scores_cuda: at most 64 key groups a token")
    w = grp_t.reshape(ngrp, 4, 32, 4)
    packed = w[..., 0] | (w[..., 1] << 8) | (w[..., 2] << 16) | (w[..., 3] << 24)  # < 2**30
    return packed.to(torch.int32).contiguous()


def _h32(y: torch.Tensor) -> torch.Tensor:
    """Unnormalized H_4 x H_8 over dims (head, a) of y [..., 4, 8, X]."""
    h4 = _sylvester(4).to(y.dtype).to(y.device)
    h8 = _sylvester(8).to(y.dtype).to(y.device)
    return torch.einsum("gh,ab,...hbx->...gax", h4, h8, y)


def emulate_scores(q, k_codes, k_scale, k_zero, gid, lengths, positions, cos, sin, sm_scale, *, fp16=True,
                   pre_rope=True):
    """The kernel's dataflow in torch (same operands and index maps; the dequantized keys rounded to
    fp16 as the kernel does, the butterfly's per-stage fp16 rounding approximated by one rounding of
    its result): scores
    [B, H, cap] fp32 in the log2 domain, -inf past each row's length (the kernel leaves them
    unwritten). `pre_rope=False`: the POST build's: H_128 q (fp32 from the fp16 queries, rounded once
    to fp16) times H_4 signs times the fp16 dequantized keys, summed in fp32; positions, cos and sin
    are not read."""
    b, ngrp, cap, _ = k_codes.shape
    dev = k_codes.device
    if gid is None:  # one group a head
        gid = torch.arange(ngrp * HG * D, dtype=torch.int32) // D
    offs = group_offsets(gid.cpu(), ngrp).view(torch.uint8).reshape(ngrp, 4, 128).long().to(dev)
    raw = k_codes.reshape(b, ngrp, cap, 4, 32).long()  # [.., t, 32 bytes]
    sc = k_scale.reshape(b, cap, -1).float()
    zc = k_zero.reshape(b, cap, -1).float()
    hp = torch.arange(HG, device=dev).view(HG, 1, 1, 1)
    a = torch.arange(8, device=dev).view(1, 8, 1, 1)
    k3 = torch.arange(2, device=dev).view(1, 1, 2, 1)
    k0 = torch.arange(2, device=dev).view(1, 1, 1, 2)
    byte_idx = (16 * k3 + 8 * k0 + a).expand(HG, 8, 2, 2).reshape(-1)  # within the t-chunk
    shift = (2 * hp).expand(HG, 8, 2, 2).reshape(-1)
    codes = (raw[..., byte_idx] >> shift) & 3  # [B, NGRP, cap, t, 128 (h', a, k3, k0)]
    grp_of = offs[None, :, None]  # [1, NGRP, 1, t, 128]
    s_el = torch.gather(sc[:, None, :, None, :].expand(b, ngrp, cap, 4, sc.shape[-1]), 4,
                        grp_of.expand(b, ngrp, cap, 4, 128))
    z_el = torch.gather(zc[:, None, :, None, :].expand(b, ngrp, cap, 4, zc.shape[-1]), 4,
                        grp_of.expand(b, ngrp, cap, 4, 128))
    y = (codes.float() - z_el) * s_el
    if fp16:
        y = y.half().float()
    valid = torch.arange(cap, device=dev)[None, :] < lengths.to(dev)[:, None]
    if not pre_rope:  # element (t, h', a, k3, k0) is channel 32 t + 16 k3 + 8 k0 + a of head slot h'
        keys = y.reshape(b, ngrp, cap, 4, HG, 8, 2, 2).permute(0, 1, 2, 4, 3, 6, 7, 5).reshape(b, ngrp, cap, HG, D)
        h4 = _sylvester(HG).float().to(dev)  # [r, h']
        qh = (q.to(torch.float16).float() @ _sylvester(D).float().to(dev)).half().float().reshape(b, ngrp, HG, D)
        s = torch.einsum("rh,bgrd,bgchd->bgrc", h4, qh, keys)
        s = (s * sm_scale).reshape(b, ngrp * HG, cap)
        return torch.where(valid[:, None], s, torch.full_like(s, float("-inf")))
    afr = query_operands(q.to(torch.float16)).view(torch.float16).reshape(b, ngrp, HG, 8, 32, 8).float()
    # A [B, NGRP, h, a', 16, 16] back from the fragments
    a_mat = torch.zeros(b, ngrp, HG, 8, 256, device=dev)
    a_mat[..., _frag_index().reshape(-1).to(dev)] = afr.reshape(b, ngrp, HG, 8, 256)
    a_mat = a_mat.reshape(b, ngrp, HG, 8, 16, 16)
    y = y.reshape(b, ngrp, cap, 4, HG, 8, 2, 2)  # t, h', a, k3, k0
    w = _h32(y.movedim(3, -1).reshape(b, ngrp, cap, HG, 8, 16))  # x = (k3, k0, t)
    if fp16:  # the butterfly rounds each stage to fp16; emulated by rounding the result
        w = w.half().float()
    # B[k, tok] with k = 8 k3 + 4 t1 + 2 t0 + k0 = 8 k3 + 2 t + k0
    w = w.reshape(b, ngrp, cap, HG, 8, 2, 2, 4)  # h, a', k3, k0, t
    kk = w.permute(0, 1, 2, 3, 4, 5, 7, 6).reshape(b, ngrp, cap, HG, 8, 16)  # (k3, t, k0) = k order
    uv = torch.einsum("bghamk,bgchak->bghcam", a_mat, kk)  # [B, NGRP, h, cap, a', 16 rows]
    p = positions.clamp_min(0).long()
    f = torch.tensor([[freq_of(ap, n) for n in range(8)] for ap in range(8)], device=dev)  # [a', n]
    cs = cos.float()[p][..., f]  # [B, cap, a', n]
    sn = sin.float()[p][..., f]
    s = (uv[..., :8] * cs[:, None, None] + uv[..., 8:] * sn[:, None, None]).sum((-1, -2))  # [B, NGRP, h, cap]
    s = (s * sm_scale).reshape(b, ngrp * HG, cap)
    return torch.where(valid[:, None], s, torch.full_like(s, float("-inf")))


# The kernel. NQ (key groups a token) is substituted at compile time: it sizes the per-lane share
# of the scale-row staging, so those loads unroll.
_SOURCE = r"""
#define NQ __NQ__
#define QPL (NQ / 4)
#define POST __POST__

struct alignas(16) U4 { unsigned x, y, z, w; };

__device__ __forceinline__ unsigned prmt(unsigned a, unsigned b, unsigned sel) {
    unsigned d; asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(sel)); return d;
}
__device__ __forceinline__ unsigned lop_and_or(unsigned a, unsigned m, unsigned o) {  // (a & m) | o, one LOP3
    unsigned d; asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(d) : "r"(a), "r"(m), "r"(o)); return d;
}
__device__ __forceinline__ unsigned hadd2(unsigned a, unsigned b) {
    unsigned d; asm("add.rn.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b)); return d;
}
__device__ __forceinline__ unsigned hsub2(unsigned a, unsigned b) {
    unsigned d; asm("sub.rn.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b)); return d;
}
__device__ __forceinline__ unsigned hmul2(unsigned a, unsigned b) {
    unsigned d; asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b)); return d;
}
__device__ __forceinline__ unsigned lds(unsigned addr) {
    unsigned d; asm volatile("ld.shared.b32 %0, [%1];" : "=r"(d) : "r"(addr)); return d;
}
__device__ __forceinline__ void sts(unsigned addr, unsigned v) {
    asm volatile("st.shared.b32 [%0], %1;" :: "r"(addr), "r"(v));
}
__device__ __forceinline__ unsigned smem_addr(const void* p) {
    unsigned r; asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(r) : "l"(p)); return r;
}
__device__ __forceinline__ float lo_f(unsigned u) {
    float f; unsigned short h = (unsigned short)(u & 0xFFFFu); asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f;
}
__device__ __forceinline__ float hi_f(unsigned u) {
    float f; unsigned short h = (unsigned short)(u >> 16); asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f;
}
__device__ __forceinline__ U4 ldg4(const void* p) {
    U4 v; asm volatile("ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}
__device__ __forceinline__ void mma16816(float* d, U4 a, unsigned b0, unsigned b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
                 "{%10, %11, %12, %13};"
                 : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
                 : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "r"(b0), "r"(b1), "f"(0.f), "f"(0.f), "f"(0.f), "f"(0.f));
}

__device__ __forceinline__ void mma16816_acc(float* d, U4 a, unsigned b0, unsigned b1) {  // D += A . B
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
                 "{%0, %1, %2, %3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "r"(b0), "r"(b1));
}

__device__ __forceinline__ unsigned ldg1(const void* p) {
    unsigned v; asm volatile("ld.global.nc.b32 %0, [%1];" : "=r"(v) : "l"(p)); return v;
}
__device__ __forceinline__ uint2 ldg2(const void* p) {
    uint2 v; asm volatile("ld.global.nc.v2.u32 {%0, %1}, [%2];" : "=r"(v.x), "=r"(v.y) : "l"(p)); return v;
}

struct Tile {          // one warp tile's global loads, issued a tile ahead
    U4 k0, k1;         // this lane's 32 key bytes of token g (B role)
    unsigned s[QPL / 2 > 0 ? QPL / 2 : 1], z[QPL / 2 > 0 ? QPL / 2 : 1];  // its share of token g's scale row
#if !POST
    U4 c0, s0, c1, s1; // cos / sin of frequencies fbase .. fbase + 7 at tokens 2t, 2t + 1 (D role)
#endif
};

// Every load is volatile asm, so the loads of the next tile issue in program order at the top of an
// iteration, before its shared-memory traffic: a plain load the compiler sinks among the lookups
// waits behind them in the memory pipe, and so does the next instruction that reuses its address
// registers (the profile's largest long-scoreboard stall). The positions are loaded a tile earlier
// still, as the cos / sin addresses depend on them.
__device__ __forceinline__ void load_pos(const int* pos_b, int tk0, int end, int t, int& p0, int& p1) {
    int last = end - 1;
    p0 = (int)ldg1(pos_b + min(tk0 + 2 * t, last));
    p1 = (int)ldg1(pos_b + min(tk0 + 2 * t + 1, last));
}

__device__ __forceinline__ Tile load_tile(const unsigned char* kc_row, const unsigned short* ks_b,
                                          const unsigned short* kz_b, int p0, int p1,
                                          const unsigned short* cosb, const unsigned short* sinb,
                                          int tk0, int end, int g, int t, int fbase) {
    Tile r;
    int tb = min(tk0 + g, end - 1);  // rows past the end re-read the last one (their scores are not stored)
    const unsigned char* kp = kc_row + (long long)tb * 128 + 32 * t;
    r.k0 = ldg4(kp);
    r.k1 = ldg4(kp + 16);
    const unsigned short* sp = ks_b + (long long)tb * NQ + t * QPL;  // QPL halves, 2 QPL-byte aligned
    const unsigned short* zp = kz_b + (long long)tb * NQ + t * QPL;
#if QPL % 8 == 0
#pragma unroll
    for (int i = 0; i < QPL / 8; ++i) {
        U4 a = ldg4(sp + 8 * i), c = ldg4(zp + 8 * i);
        r.s[4 * i] = a.x; r.s[4 * i + 1] = a.y; r.s[4 * i + 2] = a.z; r.s[4 * i + 3] = a.w;
        r.z[4 * i] = c.x; r.z[4 * i + 1] = c.y; r.z[4 * i + 2] = c.z; r.z[4 * i + 3] = c.w;
    }
#elif QPL % 4 == 0
#pragma unroll
    for (int i = 0; i < QPL / 4; ++i) {
        uint2 a = ldg2(sp + 4 * i), c = ldg2(zp + 4 * i);
        r.s[2 * i] = a.x; r.s[2 * i + 1] = a.y; r.z[2 * i] = c.x; r.z[2 * i + 1] = c.y;
    }
#else
#pragma unroll
    for (int i = 0; i < QPL / 2; ++i) { r.s[i] = ldg1(sp + 2 * i); r.z[i] = ldg1(zp + 2 * i); }
#endif
#if !POST
    p0 = max(p0, 0);
    p1 = max(p1, 0);
    r.c0 = ldg4(cosb + (long long)p0 * 128 + fbase);
    r.s0 = ldg4(sinb + (long long)p0 * 128 + fbase);
    r.c1 = ldg4(cosb + (long long)p1 * 128 + fbase);
    r.s1 = ldg4(sinb + (long long)p1 * 128 + fbase);
#endif
    return r;
}

__device__ __forceinline__ unsigned word_of(const Tile& r, int i) {
    return i == 0 ? r.k0.x : i == 1 ? r.k0.y : i == 2 ? r.k0.z : i == 3 ? r.k0.w
         : i == 4 ? r.k1.x : i == 5 ? r.k1.y : i == 6 ? r.k1.z : r.k1.w;
}
__device__ __forceinline__ unsigned u4_at(const U4& v, int i) {
    return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}
// the bytes of channels (k0 = 0, 1) of j = 32 t + 16 k3 + 8 k0 + a in the two half-words (each byte
// holds the 4 heads' 2-bit codes of one channel)
__device__ __forceinline__ unsigned code_bytes(const Tile& r, int k3, int a) {
    return prmt(word_of(r, 4 * k3 + (a >> 2)), word_of(r, 4 * k3 + 2 + (a >> 2)), (a & 3) | ((4 + (a & 3)) << 8));
}
// head slot h's two channels of code_bytes, dequantized: (1024 + c - (1024 + z)) * s in fp16x2, each
// channel's (1024 + z, s) looked up in this lane's copy of its token's scale row (o: the packed rows)
__device__ __forceinline__ unsigned deq_pair(unsigned sp, unsigned o, unsigned lbase, int k3, int hp) {
    const unsigned x = lop_and_or(sp >> (2 * hp), 0x00030003u, 0x64006400u);  // 1024 + c
    const unsigned l0 = lds(prmt(o, lbase, 0x7604 | ((2 * k3) << 4)));
    const unsigned l1 = lds(prmt(o, lbase, 0x7604 | ((2 * k3 + 1) << 4)));
    return hmul2(hsub2(x, prmt(l0, l1, 0x5410)), prmt(l0, l1, 0x7632));
}

extern "C" __global__ void __launch_bounds__(128, __MINB__)
rotatekv_scores(const unsigned short* __restrict__ qh, const unsigned* __restrict__ offs,
                const unsigned char* __restrict__ kc, const unsigned short* __restrict__ ks,
                const unsigned short* __restrict__ kz, const int* __restrict__ pos,
                const unsigned short* __restrict__ cosb, const unsigned short* __restrict__ sinb,
                const long long* __restrict__ len, float* __restrict__ scr,
                double sm_scale_d, int cap, int ngrp, int split_len) {
    asm volatile("griddepcontrol.launch_dependents;");  // the values pass may launch now (it waits for the scores)
    // every lane's own copy of its token's scale row: group c of lane L of warp w at
    // s_sc[w / 2][c][L + 32 (w % 2)], so a lookup by all 32 lanes hits 32 banks whatever the groups
    __shared__ alignas(256) unsigned s_sc[2][NQ][64];
    const int b = blockIdx.x / ngrp, grp = blockIdx.x % ngrp;
    const int start = blockIdx.y * split_len;
    const int end = min(start + split_len, (int)len[b]);
    if (start >= end) return;
#if POST
    // Post-RoPE keys: score_r = sum over the group's 512 channels (h', c') of H4[r][h'] (H128 q_r)[c']
    // times the dequantized key (H_512 = H_4 x H_128). The prologue takes H128 q (unnormalized, in
    // fp32 in shared memory: 7 butterfly stages, 2 pairs a thread a stage), each value rounded once to
    // fp16. The 32 k-steps (h', a) of accumulating products give the 4 heads' scores in rows 0..3
    // (rows 4..15 of A are zero): lane (r, t) < 16 holds (H128 q_r) at the channels of its B
    // columns, 32 t + a + (0, 8) in word x and + (16, 24) in word z; words y and w (rows 8..15) are
    // zero. The A operand of k-step (h', a) is H4[r][h'] times that of (0, a), so only a's 8 are
    // staged, and the loop applies H4's signs to its accumulators (one a head slot h').
    __shared__ U4 s_fragp[8][32];  // [a][lane]: 4 KB
    {
        float* s_q = (float*)&s_sc[0][0][0];  // the staging area, free until the loop (>= 4 KB)
        const unsigned short* qb = qh + (long long)(b * ngrp + grp) * 4 * 128;
        for (int i = threadIdx.x; i < 4 * 128; i += 128) s_q[i] = lo_f(qb[i]);
        __syncthreads();
#pragma unroll
        for (int s = 1; s < 128; s <<= 1) {
#pragma unroll
            for (int p = threadIdx.x; p < 4 * 64; p += 128) {  // (head, pair): index with bit s clear
                const int i = (p >> 6) * 128 + ((p & 63) / s) * 2 * s + (p & (s - 1));
                const float u = s_q[i], v = s_q[i + s];
                s_q[i] = u + v;
                s_q[i + s] = u - v;
            }
            __syncthreads();
        }
        for (int i = threadIdx.x; i < 8 * 32; i += 128) {
            const int L = i & 31, r = L >> 2, tt = L & 3, a = i >> 5;
            U4 v = U4{0u, 0u, 0u, 0u};
            if (r < 4) {
                const float* qr = s_q + r * 128 + 32 * tt + a;
                unsigned short h0, h8, h16, h24;
                asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h0) : "f"(qr[0]));
                asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h8) : "f"(qr[8]));
                asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h16) : "f"(qr[16]));
                asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h24) : "f"(qr[24]));
                v.x = (unsigned)h0 | ((unsigned)h8 << 16);
                v.z = (unsigned)h16 | ((unsigned)h24 << 16);
            }
            s_fragp[i >> 5][L] = v;
        }
        __syncthreads();
    }
#else
    // The 4 heads' A fragments, from two values a row. Row n < 8 of (head h, a') is
    // U_f = H16[bu] q_f + H16[bp] q_(f+64) and row n + 8 is V_f = H16[bu] q_(f+64) - H16[bp] q_f
    // (f = freq_of(a', n), bu = 8 k3 + 2 t0 + k0 of row n, bp = bu | 4, so H16[bp][k] =
    // H16[bu][k] (-1)^(bit 2 of k)). Column k's bit 2 is bit 1 of the lane's t for all four of its
    // columns, so lane (g, t) holds sign(H16[bu][k]) times u = (t1 ? q_f - q_(f+64) : q_f + q_(f+64))
    // in row g and v = (t1 ? q_f + q_(f+64) : q_(f+64) - q_f) in row g + 8: each summed in fp32 and
    // rounded once (what `query_operands`' fp32 product and fp16 cast give, the sign being exact),
    // the lane's column signs (m01 for columns 2 t, 2 t + 1, m89 for those + 8) XORed in. Each lane's
    // fragments are staged whole: one 16-byte load an mma in the loop (building them there from two
    // values and 4 XORs an mma measured 5% slower: the pass is issue-bound).
    __shared__ U4 s_frag[4 * 8][32];  // [head h * 8 + a'][lane]: 16 KB
    {
        float* s_q = (float*)&s_sc[0][0][0];  // the staging area, free until the loop (>= 4 KB)
        const unsigned short* qb = qh + (long long)(b * ngrp + grp) * 4 * 128;
        for (int i = threadIdx.x; i < 4 * 128; i += 128) s_q[i] = lo_f(qb[i]);
        __syncthreads();
        for (int i = threadIdx.x; i < 32 * 32; i += 128) {
            const int L = i & 31, n = L >> 2, t1 = (L >> 1) & 1, ap = (i >> 5) & 7, h = i >> 8;
            const int f = 32 * ((n >> 1) & 1) + 16 * (n >> 2) + 8 * (n & 1) + ap, tk = 2 * (L & 3);
            const int bu = 8 * (n >> 2) + 2 * ((n >> 1) & 1) + (n & 1);
            const unsigned m01 = ((__popc(bu & tk) & 1) << 15) | ((__popc(bu & (tk + 1)) & 1) << 31);
            const unsigned m89 = ((__popc(bu & (tk + 8)) & 1) << 15) | ((__popc(bu & (tk + 9)) & 1) << 31);
            const float qf = s_q[h * 128 + f], qg = s_q[h * 128 + f + 64];
            const float u = t1 ? qf - qg : qf + qg, v = t1 ? qf + qg : qg - qf;
            unsigned short hu, hv;
            asm("cvt.rn.f16.f32 %0, %1;" : "=h"(hu) : "f"(u));
            asm("cvt.rn.f16.f32 %0, %1;" : "=h"(hv) : "f"(v));
            const unsigned uu = (unsigned)hu * 0x10001u, vv = (unsigned)hv * 0x10001u;
            s_frag[i >> 5][L] = U4{uu ^ m01, vv ^ m01, uu ^ m89, vv ^ m89};
        }
        __syncthreads();
    }
#endif

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int fbase = 32 * ((g >> 1) & 1) + 16 * (g >> 2) + 8 * (g & 1);
    unsigned off[32];
    const U4* op = (const U4*)(offs + (grp * 4 + t) * 32);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        U4 v = op[i];
        off[4 * i] = v.x; off[4 * i + 1] = v.y; off[4 * i + 2] = v.z; off[4 * i + 3] = v.w;
    }
    // Lookup addresses: shared addresses here are below 64 KB and the rows 256 bytes, so a lookup's
    // address is byte 0 of this lane's column (lbase) with byte 1 = the row, group c's row being
    // rb + c: one PRMT from the packed groups once rb is added to each of their bytes (no carry:
    // rb + c < 256).
    const int half = 32 * (warp & 1);
    const unsigned lbase = smem_addr(&s_sc[warp >> 1][0][lane + half]);
    const unsigned rb = (lbase >> 8) & 0xFFu;
#pragma unroll
    for (int i = 0; i < 32; ++i) off[i] += rb * 0x01010101u;
    // staging: this lane loads groups t * QPL .. of token g and writes them into the copies of the
    // token's four lanes 4 g + (t + j) % 4 (one bijection of the 32 lanes a j: no bank conflicts)
    unsigned dst[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) dst[j] = smem_addr(&s_sc[warp >> 1][t * QPL][4 * g + ((t + j) & 3) + half]);
    const float sm_scale = (float)sm_scale_d;
    const long long H = (long long)ngrp * 4;
    const unsigned char* kc_row = kc + (long long)(b * ngrp + grp) * cap * 128;
    const unsigned short* ks_b = ks + (long long)b * cap * NQ;
    const unsigned short* kz_b = kz + (long long)b * cap * NQ;
#if !POST
    const int* pos_b = pos + (long long)b * cap;
#endif
    float* scr_b = scr + ((long long)b * H + grp * 4) * cap;

#if POST
    // the A fragments' two nonzero words, in registers for the whole loop (5% faster than one 16-byte
    // shared load an mma, and two 4-byte loads an mma were 30% slower: `session15/ab-scores-post-frag*`);
    // with H4's signs on the accumulators instead of in 32 fragments: 165 registers, not 250, in the
    // same time (`session15/ab-scores-post-h4acc-5f2890d.json`)
    unsigned fx[8], fz[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) { fx[i] = s_fragp[i][lane].x; fz[i] = s_fragp[i][lane].z; }
    const float sg1 = (g & 1) ? -1.f : 1.f, sg2 = (g & 2) ? -1.f : 1.f, sg3 = sg1 * sg2;  // H4[g][h'], h' = 1..3
#endif
    int tk0 = start + warp * 8;
    int p0 = 0, p1 = 0;
#if !POST
    load_pos(pos_b, tk0, end, t, p0, p1);
#endif
    Tile cur = load_tile(kc_row, ks_b, kz_b, p0, p1, cosb, sinb, tk0, end, g, t, fbase);
#if !POST
    load_pos(pos_b, tk0 + 32, end, t, p0, p1);
#endif
    for (; tk0 < end; tk0 += 32) {
        // the next tile's loads first, then the positions of the one after it (see load_pos)
        Tile nxt = load_tile(kc_row, ks_b, kz_b, p0, p1, cosb, sinb, tk0 + 32, end, g, t, fbase);
#if !POST
        load_pos(pos_b, tk0 + 64, end, t, p0, p1);
#endif
        // stage token g's scale row share: (1024 + z, s) per group, z + 1024 exact in fp16
        __syncwarp();
#pragma unroll
        for (int i = 0; i < QPL / 2; ++i) {
            unsigned zz = hadd2(cur.z[i], 0x64006400u);
            unsigned w0 = prmt(zz, cur.s[i], 0x5410), w1 = prmt(zz, cur.s[i], 0x7632);  // groups 2i, 2i + 1
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                sts(dst[j] + 512 * i, w0);
                sts(dst[j] + 512 * i + 256, w1);
            }
        }
        __syncwarp();

#if POST
        // dequantize a (h', a) pair of B halves and take the product at once: 32 accumulating k-steps
        // into one accumulator a head slot h' (four chains: 3.5% faster than one,
        // `session15/ab-scores-post-frag-acc-a1a9d3c.json`), combined by H4's signs at the end
        float acc[4][4];
#pragma unroll
        for (int c = 0; c < 4; ++c) { acc[c][0] = 0.f; acc[c][1] = 0.f; acc[c][2] = 0.f; acc[c][3] = 0.f; }
#pragma unroll
        for (int a = 0; a < 8; ++a) {
            const unsigned sp0 = code_bytes(cur, 0, a), sp1 = code_bytes(cur, 1, a);
#pragma unroll
            for (int hp = 0; hp < 4; ++hp) {
                const unsigned o = off[hp * 8 + a];
                mma16816_acc(acc[hp], U4{fx[a], 0u, fz[a], 0u},
                             deq_pair(sp0, o, lbase, 0, hp), deq_pair(sp1, o, lbase, 1, hp));
            }
        }
        acc[0][0] += sg1 * acc[1][0] + sg2 * acc[2][0] + sg3 * acc[3][0];
        acc[0][1] += sg1 * acc[1][1] + sg2 * acc[2][1] + sg3 * acc[3][1];
        if (g < 4) {  // row g = head g of the group, columns 2 t, 2 t + 1 = tokens
            const int tok = tk0 + 2 * t;
            if (tok < end) scr_b[(long long)g * cap + tok] = acc[0][0] * sm_scale;
            if (tok + 1 < end) scr_b[(long long)g * cap + tok + 1] = acc[0][1] * sm_scale;
        }
#else
        // dequantize: y[k3][h'][a] = (c - z) * s for channels (k0 = 0, 1) of j = 32 t + 16 k3 + 8 k0 + a
        unsigned y[2][4][8];
#pragma unroll
        for (int k3 = 0; k3 < 2; ++k3) {
#pragma unroll
            for (int a = 0; a < 8; ++a) {
                const unsigned sp = code_bytes(cur, k3, a);
#pragma unroll
                for (int hp = 0; hp < 4; ++hp) y[k3][hp][a] = deq_pair(sp, off[hp * 8 + a], lbase, k3, hp);
            }
        }
        // H_4 (heads) x H_8 (a), unnormalized, in fp16x2
#pragma unroll
        for (int k3 = 0; k3 < 2; ++k3) {
#pragma unroll
            for (int s = 1; s < 8; s <<= 1)
#pragma unroll
                for (int hp = 0; hp < 4; ++hp)
#pragma unroll
                    for (int a = 0; a < 8; ++a)
                        if (!(a & s)) {
                            unsigned u = y[k3][hp][a], v = y[k3][hp][a + s];
                            y[k3][hp][a] = hadd2(u, v);
                            y[k3][hp][a + s] = hsub2(u, v);
                        }
#pragma unroll
            for (int s = 1; s < 4; s <<= 1)
#pragma unroll
                for (int hp = 0; hp < 4; ++hp)
#pragma unroll
                    for (int a = 0; a < 8; ++a)
                        if (!(hp & s)) {
                            unsigned u = y[k3][hp][a], v = y[k3][hp + s][a];
                            y[k3][hp][a] = hadd2(u, v);
                            y[k3][hp + s][a] = hsub2(u, v);
                        }
        }
        float cs0[8], sn0[8], cs1[8], sn1[8];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            cs0[2 * i] = lo_f(u4_at(cur.c0, i)); cs0[2 * i + 1] = hi_f(u4_at(cur.c0, i));
            sn0[2 * i] = lo_f(u4_at(cur.s0, i)); sn0[2 * i + 1] = hi_f(u4_at(cur.s0, i));
            cs1[2 * i] = lo_f(u4_at(cur.c1, i)); cs1[2 * i + 1] = hi_f(u4_at(cur.c1, i));
            sn1[2 * i] = lo_f(u4_at(cur.s1, i)); sn1[2 * i + 1] = hi_f(u4_at(cur.s1, i));
        }
        // per head and a': [U; V] = A . W, then sum_f cos U + sin V at tokens 2t, 2t + 1
        float sc[4][2];
#pragma unroll
        for (int h = 0; h < 4; ++h) {
            sc[h][0] = 0.f; sc[h][1] = 0.f;
#pragma unroll
            for (int ap = 0; ap < 8; ++ap) {
                float d[4];
                mma16816(d, s_frag[h * 8 + ap][lane], y[0][h][ap], y[1][h][ap]);
                sc[h][0] = fmaf(sn0[ap], d[2], fmaf(cs0[ap], d[0], sc[h][0]));  // two FFMA, no FMUL/FADD
                sc[h][1] = fmaf(sn1[ap], d[3], fmaf(cs1[ap], d[1], sc[h][1]));
            }
        }
        // sum over the 8 lanes of a quad position (the frequencies) as a reduce-scatter: at each
        // level a lane keeps half its values and adds the partner's copies of them: the same pairs
        // as `v += shfl_xor(v, 4); 8; 16` (so the same sums) in 7 shuffles instead of 24. Lane
        // (g, t) ends with value i = 2 h + j = 4 g0 + 2 g1 + g2: head 2 g0 + g1, token 2 t + g2.
        {
            const bool b0 = g & 1, b1 = (g >> 1) & 1, b2 = (g >> 2) & 1;
            float w[4], x[2];
#pragma unroll
            for (int m = 0; m < 4; ++m) {  // value m + 4 b0 (h = m / 2 + 2 b0, j = m % 2)
                const float lo = sc[m >> 1][m & 1], hi = sc[2 + (m >> 1)][m & 1];
                w[m] = (b0 ? hi : lo) + __shfl_xor_sync(0xffffffffu, b0 ? lo : hi, 4);
            }
#pragma unroll
            for (int m = 0; m < 2; ++m)  // value m + 2 b1 + 4 b0
                x[m] = (b1 ? w[m + 2] : w[m]) + __shfl_xor_sync(0xffffffffu, b1 ? w[m] : w[m + 2], 8);
            const float v = (b2 ? x[1] : x[0]) + __shfl_xor_sync(0xffffffffu, b2 ? x[0] : x[1], 16);
            const int tok = tk0 + 2 * t + b2;
            if (tok < end) scr_b[(long long)(2 * b0 + b1) * cap + tok] = v * sm_scale;
        }
#endif
        cur = nxt;
    }
}
"""


MIN_BLOCKS = 2  # programs an SM the register allocation is held to (2: at most 255 registers, no spills)
MIN_BLOCKS_POST = 2  # the post-RoPE build (165 registers: three fit anyway); 3 or 4 were no faster (`session15/`)


def source(nq: int, min_blocks: int | None = None, post_rope: bool = False) -> str:
    """The kernel for NQ key groups a token; `post_rope`: keys rotated after RoPE (no butterfly, no
    RoPE: the group's H_4 x H_128 folded into the product's A operand, see `_SOURCE`)."""
    if nq % 8:
        raise ValueError(f"rotatekv_scores_cuda: key groups a token must be a multiple of 8 (got {nq})")
    if min_blocks is None:
        min_blocks = MIN_BLOCKS_POST if post_rope else MIN_BLOCKS
    return (_SOURCE.replace("__NQ__", str(nq)).replace("__MINB__", str(min_blocks))
            .replace("__POST__", str(int(post_rope))))


_KERNELS: dict = {}


def _kernel(nq: int, device, min_blocks: int | None = None, post_rope: bool = False):
    key = (nq, str(device), min_blocks, post_rope)  # (not the source: every decode read asks)
    if key not in _KERNELS:
        _KERNELS[key] = nvrtc.compile_source(source(nq, min_blocks, post_rope), "rotatekv_scores", device)
    return _KERNELS[key]


_AVAILABLE: list = []


def available() -> bool:
    """Whether NVRTC compiles and loads this kernel here (else the caller takes the Triton pass);
    checked once, as every decode read asks."""
    if not _AVAILABLE:
        ok = nvrtc.available()
        if ok:
            try:
                _kernel(32, torch.device("cuda", torch.cuda.current_device()))
            except Exception:  # a driver that refuses this kernel's PTX
                ok = False
        _AVAILABLE.append(ok)
    return _AVAILABLE[0]


_OFFSETS: dict = {}


def _offsets_on(gid: torch.Tensor | None, ngrp: int, device) -> torch.Tensor:
    """The packed group offsets of a layer's gid (None: one group a head), built once: building
    them syncs with the device, which a CUDA-graph capture must not see. The entry keeps its gid
    alive, so no other tensor can take its address while it is cached."""
    key = (None if gid is None else gid.data_ptr(), ngrp, str(device))
    if key not in _OFFSETS:
        g = (torch.arange(ngrp * HG * D, dtype=torch.int32) // D) if gid is None else gid
        _OFFSETS[key] = (gid, group_offsets(g.cpu(), ngrp).to(device))
    return _OFFSETS[key][1]


def rotatekv_scores(q, k_codes, k_scale, k_zero, gid, lengths, positions, cos, sin, sm_scale, scores, *,
                    split_len: int, num_splits: int, min_blocks: int | None = None,
                    pre_rope: bool = True) -> torch.Tensor:
    """Fill scores [B, H, cap] fp32 (log2 domain, below each row's length) for splits of `split_len`
    tokens: grid (B * NGRP, num_splits), 4 warps a program, 8-token warp tiles. gid: each key
    channel's group column in the scale rows, or None for one group a head. `pre_rope=False`: the
    keys were rotated after RoPE (the kernel applies H_128 to q itself); positions, cos and sin are
    not read."""
    b, ngrp, cap, row = k_codes.shape
    nq = k_scale.shape[-1]
    if pre_rope and (cos.shape[-1] != D or cos.dtype != torch.float16):
        raise ValueError("rotatekv_scores_cuda: pre-RoPE keys need fp16 cos/sin tables [P, 128]")
    if (row != 128 or k_scale.dtype != torch.float16
            or q.dtype != torch.float16 or q.shape != (b, ngrp * HG, D)):
        raise ValueError("rotatekv_scores_cuda: needs 128-byte key rows (4 heads of 128 at 2 bits), fp16 "
                         "queries [B, H, 128] and fp16 scales")
    # the kernel indexes these as dense rows (the Triton pass's layout contract) and reads lengths
    # as int64 and positions as int32
    dense = (q, k_codes, k_scale, k_zero, cos, sin, positions)
    if not (all(t.is_contiguous() for t in dense) and positions.dtype == torch.int32):
        raise ValueError("rotatekv_scores_cuda: queries, codes, scales, zeros, cos/sin must be contiguous and "
                         "positions contiguous int32")
    lengths = lengths if lengths.dtype == torch.int64 else lengths.long()
    offs = _offsets_on(gid, ngrp, q.device)
    _kernel(nq, q.device, min_blocks, not pre_rope)(
        grid=(b * ngrp, num_splits, 1), block=(32 * WARPS, 1, 1),
        args=[q, offs, k_codes, k_scale, k_zero, positions, cos, sin, lengths, scores, float(sm_scale), int(cap),
              int(ngrp), int(split_len)])
    return scores
