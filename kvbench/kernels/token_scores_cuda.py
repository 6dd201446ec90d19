"""The key pass of a two-pass decode read over per-token packed keys (rtn, quarot: keys after RoPE,
one scale and zero a token and group) as a hand-laid CUDA kernel, on the tensor cores.

`decode_mha` reads keys and values in one Triton kernel on CUDA cores (about four instructions a
code, 0.127 ms at B8 x 8192: 44% of the copy bandwidth, issue- and latency-bound; docs/kernel-notes.md).
Here the keys' codes go to the tensor cores untouched by scales, and `values_cuda` reads the values:

* **the score of a group without its scale**: with (c - z) s dequantization, a token's score is
  sum_g s_g (q_g . c_g - z_g sum(q_g)), so the per-code work is only turning c into fp16 and the
  product q_g . c_g; the scale and zero cost two FMA a token and group.
* **A = the codes in place** (16 tokens x 16 channels a `mma.m16n8k16`): lane (g, t) owns tokens g
  and g + 8 of the tile and words 2t, 2t + 1 of their 32-byte rows (one 8-byte load each). One
  PRMT puts byte jb of the two words into the half-words (it serves the byte's four bit planes),
  one LOP3 masks plane p and ORs 1024's exponent (1024 + c 4**p), one HFMA2 by
  (4**-p, -1024 4**-p) leaves c (exact): about 1.1 instructions a code.
* **B = the query, one column a key group**: product m (0..7) takes byte jb = m // 2 and planes
  (2 (m % 2), 2 (m % 2) + 1), so its k rows are channels 32 p + 4 w + jb (`channel_map`); column n
  of B holds the query's entries of those channels that are in group n, zero elsewhere (built in
  the kernel from q, four 16-byte loads a lane; `query_operand` states the same layout in torch
  for the emulation), so D column n is q_n . c_n of group n and all eight products
  accumulate into one tile. Lane (g, t) then holds groups 2t, 2t + 1 of tokens g and g + 8: it
  applies their scales and zeros (one 32-bit load each), and one shuffle adds groups 2, 3.
* **U tiles a warp** (16 tokens each) loaded before any is computed: the bytes in flight that the
  first values pass lacked (docs/kernel-notes.md, eighth and ninth sessions; loading the next U
  tiles before this iteration's arithmetic, double-buffered in registers, measured no faster).

* **Grouped queries**: where gq query heads x NG groups fit the 8 columns (`shares_kv_rows`), one
  program takes a KV row and all its query heads, column n = (query head n / NG, group n % NG):
  each code is decoded once for them all (2.3x faster than one program a query head on a
  Llama-3-8B layer with the values pass shared too, seventeenth session). Else each query head is
  its own program over its KV head's row.

Contract: `token_scores(...)` writes scores [B, H, cap] fp32 in the log2 domain (softmax scale *
log2 e folded in), valid below each row's length, for `values_cuda.values_from_scores` to read.
Error: fp16 query operands (as every fp16 read here), fp32 accumulation, exact codes; the scale
and zero in fp32. `emulate_scores` runs the same operands and index maps in torch for CPU tests.
"""

from __future__ import annotations

import torch

from kvbench.kernels import nvrtc
from kvbench.kernels.cuda_prelude import PRELUDE

D = 128
WARPS = 4
TILE = 16  # tokens a product
TILES = 2  # tiles a warp loads before computing (H100 sweep, ninth session: 2 at 8 programs an SM)
SPLITS_PER_SM = 8
STEP = TILE * WARPS  # splits are whole multiples of this (64 tokens)


def supports(gq: int, head_dim: int, bits: int, group_size: int) -> bool:
    return gq == 1 and head_dim == D and bits == 2 and group_size in (32, 64, 128)


_MAPS: dict = {}


def _channel_map_on(device) -> torch.Tensor:
    """`channel_map` on `device`, cached: no host-to-device copy per call (none is allowed while a
    CUDA graph is being captured)."""
    key = str(device)
    if key not in _MAPS:
        _MAPS[key] = channel_map().to(device)
    return _MAPS[key]


def channel_map() -> torch.Tensor:
    """[8 products m, 4 lanes t, 4 halves] -> key channel: halves (k = 2t, 2t + 1, 2t + 8, 2t + 9) of
    product m are byte jb = m // 2 of words 2t, 2t + 1, planes 2 (m % 2) (k < 8) and 2 (m % 2) + 1."""
    m = torch.arange(8)[:, None, None]
    t = torch.arange(4)[None, :, None]
    half = torch.arange(4)[None, None, :]
    jb, p = m // 2, 2 * (m % 2) + half // 2
    word = 2 * t + half % 2
    return 32 * p + 4 * word + jb


def query_operand(q: torch.Tensor, group_size: int) -> torch.Tensor:
    """q [B, H, 128] -> B fragments [B, H, 8 products, NG columns, 4 lanes, 4 halves] fp16: column r
    keeps the query entries of key group r (zero for the other groups' channels)."""
    ch = _channel_map_on(q.device)  # [8, 4, 4]
    ng = D // group_size
    vals = q.half()[..., ch]  # [B, H, 8, 4, 4]
    rows = (ch // group_size)[None] == torch.arange(ng, device=q.device)[:, None, None, None]  # [NG, 8, 4, 4]
    return (vals[:, :, None] * rows.to(vals.dtype)).transpose(2, 3).contiguous()  # [B, H, 8, NG, 4, 4]


def group_sums(q: torch.Tensor, group_size: int) -> torch.Tensor:
    """sum of each key group's fp16 query entries (as the products see them), fp32 [B, H, NG]."""
    b, h, _ = q.shape
    return q.half().float().reshape(b, h, D // group_size, group_size).sum(-1).contiguous()


_SOURCE = r"""
#define NG __NG__  // key groups a row (128 / group size)
#define U __U__    // 16-token tiles a warp loads before computing
#define ROT __ROT__  // 1: rotate the query by the 128-point Hadamard first (quarot's stored keys are H k)
#define GQ __GQ__  // query heads a program takes over one KV row (1: one query head a program)

// the loads of U tiles: every load unconditional (token indices clamped to the last valid one:
// what a clamped row yields is never stored) and kept raw (converting a loaded value right away
// would wait for it there)
struct KTile {
    uint2 wa[U], wb[U];
    unsigned sa[U], za[U], sb[U], zb[U];
};
__device__ __forceinline__ void load_tiles(KTile& v, int k0, int end, int g, int ks_t, const uint2* kr,
                                           const unsigned short* ksb, const unsigned short* kzb) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
        const int ta = min(k0 + 16 * u + g, end - 1), tb = min(k0 + 16 * u + g + 8, end - 1);
        v.wa[u] = kr[4 * ta];
        v.wb[u] = kr[4 * tb];
        if (NG >= 2) {
            v.sa[u] = *reinterpret_cast<const unsigned*>(ksb + ta * ks_t);
            v.za[u] = *reinterpret_cast<const unsigned*>(kzb + ta * ks_t);
            v.sb[u] = *reinterpret_cast<const unsigned*>(ksb + tb * ks_t);
            v.zb[u] = *reinterpret_cast<const unsigned*>(kzb + tb * ks_t);
        } else {
            v.sa[u] = ksb[ta * ks_t]; v.za[u] = kzb[ta * ks_t]; v.sb[u] = ksb[tb * ks_t]; v.zb[u] = kzb[tb * ks_t];
        }
    }
}

extern "C" __global__ void __launch_bounds__(128)
token_scores(const uint2* __restrict__ kw, const unsigned short* __restrict__ ks,
             const unsigned short* __restrict__ kz, const unsigned short* __restrict__ q,
             const long long* __restrict__ len, float* __restrict__ scr, float* __restrict__ tmax,
             double sm_scale_d, int cap, int H, int gq, int split_len, int ks_b, int ks_h, int ks_t) {
    pdl_launch_dependents();  // the values pass may launch now: it waits for this grid's scores
    const int tiles_cap = (cap + 15) / 16;
    const float sm_scale = (float)sm_scale_d;  // (the launcher passes Python floats as doubles)
    // GQ == 1: row = query head b H + h, its keys KV row row / gq (grouped queries: the gq programs of
    // a KV head read the same bytes, the later ones mostly from L2). GQ > 1: row = KV row, and its GQ
    // query heads share every loaded code: the products' columns are (query head, key group) pairs.
    const int row = blockIdx.x, hkv = H / gq;
    const int b = GQ > 1 ? row / hkv : row / H;
    const int kvh = GQ > 1 ? row % hkv : row % H / gq, krow = GQ > 1 ? row : row / gq;
    const long long qrow0 = GQ > 1 ? (long long)b * H + (long long)kvh * GQ : row;  // the first query head's row
    const int start = blockIdx.y * split_len;
    const int end = min(start + split_len, (int)len[b]);
    if (start >= end) return;  // (scores past a row's length are never read)
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    // B fragments of the 8 products, built here from q (the layout `query_operand` states): column
    // n < NG is key group n's query, lane g holds column g. Lane t needs channels 32 p + 8 t + i
    // (i = 4 e + jb < 8) of each plane p: one 16-byte load a plane, zero where plane p is not in
    // group g (a plane's 32 channels lie in one group).
#if ROT  // the caller's q is unrotated: H_128 q / sqrt(128) here, in fp32, rounded to fp16 as the host did
    __shared__ __align__(16) unsigned short s_qh[GQ][128];
    __shared__ float s_w[128];
#pragma unroll
    for (int j = 0; j < GQ; ++j)
        s_qh[j][threadIdx.x] = f2h(wht128(s_w, h2f(q[(qrow0 + j) * 128 + threadIdx.x])) * 0.08838834764831845f);
    __syncthreads();
#define QROW(j) (&s_qh[j][0])
#else
#define QROW(j) (q + (qrow0 + (j)) * 128)
#endif
    // column g = (query head g / NG, group g % NG) for g < GQ NG (GQ = 1: column g = group g)
    const unsigned short* qcol = QROW(min(g / NG, GQ - 1));
    uint4 qv[4];
#pragma unroll
    for (int p = 0; p < 4; ++p) {
        const int pg = p * NG / 4;  // the group of plane p
        qv[p] = (g < GQ * NG && pg == g % NG) ? *reinterpret_cast<const uint4*>(qcol + 32 * p + 8 * t)
                                               : make_uint4(0u, 0u, 0u, 0u);
    }
    unsigned b0[8], b1[8];
#pragma unroll
    for (int m = 0; m < 8; ++m) {  // product m = 2 jb + hp: halves (jb, 4 + jb) of planes 2 hp, 2 hp + 1
        const int jb = m >> 1, hp = m & 1;
        const unsigned sel = (jb & 1) ? 0x7632u : 0x5410u;
        b0[m] = prmt(u4w(qv[2 * hp], jb >> 1), u4w(qv[2 * hp], 2 + (jb >> 1)), sel);
        b1[m] = prmt(u4w(qv[2 * hp + 1], jb >> 1), u4w(qv[2 * hp + 1], 2 + (jb >> 1)), sel);
    }
    // the groups' query sums (fp16 entries summed in fp32): lane L sums channels 4 L .. 4 L + 3
    // (group 4 L / G), the lanes of a group reduce, then each lane takes the two groups it finishes
    // D columns 2t, 2t + 1 are groups 2t, 2t + 1: lane t (< NG / 2, or 0) finishes them (GQ > 1: the
    // columns of query head t with two groups, of heads 2t and 2t + 1 with one). Its scale and zero
    // pair (one 32-bit load each; one half-word with one group) and the columns' query sums:
    const int gp = NG >= 2 ? 2 * (t % (NG / 2)) : 0;
    float q0 = 0.f, q1 = 0.f;
#pragma unroll
    for (int j = 0; j < GQ; ++j) {
        const uint2 x = *reinterpret_cast<const uint2*>(QROW(j) + 4 * lane);
        float qsl = (lo2f(x.x) + hi2f(x.x)) + (lo2f(x.y) + hi2f(x.y));
#pragma unroll
        for (int s = 1; s < 32 / NG; s <<= 1) qsl += __shfl_xor_sync(0xffffffffu, qsl, s);
        const float s0 = __shfl_sync(0xffffffffu, qsl, gp * 32 / NG);
        const float s1 = NG >= 2 ? __shfl_sync(0xffffffffu, qsl, ((gp + 1) * 32 / NG) & 31) : 0.f;
        if (GQ == 1) { q0 = s0; q1 = s1; }
        else if (NG == 2) { if (t == j) { q0 = s0; q1 = s1; } }
        else { if (2 * t == j) q0 = s0; if (2 * t + 1 == j) q1 = s0; }  // NG == 1: one head a column
    }
    const long long sbase = (long long)b * ks_b + (long long)kvh * ks_h + gp;
    const unsigned short* ksb = ks + sbase;
    const unsigned short* kzb = kz + sbase;
    const uint2* kr = kw + (long long)krow * cap * 4 + t;  // token n: kr[4 n] = its words 2t, 2t + 1
    float* sr = scr + qrow0 * cap;
    // U tiles' loads first (kept raw), then their arithmetic
    KTile cur;
    for (int k0 = start + 16 * U * warp; k0 < end; k0 += 16 * U * 4) {
        load_tiles(cur, k0, end, g, ks_t, kr, ksb, kzb);
        const uint2* wa = cur.wa;
        const uint2* wb = cur.wb;
        const unsigned* sa = cur.sa;
        const unsigned* za = cur.za;
        const unsigned* sb = cur.sb;
        const unsigned* zb = cur.zb;
#pragma unroll
        for (int u = 0; u < U; ++u) {
            // A = keys: rows g (token g) and g + 8, k = this lane's channels of product m
            float acc[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
            for (int jb = 0; jb < 4; ++jb) {
                const unsigned xa = prmt(wa[u].x, wa[u].y, jb | ((4 + jb) << 8));  // byte jb of words 2t, 2t + 1
                const unsigned xb = prmt(wb[u].x, wb[u].y, jb | ((4 + jb) << 8));
#pragma unroll
                for (int hp = 0; hp < 2; ++hp)  // product m = 2 jb + hp: planes 2 hp (k < 8) and 2 hp + 1
                    mma4(acc, plane(xa, 2 * hp), plane(xb, 2 * hp), plane(xa, 2 * hp + 1), plane(xb, 2 * hp + 1),
                            b0[2 * jb + hp], b1[2 * jb + hp]);
            }
            // acc: (token g, groups 2t, 2t + 1), (token g + 8, same groups); GQ > 1 with one group:
            // (token g, heads 2t, 2t + 1), (token g + 8, same heads): ra, rb and ra2, rb2
            float ra = lo2f(sa[u]) * (acc[0] - lo2f(za[u]) * q0), rb = lo2f(sb[u]) * (acc[2] - lo2f(zb[u]) * q0);
            float ra2 = 0.f, rb2 = 0.f;
            if (GQ > 1 && NG == 1) {
                ra2 = lo2f(sa[u]) * (acc[1] - lo2f(za[u]) * q1);
                rb2 = lo2f(sb[u]) * (acc[3] - lo2f(zb[u]) * q1);
            } else if (NG >= 2) {
                ra += hi2f(sa[u]) * (acc[1] - hi2f(za[u]) * q1);
                rb += hi2f(sb[u]) * (acc[3] - hi2f(zb[u]) * q1);
            }
            if (NG == 4) { ra += __shfl_xor_sync(0xffffffffu, ra, 1); rb += __shfl_xor_sync(0xffffffffu, rb, 1); }
            const int ta = k0 + 16 * u + g;
            ra *= sm_scale;
            rb *= sm_scale;
            ra2 *= sm_scale;
            rb2 *= sm_scale;
            // lane t stores query head j's scores: j = 0 (GQ = 1, lane t = 0), t (two groups), 2t and
            // 2t + 1 (one group)
            const int j0 = GQ == 1 ? 0 : (NG == 2 ? t : 2 * t);
            if (GQ == 1 ? t == 0 : j0 < GQ) {
                float* s = sr + (long long)j0 * cap;
                if (ta < end) s[ta] = ra;
                if (ta + 8 < end) s[ta + 8] = rb;
            }
            if (GQ > 1 && NG == 1 && j0 + 1 < GQ) {
                float* s = sr + (long long)(j0 + 1) * cap;
                if (ta < end) s[ta] = ra2;
                if (ta + 8 < end) s[ta + 8] = rb2;
            }
            // the tile's maximum (16 tokens), for the values pass: no scan of the scores there
            float mx = fmaxf(ta < end ? ra : -1e30f, ta + 8 < end ? rb : -1e30f);
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 4));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 8));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 16));
            const long long tile = (k0 + 16 * u) / 16;
            if (g == 0 && k0 + 16 * u < end && (GQ == 1 ? t == 0 : j0 < GQ)) tmax[(qrow0 + j0) * tiles_cap + tile] = mx;
            if (GQ > 1 && NG == 1) {
                float mx2 = fmaxf(ta < end ? ra2 : -1e30f, ta + 8 < end ? rb2 : -1e30f);
                mx2 = fmaxf(mx2, __shfl_xor_sync(0xffffffffu, mx2, 4));
                mx2 = fmaxf(mx2, __shfl_xor_sync(0xffffffffu, mx2, 8));
                mx2 = fmaxf(mx2, __shfl_xor_sync(0xffffffffu, mx2, 16));
                if (g == 0 && k0 + 16 * u < end && j0 + 1 < GQ) tmax[(qrow0 + j0 + 1) * tiles_cap + tile] = mx2;
            }
        }
    }
}
"""

_KERNELS: dict = {}


def source(num_groups: int, tiles: int = TILES, rotate_q: bool = False, shared_heads: int = 1) -> str:
    """`shared_heads` > 1: each program takes that many query heads over one KV row (`shares_kv_rows`)."""
    if num_groups not in (1, 2, 4) or tiles not in (1, 2, 4, 8):
        raise ValueError("token_scores_cuda.source: groups a row must be 1, 2 or 4 and tiles 1, 2, 4 or 8")
    if shared_heads > 1 and not fits_columns(shared_heads, num_groups):
        raise ValueError("token_scores_cuda.source: shared heads need one or two groups a row and at most 8 columns")
    return PRELUDE + (_SOURCE.replace("__NG__", str(num_groups)).replace("__U__", str(tiles))
            .replace("__ROT__", str(int(rotate_q))).replace("__GQ__", str(int(shared_heads))))


#: grouped queries share each KV row's codes in one program (the products' columns are (query head,
#: group) pairs) where they fit in the 8 columns; else each query head is its own program.
SHARE_KV_ROWS = True


def fits_columns(gq: int, num_groups: int) -> bool:
    """Whether `gq` query heads with `num_groups` groups a row fit the products' 8 columns (the
    kernels' shared build compiles for them)."""
    return gq > 1 and num_groups <= 2 and gq * num_groups <= 8


def shares_kv_rows(gq: int, num_groups: int) -> bool:
    """Whether `gq` query heads a KV head take one program a KV row (GQ > 1 in the source). Only at
    4 query heads a KV head (Llama-3-8B's), with one or two groups a row: what the GPU checks have
    run (`checks.check_gqa_cuda`). The kernels compile for 2 (and 8 with one group, where the
    values pass spills registers); until those run on a GPU they take one program a query head."""
    return SHARE_KV_ROWS and gq == 4 and fits_columns(gq, num_groups)


def _pairs_aligned(k_scale, k_zero, ng):
    """With several groups the kernel reads two adjacent fp16 scales (and zeros) as one 32-bit word."""
    if ng == 1:
        return True
    return (k_scale.stride(-1) == 1 and all(st % 2 == 0 for st in k_scale.stride()[:-1])
            and k_scale.data_ptr() % 4 == 0 and k_zero.data_ptr() % 4 == 0)


def token_scores(q, k_codes, k_scale, k_zero, lengths, sm_scale, scores, *, group_size, split_len, num_splits,
                 tile_max=None, tiles=TILES, rotate_q=False):
    """Write scores [B, H, cap] fp32 (log2 domain: `sm_scale` includes log2 e) of q [B, H, 128] over
    per-token packed 2-bit keys with integer zero points, in splits of `split_len` tokens (a multiple
    of `STEP`), and each 16-token tile's maximum into `tile_max` [B, H, ceil(cap / 16)] fp32 (for
    `values_cuda.values_from_scores`; a scratch tensor is used if None). `rotate_q`: q is unrotated
    and the keys were stored Hadamard-rotated (quarot): the kernel applies H_128 / sqrt(128) to q.
    Grouped queries: H query heads over k_codes' H / gq KV heads (query head h reads KV head h // gq)."""
    b, h, cap = scores.shape
    hkv = k_codes.shape[1]
    if split_len % STEP or not k_codes.is_contiguous() or k_codes.shape[-1] != D // 4 \
            or k_scale.dtype != torch.float16 or k_zero.stride() != k_scale.stride() or not _pairs_aligned(
                k_scale, k_zero, D // group_size) or h % hkv or k_scale.shape[1] != hkv:
        raise ValueError("token_scores_cuda: needs contiguous 2-bit rows of 128 channels, fp16 scales and zeros "
                         "laid out alike (a token's groups adjacent), splits a multiple of 64 tokens, query heads "
                         "a multiple of the KV heads")
    ng = D // group_size
    q = q.half().contiguous()  # (the kernel builds its operands from q: `query_operand`, `group_sums`)
    if tile_max is None:
        tile_max = torch.empty(b, h, -(-cap // 16), dtype=torch.float32, device=q.device)
    elif tile_max.shape != (b, h, -(-cap // 16)) or not tile_max.is_contiguous():
        raise ValueError("token_scores_cuda: tile_max must be a contiguous [B, H, ceil(cap / 16)] tensor")
    lengths = lengths if lengths.dtype == torch.int64 else lengths.long()
    gq = h // hkv
    shared = gq if shares_kv_rows(gq, ng) else 1
    key = (ng, tiles, bool(rotate_q), shared, str(q.device))
    if key not in _KERNELS:
        _KERNELS[key] = nvrtc.compile_source(source(ng, tiles, rotate_q, shared), "token_scores", q.device)
    _KERNELS[key](grid=(b * h // shared, num_splits, 1), block=(32 * WARPS, 1, 1),
                  args=[k_codes, k_scale, k_zero, q, lengths, scores, tile_max, float(sm_scale), int(cap), int(h),
                        int(h // hkv), int(split_len), int(k_scale.stride(0)), int(k_scale.stride(1)),
                        int(k_scale.stride(2))])
    return scores


def emulate_scores(q, k_codes, k_scale, k_zero, lengths, sm_scale, *, group_size):
    """The kernel's arithmetic in torch: the same query operand and channel map, exact codes, products
    in float32, then s_g (dot_g - z_g sum(q_g)) summed over groups. -inf past each row's length."""
    from kvbench.packing import unpack

    b, h, cap = k_codes.shape[:3]
    codes = unpack(k_codes, 2, D).float()  # [B, H, cap, D]
    ch = channel_map().to(q.device)  # [8, 4, 4]
    qop = query_operand(q, group_size).float()  # [B, H, 8, NG, 4, 4]
    dots = torch.einsum("bhmrtk,bhcmtk->bhcr", qop, codes[..., ch])  # [B, H, cap, NG]
    s, z = k_scale.float(), k_zero.float()
    out = (s * (dots - z * group_sums(q, group_size)[:, :, None])).sum(-1) * sm_scale
    valid = torch.arange(cap, device=q.device)[None, None] < lengths.to(q.device)[:, None, None]
    return torch.where(valid, out, torch.full_like(out, float("-inf")))
