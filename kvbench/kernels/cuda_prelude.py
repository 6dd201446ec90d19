"""Inline-PTX helpers shared by the hand-laid CUDA kernels (`token_scores_cuda`, `kivi_scores_cuda`,
`values_cuda`): prepended to each kernel's source before NVRTC compiles it (no headers there)."""

PRELUDE = r"""
// Programmatic dependent launch (sm_90): a key pass lets its values pass launch early
// (`launch_dependents`), and the values pass waits for the key pass's results (`wait`) only after
// issuing the loads that do not depend on them. Without the launch attribute both are no-ops.
__device__ __forceinline__ void pdl_launch_dependents() { asm volatile("griddepcontrol.launch_dependents;"); }
__device__ __forceinline__ void pdl_wait() { asm volatile("griddepcontrol.wait;" ::: "memory"); }
__device__ __forceinline__ unsigned prmt(unsigned a, unsigned b, unsigned sel) {
    unsigned d; asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(sel)); return d;
}
// (a & m) | o in one LOP3 (ptxas splits two immediates into two ops unless the asm says it)
__device__ __forceinline__ unsigned lop_and_or(unsigned a, unsigned m, unsigned o) {
    unsigned d; asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(d) : "r"(a), "r"(m), "r"(o)); return d;
}
__device__ __forceinline__ unsigned hfma2(unsigned a, unsigned b, unsigned c) {
    unsigned d; asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c)); return d;
}
__device__ __forceinline__ unsigned hmul2(unsigned a, unsigned b) {
    unsigned d; asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b)); return d;
}
__device__ __forceinline__ unsigned short f2h(float f) {
    unsigned short h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h;
}
__device__ __forceinline__ float h2f(unsigned short h) {
    float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f;
}
__device__ __forceinline__ float lo2f(unsigned x) {
    float f; asm("{.reg .f16 l, h; mov.b32 {l, h}, %1; cvt.f32.f16 %0, l;}" : "=f"(f) : "r"(x)); return f;
}
__device__ __forceinline__ float hi2f(unsigned x) {
    float f; asm("{.reg .f16 l, h; mov.b32 {l, h}, %1; cvt.f32.f16 %0, h;}" : "=f"(f) : "r"(x)); return f;
}
__device__ __forceinline__ unsigned u4w(uint4 v, int i) { return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w; }
// D += A B, mma.m16n8k16 with fp16 operands and fp32 accumulation: all four A registers, or (mma_acc)
// A's rows 8..15 zero
__device__ __forceinline__ void mma4(float* d, unsigned a0, unsigned a1, unsigned a2, unsigned a3, unsigned b0,
                                     unsigned b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
                 "{%0, %1, %2, %3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void mma_acc(float* d, unsigned a0, unsigned a2, unsigned b0, unsigned b1) {
    mma4(d, a0, 0u, a2, 0u, b0, b1);
}
// the 2-bit codes of plane p of a PRMT-paired byte as exact fp16 pairs: the LOP3 leaves
// 1024 + c 4**p, and (1024 + c 4**p) 4**-p - 1024 4**-p = c in one fp16x2 FMA
__device__ __forceinline__ unsigned plane(unsigned x, int p) {
    const unsigned mul = p == 0 ? 0x3C003C00u : p == 1 ? 0x34003400u : p == 2 ? 0x2C002C00u : 0x24002400u;
    const unsigned add = p == 0 ? 0xE400E400u : p == 1 ? 0xDC00DC00u : p == 2 ? 0xD400D400u : 0xCC00CC00u;
    return hfma2(lop_and_or(x, 0x00030003u << (2 * p), 0x64006400u), mul, add);
}
// element threadIdx.x of H_128 x (Sylvester order, unnormalized) for a 128-thread block holding x one
// element a thread; s: 128 floats of shared memory. Block-wide (every thread must call it).
__device__ __forceinline__ float wht128(float* s, float x) {
    // stages 1..16 between the lanes of a warp (shuffles, no barrier), 32 and 64 across the four warps
    // through shared memory; every stage computes x + other or other - x exactly as a shared-memory
    // butterfly would, so the result is the same bit for bit
    const int i = threadIdx.x;
#pragma unroll
    for (int st = 1; st < 32; st <<= 1) {
        const float other = __shfl_xor_sync(0xffffffffu, x, st);
        x = (i & st) ? (other - x) : (x + other);
    }
#pragma unroll
    for (int st = 32; st < 128; st <<= 1) {
        s[i] = x;
        __syncthreads();
        const float other = s[i ^ st];
        __syncthreads();
        x = (i & st) ? (other - x) : (x + other);
    }
    return x;
}
"""
