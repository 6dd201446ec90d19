"""The values pass of a two-pass decode read as a hand-laid CUDA kernel, on the tensor cores.

Same contract as `decode_mha.values_from_scores` (partials o [B, H, S, D] fp32 and lse [B, H, S] of
softmax(scores) @ V over each split, scores [B, H, cap] fp32 in the log2 domain), for per-token
packed values with one query row per KV head: head_dim 128, 2 bits, groups of 32, 64 or 128
channels, fp16 scales and zeros; integer zero points ((c - z) s: rtn, quarot, RotateKV) or the group
minimum (c s + z: KIVI).

With one query row, the Triton pass does the products on CUDA cores (about four instructions a
code). Here a warp takes 16 tokens at a time into `mma.m16n8k16` products, the codes read in place:
lane (g, t) loads word g of tokens 2t, 2t + 1, 2t + 8, 2t + 9 (one 32-bit word a token row), one
PRMT puts byte jb of two tokens into the half-words (it serves the byte's four bit planes), one
LOP3 masks plane p and ORs 1024's exponent, one fp16x2 FMA leaves the code: about 2.25
instructions a pair of codes. Word w, byte jb, plane p is channel 32 p + 4 w + jb.

* **A = the codes** (16 channels x 16 tokens): row g is channel 32 hp + 4 g + jb and row g + 8 the
  same in plane hp + 2, so 8 products cover a tile; **B** (16 tokens x 8 columns): column n < NG
  holds group n's weights fp16(p_t s_t) (p_t = 2**(score - max) <= 1). D row r, column "its
  channel's group" is that channel's sum: 32 accumulators a lane. (The eighth session's layout,
  the weights in A with one row a bit plane and the codes in B, took 16 products a tile and 64
  accumulators and measured 13-16% slower: docs/kernel-notes.md, ninth session.)
* Lane L < 16 computes token L's weights once; the fragments come from those lanes by four
  shuffles (eight with four groups). The zero points come off as sum_t A_t z_t (integer zeros) or
  on as sum_t p_t z_t (float zeros); the four warps' partials are summed in shared memory.
* **A token's scales and zeros in one load each** (64 bits for KIVI's four groups) where the rows are
  aligned to their size: one 16-bit load a group left a third of the pass's L2 sectors excessive
  (Nsight Compute); KIVI's values pass is 4% faster (seventeenth session). Unaligned views take
  one load a group.
* **U tiles a warp an iteration, all loads first**: each warp issues the loads of U tiles (codes,
  scores, scales, kept raw) before computing any, the first ones before the scan for the split's
  maximum. With one tile (the first version) the pass ran at a third of the copy bandwidth,
  waiting on each tile's loads (docs/kernel-notes.md).

* **Grouped queries**: as the key pass decides (`shares_kv_rows`), one program takes a KV row and
  its query heads, the weights' column n = (query head n / NG, group n % NG), each query head with
  its own maximum, sums and output row; else one program a query head over its KV head's row.

The weights are fp16 (as flash attention's P is): 2**-11 relative a weight. `emulate_values` is
the same arithmetic in torch (fp16-rounded weights), for the CPU tests; `kvbench.kernels.checks`
compares the kernel with the float reference on the GPU.
"""

from __future__ import annotations

import torch

from kvbench.kernels import nvrtc, token_scores_cuda
from kvbench.kernels.cuda_prelude import PRELUDE

LOG2E = 1.4426950408889634
D = 128
WARPS = 4
STEP = 16 * WARPS  # tokens a program takes per tile row (splits are whole multiples)


def supports(head_dim: int, bits: int, group_size: int) -> bool:
    return head_dim == D and bits == 2 and group_size in (32, 64, 128)


_SOURCE = r"""
#define NG __NG__  // value groups a row (1: groups of 128, 2: of 64, 4: of 32)
#define U __U__  // 16-token tiles a warp loads before it computes any of them
#define ROT __ROT__  // 1: rotate the output by the 128-point Hadamard (values stored as H v)
#define INTZ __INTZ__  // 1: integer zero points, (c - z) s; 0: the group minimum, c s + z
#define VEC __VEC__  // 1: a token's NG scales (and zeros) in one load (aligned rows); 0: one load each
#define NW ((NG + 1) / 2)  // 32-bit words of a token's scales (one fp16 in the low half with NG = 1)
#define GQS __GQS__  // query heads a program takes over one KV row (1: one query head a program)
#define CW ((GQS * NG + 1) / 2)  // 32-bit words of a token's weights: column n = (head n / NG, group n % NG)

// the loads of U tiles, kept raw (token indices clamped to the last valid one: a clamped token's
// weight is zero; converting a loaded value right away would wait for it there)
struct VTile {
    float sc[U][GQS];
    unsigned sv[U][NW], zv[U][NW];  // scales and zeros as loaded: group i in half i % 2 of word i / 2
    unsigned w[U][4];
};
__device__ __forceinline__ float half_at(const unsigned* w, int i) {
    return (i & 1) ? hi2f(w[i >> 1]) : lo2f(w[i >> 1]);
}
// a token's NG fp16 values at p (aligned to 2 NG bytes with VEC) as NW words
__device__ __forceinline__ void load_halves(unsigned* w, const unsigned short* p) {
    if (VEC && NG == 4) { const uint2 x = *reinterpret_cast<const uint2*>(p); w[0] = x.x; w[NW - 1] = x.y; }
    else if (VEC && NG == 2) w[0] = *reinterpret_cast<const unsigned*>(p);
    else {
#pragma unroll
        for (int i = 0; i < NW; ++i) w[i] = (unsigned)p[2 * i] | (2 * i + 1 < NG ? (unsigned)p[2 * i + 1] << 16 : 0u);
    }
}
// the scores of the program's GQS query heads: rows sr + j cap
__device__ __forceinline__ void load_scores(VTile& v, int k0, int end, int lane, const float* sr, int cap) {
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
        for (int j = 0; j < GQS; ++j) v.sc[u][j] = sr[(long long)j * cap + min(k0 + 64 * u + (lane & 15), end - 1)];
}
__device__ __forceinline__ void load_tiles(VTile& v, int k0, int end, int lane, int t, const float* sr, int cap,
                                           const unsigned short* vsb, const unsigned short* vzb, int vs_t,
                                           const unsigned* wl, bool scores = true) {
    if (scores) load_scores(v, k0, end, lane, sr, cap);
#pragma unroll
    for (int u = 0; u < U; ++u) {
        const int tl = min(k0 + 64 * u + (lane & 15), end - 1), so = tl * vs_t;
        load_halves(v.sv[u], vsb + so);  // (one 64-bit load for KIVI's four groups: 2-byte loads left
        load_halves(v.zv[u], vzb + so);  // a third of the pass's L2 sectors excessive, seventeenth session)
        const int r0 = k0 + 64 * u + 2 * t;
        v.w[u][0] = wl[8 * min(r0, end - 1)];
        v.w[u][1] = wl[8 * min(r0 + 1, end - 1)];
        v.w[u][2] = wl[8 * min(r0 + 8, end - 1)];
        v.w[u][3] = wl[8 * min(r0 + 9, end - 1)];
    }
}

extern "C" __global__ void __launch_bounds__(128, 4)
values_from_scores(const float* __restrict__ scr, const unsigned* __restrict__ vw,
                   const unsigned short* __restrict__ vs, const unsigned short* __restrict__ vz,
                   const long long* __restrict__ len, const float* __restrict__ tmax, int has_tmax,
                   float* __restrict__ o, float* __restrict__ lse,
                   int cap, int H, int gq, int split_len, int ns, int vs_b, int vs_h, int vs_t) {
    __shared__ float s_part[4][GQS][128 + 4];
    __shared__ float s_max[4][GQS];
    // GQS == 1: row = query head b H + h, its values KV row row / gq (grouped queries: the gq programs
    // of a KV head read the same bytes). GQS > 1: row = KV row, and its GQS query heads share every
    // loaded code: the weights' columns are (query head, group) pairs.
    const int row = blockIdx.x, split = blockIdx.y, hkv = H / gq;
    const int b = GQS > 1 ? row / hkv : row / H;
    const int kvh = GQS > 1 ? row % hkv : row % H / gq, krow = GQS > 1 ? row : row / gq;
    const long long qrow0 = GQS > 1 ? (long long)b * H + (long long)kvh * GQS : row;  // the first query head's row
    const int start = split * split_len;
    const int end = min(start + split_len, (int)len[b]);
    if (start >= end) {  // an empty split: nothing to weigh
#pragma unroll
        for (int j = 0; j < GQS; ++j) {
            o[((qrow0 + j) * ns + split) * 128 + threadIdx.x] = 0.f;
            if (threadIdx.x == 0) lse[(qrow0 + j) * ns + split] = __int_as_float(0xff800000);
        }
        return;
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const float* sr = scr + qrow0 * cap;
    const unsigned short* vsb = vs + (long long)b * vs_b + (long long)kvh * vs_h;
    const unsigned short* vzb = vz + (long long)b * vs_b + (long long)kvh * vs_h;
    // this lane's word g of tokens k0 + 2t (+1, +8, +9): a base pointer and constant offsets
    const unsigned* wl = vw + (long long)krow * cap * 8 + g;
    // the first U tiles' codes and scales go out before the key pass's results are waited for
    // (programmatic launch: this grid may start while the key pass finishes) and before the
    // maximum's scan; then their scores
    VTile cur;
    load_tiles(cur, start + 16 * warp, end, lane, t, sr, cap, vsb, vzb, vs_t, wl, false);
    pdl_wait();
    load_scores(cur, start + 16 * warp, end, lane, sr, cap);
    // the split's exact maximum: nothing is rescaled afterwards. From the key pass's 16-token tile
    // maxima where it wrote them (a split starts on a tile), else a scan of the scores (unrolled:
    // several loads in flight)
    float m[GQS];  // each query head's
#pragma unroll
    for (int j = 0; j < GQS; ++j) {
        float mj = -1e30f;
        if (has_tmax) {
            const float* mr = tmax + (qrow0 + j) * ((cap + 15) / 16);
            for (int i = start / 16 + threadIdx.x; i < (end + 15) / 16; i += 128) mj = fmaxf(mj, mr[i]);
        } else {
            const float* sj = sr + (long long)j * cap;
#pragma unroll 8
            for (int i = start + threadIdx.x; i < end; i += 128) mj = fmaxf(mj, sj[i]);
        }
#pragma unroll
        for (int s = 16; s > 0; s >>= 1) mj = fmaxf(mj, __shfl_xor_sync(0xffffffffu, mj, s));
        if (lane == 0) s_max[warp][j] = mj;
    }
    __syncthreads();
#pragma unroll
    for (int j = 0; j < GQS; ++j) m[j] = fmaxf(fmaxf(s_max[0][j], s_max[1][j]), fmaxf(s_max[2][j], s_max[3][j]));

    // lane L < 16 weighs token k0 + L: p = 2**(s - max), A = fp16(p s) of each group (packed), and
    // sums p and the zero-point term; the A fragments then come from these lanes by shuffles
    float acc[4][2][4];  // [jb][hp]: rows g (plane hp) and g + 8 (plane hp + 2), columns = groups
#pragma unroll
    for (int jb = 0; jb < 4; ++jb)
#pragma unroll
        for (int hp = 0; hp < 2; ++hp)
#pragma unroll
            for (int r = 0; r < 4; ++r) acc[jb][hp][r] = 0.f;
    float l[GQS], saz[GQS][NG];
#pragma unroll
    for (int j = 0; j < GQS; ++j) {
        l[j] = 0.f;
#pragma unroll
        for (int i = 0; i < NG; ++i) saz[j][i] = 0.f;
    }
    // A warp takes U tiles of 16 tokens an iteration (tile u at k0 + 64 u): every load of the U
    // tiles is issued before any arithmetic, so U times the bytes are in flight (one tile at a
    // time left this pass waiting on memory at a third of the copy bandwidth). The next iteration's
    // loads go out after this one's arithmetic (loading them before it, double-buffered in registers,
    // measured no faster: fewer programs an SM; ninth session).
    for (int k0 = start + 16 * warp; k0 < end; k0 += 64 * U) {
        float (*sc)[GQS] = cur.sc;
        unsigned (*sv)[NW] = cur.sv;
        unsigned (*zv)[NW] = cur.zv;
        unsigned (*w)[4] = cur.w;
#pragma unroll
        for (int u = 0; u < U; ++u) {
            unsigned aw[CW];  // fp16 weights of columns (0, 1), (2, 3), ...: column n = (head n / NG, group n % NG)
#pragma unroll
            for (int w2 = 0; w2 < CW; ++w2) aw[w2] = 0u;
            if (lane < 16 && k0 + 64 * u + lane < end) {
#pragma unroll
                for (int j = 0; j < GQS; ++j) {
                    float pt = exp2f(sc[u][j] - m[j]);
                    l[j] += pt;
#pragma unroll
                    for (int i = 0; i < NG; ++i) {
                        unsigned short ah = f2h(pt * half_at(sv[u], i));
                        saz[j][i] += INTZ ? h2f(ah) * half_at(zv[u], i) : pt * half_at(zv[u], i);
                        aw[(j * NG + i) / 2] |= (unsigned)ah << (16 * ((j * NG + i) % 2));
                    }
                }
            }
            unsigned x0 = __shfl_sync(0xffffffffu, aw[0], 2 * t), x1 = __shfl_sync(0xffffffffu, aw[0], 2 * t + 1);
            unsigned x2 = __shfl_sync(0xffffffffu, aw[0], 2 * t + 8), x3 = __shfl_sync(0xffffffffu, aw[0], 2 * t + 9);
#pragma unroll
            for (int w2 = 1; w2 < CW; ++w2) {  // columns 2 w2, 2 w2 + 1 take word w2
                unsigned y0 = __shfl_sync(0xffffffffu, aw[w2], 2 * t), y1 = __shfl_sync(0xffffffffu, aw[w2], 2 * t + 1);
                unsigned y2 = __shfl_sync(0xffffffffu, aw[w2], 2 * t + 8), y3 = __shfl_sync(0xffffffffu, aw[w2], 2 * t + 9);
                if (g / 2 == w2) { x0 = y0; x1 = y1; x2 = y2; x3 = y3; }
            }
            // B (16 tokens x 8 columns): column n < GQS NG holds (head n / NG, group n % NG)'s weights
            // (lane g: column g)
            unsigned wb0 = 0u, wb1 = 0u;
            if (g < GQS * NG) {
                const unsigned selg = (g & 1) ? 0x7632u : 0x5410u;
                wb0 = prmt(x0, x1, selg);  // tokens 2t, 2t + 1
                wb1 = prmt(x2, x3, selg);  // tokens 2t + 8, 2t + 9
            }
#pragma unroll
            for (int jb = 0; jb < 4; ++jb) {
                // A (16 channels x 16 tokens): row g is channel 32 hp + 4 g + jb, row g + 8 the same in
                // plane hp + 2; lo / hi hold byte jb of word g of tokens (2t, 2t + 1) / (2t + 8, 2t + 9)
                const unsigned lo = prmt(w[u][0], w[u][1], jb | ((4 + jb) << 8));
                const unsigned hi = prmt(w[u][2], w[u][3], jb | ((4 + jb) << 8));
#pragma unroll
                for (int hp = 0; hp < 2; ++hp)
                    mma4(acc[jb][hp], plane(lo, hp), plane(lo, hp + 2), plane(hi, hp), plane(hi, hp + 2), wb0, wb1);
            }
        }
        if (k0 + 64 * U < end) load_tiles(cur, k0 + 64 * U, end, lane, t, sr, cap, vsb, vzb, vs_t, wl);
    }
    // sums over the token lanes (all 32: lanes up to 29 apply the zero terms)
#pragma unroll
    for (int s = 1; s < 32; s <<= 1)
#pragma unroll
        for (int j = 0; j < GQS; ++j) {
            l[j] += __shfl_xor_sync(0xffffffffu, l[j], s);
#pragma unroll
            for (int i = 0; i < NG; ++i) saz[j][i] += __shfl_xor_sync(0xffffffffu, saz[j][i], s);
        }
    // D row r of product (jb, hp) is channel 32 p + 4 g + jb (p = hp, or hp + 2 for r = g + 8); its
    // group i = p NG / 4, and head j's column col = j NG + i sits in lane t = col / 2, entry
    // 2 (r >= 8) + col % 2
#pragma unroll
    for (int jb = 0; jb < 4; ++jb)
#pragma unroll
        for (int hp = 0; hp < 2; ++hp)
#pragma unroll
            for (int rh = 0; rh < 2; ++rh)
#pragma unroll
                for (int j = 0; j < GQS; ++j) {
                    const int p = hp + 2 * rh, i = p * NG / 4, col = j * NG + i;
                    if (t == col / 2)
                        s_part[warp][j][32 * p + 4 * g + jb] = acc[jb][hp][2 * rh + (col & 1)]
                                                               + (INTZ ? -saz[j][i] : saz[j][i]);
                }
    if (lane == 0) {
#pragma unroll
        for (int j = 0; j < GQS; ++j) s_part[warp][j][128] = l[j];
    }
    __syncthreads();
    const int c = threadIdx.x;
#if ROT
    __shared__ float s_w[128];
#endif
#pragma unroll
    for (int j = 0; j < GQS; ++j) {
        float num = (s_part[0][j][c] + s_part[1][j][c]) + (s_part[2][j][c] + s_part[3][j][c]);
        float L = (s_part[0][j][128] + s_part[1][j][128]) + (s_part[2][j][128] + s_part[3][j][128]);
        float oc = num / L;  // L >= 1: the maximum's own token weighs 1
#if ROT  // values stored Hadamard-rotated (quarot): the partial output back to the model's space
        oc = wht128(s_w, oc) * 0.08838834764831845f;
#endif
        o[((qrow0 + j) * ns + split) * 128 + c] = oc;
        if (c == 0) lse[(qrow0 + j) * ns + split] = (m[j] + log2f(L)) / 1.4426950408889634f;
    }
}
"""


_KERNELS: dict = {}

# 16-token tiles a warp loads before computing (`U` in the source): 1 measured 0.081 ms at B8 x 8192
# on the H100 (eighth session), load-latency bound; 4 (codes as A) 0.0475 ms, the
# best of the ninth session's sweep (docs/kernel-notes.md, results/gpu/nvidia-h100-80gb-hbm3/session9/).
TILES = 4
SPLITS_PER_SM = 4


def source(num_groups: int, tiles: int = TILES, integer_zero: bool = True, rotate_out: bool = False,
           vector_scales: bool = True, shared_heads: int = 1) -> str:
    """The kernel's source for these compile-time choices (128 registers: four programs an SM).
    `vector_scales`: a token's scales (and zeros) read in one load, for rows aligned to their size.
    `shared_heads` > 1: each program takes that many query heads over one KV row (`shares_kv_rows`)."""
    if tiles not in (1, 2, 4, 8) or num_groups not in (1, 2, 4):
        raise ValueError("values_cuda.source: tiles must be 1, 2, 4 or 8 and groups a row 1, 2 or 4")
    if shared_heads > 1 and not token_scores_cuda.fits_columns(shared_heads, num_groups):
        raise ValueError("values_cuda.source: shared heads need one or two groups a row and at most 8 columns")
    return PRELUDE + (_SOURCE.replace("__NG__", str(num_groups)).replace("__U__", str(tiles))
                      .replace("__INTZ__", str(int(integer_zero))).replace("__ROT__", str(int(rotate_out)))
                      .replace("__VEC__", str(int(vector_scales))).replace("__GQS__", str(int(shared_heads))))


# Whether grouped queries take one program a KV row: as the key pass decides (its SHARE_KV_ROWS
# switches both passes).
shares_kv_rows = token_scores_cuda.shares_kv_rows


def _rows_aligned(v_scale, v_zero, ng) -> bool:
    """Whether every token's `ng` scales (and zeros) start on a multiple of their size (2 ng bytes)."""
    return all(t.data_ptr() % (2 * ng) == 0 and all(st % ng == 0 for st in t.stride()[:-1]) for t in (v_scale, v_zero))


def values_from_scores(scores, v_codes, v_scale, v_zero, lengths, *, group_size, integer_zero=True, max_len=None,
                       num_splits=None, splits_per_sm=SPLITS_PER_SM, tiles=TILES, tile_max=None, rotate_out=False,
                       programmatic=True):
    """`decode_mha.values_from_scores`'s contract on the tensor cores (shapes `supports` takes).
    `integer_zero=False`: zeros are the group minimum (KIVI's values: c s + z). `tile_max`: the
    maxima of the scores' 16-token tiles [B, H, ceil(cap / 16)] (`token_scores_cuda` writes them),
    read instead of scanning the scores for each split's maximum. `rotate_out`: the values were
    stored Hadamard-rotated (quarot): each partial output is rotated back (H_128 / sqrt(128)).
    `programmatic`: launched to overlap the end of the kernel before it on the stream (the key pass
    that wrote `scores`; `nvrtc.launch`), which is safe after any kernel: it waits for that kernel's
    writes before reading the scores and maxima. Grouped queries: scores of H query heads over
    v_codes' H / gq KV heads (query head h reads KV head h // gq)."""
    from kvbench.kernels.decode_attention import split_plan

    b, h, cap = scores.shape
    hkv = v_codes.shape[1]
    if v_codes.shape[-1] != D * 2 // 8 or not v_codes.is_contiguous() or v_scale.dtype != torch.float16 \
            or v_zero.stride() != v_scale.stride() or v_scale.stride(-1) != 1 or h % hkv or v_scale.shape[1] != hkv:
        raise ValueError("values_cuda: needs contiguous 2-bit rows of 128 channels, fp16 scales and zeros laid "
                         "out alike, query heads a multiple of the KV heads")
    max_len = cap if max_len is None else max_len
    gq = h // hkv
    shared = gq if shares_kv_rows(gq, D // group_size) else 1  # query heads a program
    # splits in whole 64-token steps (a program's four warps cover any such range in tiles of 16)
    ns, nit = split_plan(max_len, STEP, b * h // shared, scores.device, per_sm=splits_per_sm, num_splits=num_splits)
    o = torch.empty(b, h, ns, D, dtype=torch.float32, device=scores.device)
    lse = torch.empty(b, h, ns, dtype=torch.float32, device=scores.device)
    lengths = lengths if lengths.dtype == torch.int64 else lengths.long()
    if tile_max is not None and (tile_max.shape != (b, h, -(-cap // 16)) or not tile_max.is_contiguous()):
        raise ValueError("values_cuda: tile_max must be a contiguous [B, H, ceil(cap / 16)] tensor")
    vec = _rows_aligned(v_scale, v_zero, D // group_size)
    key = (D // group_size, tiles, bool(integer_zero), bool(rotate_out), vec, shared, str(scores.device))
    if key not in _KERNELS:  # (keyed by the choices, not the source: every decode read asks)
        _KERNELS[key] = nvrtc.compile_source(source(D // group_size, tiles, integer_zero, rotate_out, vec, shared),
                                             "values_from_scores", scores.device)
    # a programmatic launch: its first loads overlap the key pass's last blocks (it waits for them
    # before reading the scores)
    nvrtc.launch(_KERNELS[key], (b * h // shared, ns, 1), (32 * WARPS, 1, 1),
                 [scores.contiguous(), v_codes, v_scale, v_zero, lengths, scores if tile_max is None else tile_max,
                  int(tile_max is not None), o, lse, int(cap), int(h), int(h // hkv), int(nit * STEP), int(ns),
                  int(v_scale.stride(0)), int(v_scale.stride(1)), int(v_scale.stride(2))], programmatic=programmatic)
    return o, lse


def emulate_values(scores, v_codes, v_scale, v_zero, lengths, *, group_size, split_len, integer_zero=True):
    """The kernel's arithmetic in torch: per split, p = 2**(s - max), weights fp16(p s) on the codes
    minus zero points (integer zeros) or plus p z (float zeros), divided by sum p.
    Returns (o [B, H, S, D], lse [B, H, S])."""
    from kvbench.packing import unpack

    b, h, cap = scores.shape
    codes = unpack(v_codes, 2, D).float()  # [B, H, cap, D]
    s = v_scale.float().repeat_interleave(group_size, -1)
    z = v_zero.float().repeat_interleave(group_size, -1)
    ns = -(-cap // split_len)
    o = torch.zeros(b, h, ns, D, device=scores.device)
    lse = torch.full((b, h, ns), float("-inf"), device=scores.device)
    for bi in range(b):
        n = int(lengths[bi])
        for sp in range(ns):
            lo, hi = sp * split_len, min((sp + 1) * split_len, n)
            if lo >= hi:
                continue
            sc = scores[bi, :, lo:hi]
            m = sc.max(-1, keepdim=True).values
            p = torch.exp2(sc - m)
            w = (p[..., None] * s[bi, :, lo:hi]).half().float()  # [H, T, D]
            if integer_zero:
                num = (w * (codes[bi, :, lo:hi] - z[bi, :, lo:hi])).sum(1)
            else:
                num = (w * codes[bi, :, lo:hi] + p[..., None] * z[bi, :, lo:hi]).sum(1)
            lsum = p.sum(-1)
            o[bi, :, sp] = num / lsum[:, None]
            lse[bi, :, sp] = (m[:, 0] + torch.log2(lsum)) / LOG2E
    return o, lse
