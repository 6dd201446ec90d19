"""KIVI's key pass (keys quantized per channel over groups of 32 tokens, 2 bits, head_dim 128) as a
hand-laid CUDA kernel on the tensor cores, for one query head per KV head.

KIVI stores a group's keys channel-major (`kvbench.packed_cache.KIVIPackedCache`): an 8-byte row a
(group, channel), byte j holding tokens j, 8 + j, 16 + j, 24 + j in its bit planes. With
dequantization c s + z (float zero: the group minimum), token t's score is
sum_c (q_c s_gc) c_tc + sum_c q_c z_gc: the scale goes into the query once a group and channel,
the zeros into one bias a group. So a warp takes 8 groups at once into `mma.m16n8k16` products:

* **A = the scaled queries, one row a group**: row g is q * s of group g (fp16 pairs, one HMUL2 a
  pair of channels), rows 8..15 zero; k = 16 channels (8 products cover the 128).
* **B = the codes in place, one column a group**: lane (g, t) owns group g and the channel pairs
  (2t, 2t + 1) and (2t + 8, 2t + 9) of each 16-channel chunk, loaded as two 16-byte rows a chunk
  (both channels' 8 bytes). One PRMT puts byte j of the two channels into the half-words (it
  serves the byte's four planes, i.e. four tokens), one LOP3 and one HFMA2 leave the exact codes.
  Column n of product (j, p) is token 8 p + j of group n.
* **The bias q . z of each group in the same products**: A = the query in rows 0..7, B column n = group
  n's zeros (the words the lane loads anyway), so D[n][n] is group n's bias in the lane that owns
  group n (8 products a warp iteration instead of 96 conversions, FMAs and shuffles a lane: 2.4%
  of the pass, seventeenth session).
* D's diagonal (row n = column n) is group n's dot for that token; lane (g, g / 2) holds it. It
  adds the bias and puts the score in the warp's staging rows in shared memory, keeping each
  16-token tile's maximum for the values pass (`values_cuda`, `tile_max`). At the end of the
  iteration the warp writes its 8 groups' 256 scores (contiguous: the groups are consecutive) one
  group a store, 128 bytes, and their 16 maxima. (Written straight from the owners, each store
  used 4 bytes of each of 8 sectors: 60 MB of partial-sector writes into L2 against the pass's 100
  MB of reads, with L2 at 81% of its throughput; staged, the pass is 3.7% faster. Seventeenth
  session, results/gpu/nvidia-h100-80gb-hbm3/session17/.)

Contract: `kivi_scores(...)` writes scores [B, H, cap_tokens] fp32 (log2 domain, `sm_scale`
includes log2 e) for tokens below nq[b] (whole groups) and the tiles' maxima [B, H, cap_tokens / 16].
Error: the products take fp16(q s) (2**-11 relative a channel, as the values pass's weights), exact
codes, fp32 accumulation; the bias from exact fp16 products summed in fp32. `emulate_scores` is the
same arithmetic in torch.
"""

from __future__ import annotations

import torch

from kvbench.kernels import nvrtc
from kvbench.kernels.cuda_prelude import PRELUDE

D = 128
G = 32  # tokens a group (the 8-byte channel rows at 2 bits)
WARPS = 4
GROUPS_PER_WARP = 8  # a warp's groups an iteration (the products' rows / columns)
# programs an SM the grid is sized for (`split_plan`, captured steps): two waves of the three
# resident programs (MIN_BLOCKS). At B8 x 8192 (256 rows) 4 gave 2 splits, 512 programs on 396
# slots, 1.29 waves: 0.0705 ms; 6 gives 3 splits, 768 programs, 1.94 waves: 0.0586 (twelfth
# session, results/gpu/nvidia-h100-80gb-hbm3/session12/ab-kivi-scores-splits.json)
SPLITS_PER_SM = 6


def supports(gq: int, head_dim: int, bits: int, group_size: int) -> bool:
    return gq == 1 and head_dim == D and bits == 2 and group_size == G


_SOURCE = r"""
#define MINB __MINB__  // programs an SM the registers are held to
extern "C" __global__ void __launch_bounds__(128, MINB)
kivi_scores(const uint4* __restrict__ kc, const unsigned* __restrict__ ks, const unsigned* __restrict__ kz,
            const unsigned* __restrict__ q, const long long* __restrict__ nq, float* __restrict__ scr,
            float* __restrict__ tmax, double sm_scale_d, int capg, int cap, int H, int gq, int split_groups) {
    pdl_launch_dependents();  // the values pass may launch now: it waits for this grid's scores
    const float sm_scale = (float)sm_scale_d;  // (the launcher passes Python floats as doubles)
    // row = query head b H + h; its keys are KV row row / gq (gq query heads a KV head)
    const int row = blockIdx.x, b = row / H, krow = row / gq;
    const int ngroups = (int)(nq[b] / 32);
    const int gstart = blockIdx.y * split_groups;
    const int gend = min(gstart + split_groups, ngroups);
    if (gstart >= gend) return;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    // this lane's query pairs: channels 16 kc + (2t, 2t + 1) and 16 kc + (2t + 8, 2t + 9) (read again
    // for every 8 groups, from L1: holding them would cost 16 registers through the products)
    const unsigned* qr = q + (long long)row * 64;
    float* sr = scr + (long long)row * cap;
    float* mr = tmax + (long long)row * ((cap + 15) / 16);
    // a warp iteration's scores (8 groups x 32 tokens) and tile maxima are staged here and written
    // out whole: written straight from the owner lanes, each store put 8 floats in 8 sectors (4 of
    // each sector's 32 bytes), 60 MB of partial-sector traffic into L2 against the pass's 100 MB of
    // reads (Nsight Compute, seventeenth session). Rows padded to 36 floats: the 8 owners' stores
    // fall in different banks.
    __shared__ float s_sc[4][8 * 36], s_mx[4][16];
    float* wsc = s_sc[warp];
    for (int g0 = gstart + 8 * warp; g0 < gend; g0 += 8 * 4) {
        const int grp = min(g0 + g, gend - 1);  // (a clamped group's scores are not stored)
        const long long gi = (long long)krow * capg + grp;
        const uint4* kg = kc + gi * 64;           // 128 channels x 8 bytes = 64 16-byte channel pairs
        const unsigned* sg = ks + gi * 64;        // fp16 pairs
        const unsigned* zg = kz + gi * 64;
        uint4 c0[8], c1[8];
        unsigned a0[8], a2[8];
        float bacc[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
        for (int kc = 0; kc < 8; ++kc) { c0[kc] = kg[8 * kc + t]; c1[kc] = kg[8 * kc + 4 + t]; }
#pragma unroll
        for (int kc = 0; kc < 8; ++kc) {
            const unsigned q0 = qr[8 * kc + t], q1 = qr[8 * kc + 4 + t];
            const unsigned s0 = sg[8 * kc + t], s1 = sg[8 * kc + 4 + t];
            const unsigned z0 = zg[8 * kc + t], z1 = zg[8 * kc + 4 + t];
            a0[kc] = hmul2(q0, s0);  // row g = group g: q s, rounded to fp16
            a2[kc] = hmul2(q1, s1);
            mma_acc(bacc, q0, q1, z0, z1);  // D[r][n] = q . z_n (every row r < 8 the same)
        }
        const float bias = (g & 1) ? bacc[1] : bacc[0];  // D[g][g] in lane (g, g / 2), the owner
        const bool owner = (g >> 1) == t && g0 + g < gend;  // lane (g, g / 2) holds group g's diagonal
        float mx0 = -1e30f, mx1 = -1e30f;
        // bytes j = 4 jh + jl: the word (jh) is fixed at compile time, the byte (jl) is a runtime
        // PRMT selector, so the loop over jl need not be unrolled (fully unrolled, the compiler
        // hoisted every product's operands: 246 registers, two programs an SM)
#pragma unroll
        for (int jh = 0; jh < 2; ++jh)
#pragma unroll 1
        for (int jl = 0; jl < 4; ++jl) {
            const int j = 4 * jh + jl;
            const unsigned sel = jl | ((4 + jl) << 8);
            // the four planes' products as four independent accumulator chains, interleaved: with the
            // stores between the planes' chains, ptxas had laid one of the two jh bodies out as
            // one serial chain of 32 products (each waiting for the last): 3% of the pass, seventeenth session
            float acc[4][4];
#pragma unroll
            for (int p = 0; p < 4; ++p) acc[p][0] = acc[p][1] = acc[p][2] = acc[p][3] = 0.f;
#pragma unroll
            for (int kc = 0; kc < 8; ++kc) {
                // byte j of channels (2t, 2t + 1) and (2t + 8, 2t + 9) of chunk kc
                const unsigned x0 = prmt(u4w(c0[kc], jh), u4w(c0[kc], 2 + jh), sel);
                const unsigned x1 = prmt(u4w(c1[kc], jh), u4w(c1[kc], 2 + jh), sel);
#pragma unroll
                for (int p = 0; p < 4; ++p) mma_acc(acc[p], a0[kc], a2[kc], plane(x0, p), plane(x1, p));
            }
#pragma unroll
            for (int p = 0; p < 4; ++p) {
                const float v = ((g & 1) ? acc[p][1] : acc[p][0]) + bias;
                const float sc = v * sm_scale;
                if (owner) {
                    wsc[g * 36 + 8 * p + j] = sc;
                    if (p < 2) mx0 = fmaxf(mx0, sc); else mx1 = fmaxf(mx1, sc);
                }
            }
        }
        if (owner) { s_mx[warp][2 * g] = mx0; s_mx[warp][2 * g + 1] = mx1; }
        __syncwarp();
        // store k: group g0 + k's 32 scores, one a lane (128 contiguous bytes); then the 16 maxima
#pragma unroll
        for (int k = 0; k < 8; ++k)
            if (g0 + k < gend) sr[(long long)(g0 + k) * 32 + lane] = wsc[k * 36 + lane];
        if (lane < 16 && g0 + lane / 2 < gend) mr[2 * g0 + lane] = s_mx[warp][lane];
        __syncwarp();  // (the next iteration's owners overwrite the staging rows)
    }
}
"""

_KERNELS: dict = {}


MIN_BLOCKS = 3  # 160 registers without spills (4 spills 56 bytes)


def source(min_blocks: int = MIN_BLOCKS) -> str:
    return PRELUDE + _SOURCE.replace("__MINB__", str(min_blocks))


def kivi_scores(q, k_codes, k_scale, k_zero, nq, sm_scale, scores, tile_max, *, split_groups, num_splits,
                min_blocks=MIN_BLOCKS):
    """Write KIVI's scores [B, H, cap] fp32 (log2 domain) for tokens below nq[b] and each 16-token
    tile's maximum into `tile_max` [B, H, ceil(cap / 16)], for q [B, H, 128] over k_codes
    [B, Hkv, capg, 128, 8] (2 bits, groups of 32) with fp16 k_scale/k_zero [B, Hkv, capg, 128]; query
    head h reads KV head h // (H / Hkv)."""
    b, h, cap = scores.shape
    hkv, capg = k_codes.shape[1], k_codes.shape[2]
    if h % hkv:
        raise ValueError("kivi_scores_cuda: query heads must be a multiple of the KV heads")
    if k_codes.shape[-2:] != (D, G * 2 // 8) or k_scale.dtype != torch.float16 or k_zero.dtype != torch.float16:
        raise ValueError("kivi_scores_cuda: needs 2-bit codes in groups of 32 tokens, 128 channels, fp16 scales")
    k_codes, k_scale, k_zero = k_codes.contiguous(), k_scale.contiguous(), k_zero.contiguous()
    q = q.half().contiguous()
    nq = nq if nq.dtype == torch.int64 else nq.long()
    key = (min_blocks, str(q.device))
    if key not in _KERNELS:
        _KERNELS[key] = nvrtc.compile_source(source(min_blocks), "kivi_scores", q.device)
    _KERNELS[key](grid=(b * h, num_splits, 1), block=(32 * WARPS, 1, 1),
                  args=[k_codes, k_scale, k_zero, q, nq, scores, tile_max, float(sm_scale), int(capg), int(cap), int(h),
                        int(h // hkv), int(split_groups)])
    return scores


def emulate_scores(q, k_codes, k_scale, k_zero, nq, sm_scale):
    """The kernel's arithmetic in torch: fp16(q s) per group and channel on the exact codes (fp32
    sums), plus sum q z in fp32. Returns [B, H, capg * 32] with -inf past nq[b]."""
    from kvbench.packing import unpack

    b, h, capg = k_codes.shape[:3]
    codes = unpack(k_codes, 2, G).float()  # [B, H, capg, D, G]
    qh = q.half()
    a = (qh[:, :, None, :] * k_scale).float()  # fp16 product, rounded as HMUL2 does
    bias = (qh.float()[:, :, None, :] * k_zero.float()).sum(-1)  # [B, H, capg]
    s = torch.einsum("bhgc,bhgct->bhgt", a, codes) + bias[..., None]
    s = (s * sm_scale).reshape(b, h, capg * G)
    valid = torch.arange(capg * G, device=q.device)[None, None] < nq.to(q.device)[:, None, None]
    return torch.where(valid, s, torch.full_like(s, float("-inf")))
