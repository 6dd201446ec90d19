"""The small per-layer operations around attention, fused for the speed runs (Triton).

A Llama decode step spends ~2.6 ms of its GPU time (Llama-2-7B shape, batch 8, H100) in about
1150 small kernels that every method shares: RMSNorm (eight torch kernels each, twice a layer),
RoPE on q and k (five each) and the MLP's SiLU-times-up (two). In a captured step each launch
still costs 2-3 us. `kvbench.decode.DecodeEngine` routes these three through one launch each
(`fused_glue`), for fp16 and every compressed method alike, so speedups stay measured against a
baseline without the overhead. The arithmetic is torch's, rounding step for rounding step (fp16
products and sums rounded where torch rounds them); only the RMSNorm's mean and rsqrt may differ
in the last bits (reduction order, the hardware rsqrt).
"""

from __future__ import annotations

import torch

try:  # torchao-style guard: importable without triton
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None
    tl = None


if triton is not None:

    @triton.jit
    def _rn(op: tl.constexpr, a, b, ASM: tl.constexpr):
        """a op b in fp32, rounded on its own: `mul.rn`/`add.rn` are never contracted into an FMA."""
        if ASM:
            return tl.inline_asm_elementwise(op + ".rn.f32 $0, $1, $2;", "=f,f,f", [a, b], dtype=tl.float32,
                                             is_pure=True, pack=1)
        if op == "mul":
            return a * b
        return a + b

    @triton.jit
    def _to_f16_precision(v, ASM: tl.constexpr):
        """v (fp32) rounded to fp16 and back. In plain Triton the round trip `.to(fp16).to(fp32)` is
        folded away (measured: RoPE then came out one fp16 ulp off torch on a quarter of the elements,
        its product and sum contracted into one FMA)."""
        if ASM:
            return tl.inline_asm_elementwise("{ .reg .f16 h; cvt.rn.f16.f32 h, $1; cvt.f32.f16 $0, h; }", "=f,f",
                                             [v], dtype=tl.float32, is_pure=True, pack=1)
        return v.to(tl.float16).to(tl.float32)

    @triton.jit
    def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, eps, N: tl.constexpr, BLOCK: tl.constexpr, F16: tl.constexpr,
                         ASM: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        c = tl.arange(0, BLOCK)
        m = c < N
        x = tl.load(x_ptr + row * N + c, mask=m, other=0.0).to(tl.float32)
        var = tl.sum(x * x, 0) / N
        h = x * tl.math.rsqrt(var + eps)
        if F16:  # hidden.to(input_dtype)
            h = _to_f16_precision(h, ASM)
        w = tl.load(w_ptr + c, mask=m, other=0.0)
        tl.store(out_ptr + row * N + c, (w.to(tl.float32) * h).to(out_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _silu_mul_kernel(g_ptr, u_ptr, out_ptr, n, gs, us, BLOCK: tl.constexpr, F16: tl.constexpr,
                         ASM: tl.constexpr):
        # rows of n elements at row strides gs, us (the two halves of a fused gate-up output), out dense
        row = tl.program_id(0).to(tl.int64)
        i = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = i < n
        g = tl.load(g_ptr + row * gs + i, mask=m, other=0.0).to(tl.float32)
        s = g / (1.0 + tl.exp(-g))
        if F16:  # act_fn(gate) in the input dtype
            s = _to_f16_precision(s, ASM)
        u = tl.load(u_ptr + row * us + i, mask=m, other=0.0)
        tl.store(out_ptr + row * n + i, (s * u.to(tl.float32)).to(out_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _rope_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, H, T, xs_b, xs_h, xs_t, os_b, os_h, os_t, cs_b, cs_t,
                     D: tl.constexpr, TB: tl.constexpr, F16: tl.constexpr, ASM: tl.constexpr):
        # one program a (batch row, head) and TB tokens: out = x * cos + rotate_half(x) * sin, each
        # product and the sum rounded to x's dtype as torch's kernels round them
        pid = tl.program_id(0)
        b = pid // H
        h = pid % H
        t = tl.program_id(1) * TB + tl.arange(0, TB)
        tm = (t < T)[:, None]
        d = tl.arange(0, D)
        half: tl.constexpr = D // 2
        row = b.to(tl.int64) * xs_b + h.to(tl.int64) * xs_h + t[:, None].to(tl.int64) * xs_t
        x = tl.load(x_ptr + row + d[None, :], mask=tm, other=0.0)
        partner = tl.load(x_ptr + row + ((d + half) % D)[None, :], mask=tm, other=0.0)
        rot = tl.where((d < half)[None, :], -partner, partner).to(tl.float32)
        crow = b.to(tl.int64) * cs_b + t[:, None].to(tl.int64) * cs_t + d[None, :]
        cos = tl.load(cos_ptr + crow, mask=tm, other=0.0).to(x.dtype).to(tl.float32)
        sin = tl.load(sin_ptr + crow, mask=tm, other=0.0).to(x.dtype).to(tl.float32)
        a = _rn("mul", x.to(tl.float32), cos, ASM)
        r = _rn("mul", rot, sin, ASM)
        if F16:
            a = _to_f16_precision(a, ASM)
            r = _to_f16_precision(r, ASM)
        orow = b.to(tl.int64) * os_b + h.to(tl.int64) * os_h + t[:, None].to(tl.int64) * os_t
        tl.store(out_ptr + orow + d[None, :], _rn("add", a, r, ASM).to(x.dtype), mask=tm)


def _asm() -> bool:
    """Inline PTX for the explicit roundings (not under the CPU interpreter, which rounds as written)."""
    from kvbench.kernels.decode_attention import interpreting

    return not interpreting()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm: weight * (x / sqrt(mean(x**2) + eps)).to(x.dtype), one launch
    (fp16 and fp32; other dtypes take the torch ops)."""
    if x.dtype not in (torch.float16, torch.float32):
        h = x.float()
        return weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    n = x.shape[-1]
    xc = x.contiguous()
    out = torch.empty_like(xc)
    _rms_norm_kernel[(xc.numel() // n,)](xc, weight, out, eps, N=n, BLOCK=triton.next_power_of_2(n),
                                         F16=xc.dtype == torch.float16, ASM=_asm(), num_warps=8 if n >= 2048 else 4)
    return out


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as [rows, n] without a copy where its rows are evenly spaced with unit element stride (the
    halves of a fused gate-up output are), else a contiguous copy."""
    flat = x.reshape(-1, x.shape[-1])
    return flat if flat.stride(-1) == 1 else flat.contiguous()


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up with torch's roundings (silu in the input dtype, then the product), one launch
    (fp16 and fp32; other dtypes take the torch ops). gate and up may be strided views with unit
    element stride (the two halves of one GEMM's output); the result is contiguous."""
    if gate.dtype not in (torch.float16, torch.float32) or up.dtype != gate.dtype or gate.shape != up.shape:
        return torch.nn.functional.silu(gate) * up
    g, u = _rows(gate), _rows(up)
    rows, n = g.shape
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    if out.numel() == 0:
        return out
    block = min(1024, triton.next_power_of_2(n))
    _silu_mul_kernel[(rows, triton.cdiv(n, block))](g, u, out, n, g.stride(0), u.stride(0), BLOCK=block,
                                                    F16=g.dtype == torch.float16, ASM=_asm())
    return out


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`kvbench.rope.apply_rope` (x [B, H, T, D], any strides with unit stride on D; cos, sin
    [B, T, D]) in one launch; the output has x's layout, made dense where x has gaps."""
    b, h, t, d = x.shape
    if (x.stride(-1) != 1 or cos.stride(-1) != 1 or sin.stride(-1) != 1 or cos.stride() != sin.stride() or d & (d - 1)
            or x.dtype not in (torch.float16, torch.float32)):
        from kvbench.rope import apply_rope

        return apply_rope(x, cos, sin)
    # torch's layout for an elementwise result: dense, in x's dim order (so a view with gaps, q or k
    # of one stacked q/k/v GEMM's output, gives a dense [B, H, T, D] with T outside H, as the
    # separate projections' views are); a dense x keeps its strides exactly, size-1 dims included
    out = torch.empty_like(x)
    if _dense(x) and out.stride() != x.stride():
        out = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)
    tb = min(16, triton.next_power_of_2(t))
    _rope_kernel[(b * h, triton.cdiv(t, tb))](x, cos, sin, out, h, t, x.stride(0), x.stride(1), x.stride(2),
                                             out.stride(0), out.stride(1), out.stride(2), cos.stride(0),
                                             cos.stride(1), D=d, TB=tb, F16=x.dtype == torch.float16, ASM=_asm(),
                                             num_warps=1 if tb == 1 else 4)
    return out


def _dense(x: torch.Tensor) -> bool:
    """Whether x's elements fill its storage span without gaps or overlaps (some order of its dims
    is contiguous)."""
    expected = 1
    for stride, size in sorted((st, sz) for sz, st in zip(x.shape, x.stride()) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True
