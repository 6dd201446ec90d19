"""The log-sum-exp merge of decode partials in one Triton launch.

`reference.merge_partials` joins the partials of a decode read (the packed kernel's splits, then
the full-precision tokens' partials) with torch: a concatenation of each, a softmax, a NaN fix and
an einsum, then a cast to the model's dtype: five to seven launches a layer, each a few
microseconds of a decode step's graph for a few kilobytes of work. Here one program a query row
reads every split of up to two partials and writes the merged row in the output dtype.

Same arithmetic as the reference: weights exp(lse_s - max) / sum (exp(-inf) = 0 for empty splits),
a row with no keys at all gets zeros.
"""

from __future__ import annotations

import torch

from kvbench.kernels.reference import merge_partials

try:  # torchao-style guard: importable without triton
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None
    tl = None

MAX_SPLITS = 256  # more splits than this: the torch reference


if triton is not None:

    @triton.jit
    def _merge_kernel(o1_ptr, l1_ptr, o2_ptr, l2_ptr, out_ptr, S1, S2,
                      D: tl.constexpr, BS1: tl.constexpr, BS2: tl.constexpr, TWO: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        d = tl.arange(0, D)
        s1 = tl.arange(0, BS1)
        l1 = tl.load(l1_ptr + row * S1 + s1, mask=s1 < S1, other=float("-inf"))
        mx = tl.max(l1, 0)
        if TWO:
            s2 = tl.arange(0, BS2)
            l2 = tl.load(l2_ptr + row * S2 + s2, mask=s2 < S2, other=float("-inf"))
            mx = tl.maximum(mx, tl.max(l2, 0))
        ref = tl.where(mx > float("-inf"), mx, 0.0)
        w1 = tl.exp(l1 - ref)
        o1 = tl.load(o1_ptr + (row * S1 + s1)[:, None] * D + d[None, :], mask=(s1 < S1)[:, None], other=0.0)
        acc = tl.sum(w1[:, None] * o1, 0)
        tot = tl.sum(w1, 0)
        if TWO:
            w2 = tl.exp(l2 - ref)
            o2 = tl.load(o2_ptr + (row * S2 + s2)[:, None] * D + d[None, :], mask=(s2 < S2)[:, None], other=0.0)
            acc += tl.sum(w2[:, None] * o2, 0)
            tot += tl.sum(w2, 0)
        res = tl.where(tot > 0, acc / tl.where(tot > 0, tot, 1.0), 0.0)
        tl.store(out_ptr + row * D + d, res.to(out_ptr.dtype.element_ty))


def merge_partials_fused(parts, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`reference.merge_partials(parts)` cast to `dtype` (default float32) in one launch, for one
    or two partials [(o [B, Hq, S_i, D] fp32, lse [B, Hq, S_i]), ...] (CUDA, or CPU tensors under
    TRITON_INTERPRET=1); otherwise the torch reference."""
    from kvbench.kernels.decode_attention import interpreting

    dtype = dtype or torch.float32
    o1, l1 = parts[0]
    b, hq, _, d = o1.shape
    if (triton is None or len(parts) > 2 or d & (d - 1) or any(p[0].shape[2] > MAX_SPLITS for p in parts)
            or not (o1.is_cuda or interpreting())):
        return merge_partials(parts).to(dtype)
    o2, l2 = parts[1] if len(parts) == 2 else (o1, l1)
    out = torch.empty(b, hq, d, dtype=dtype, device=o1.device)
    s1, s2 = o1.shape[2], o2.shape[2]
    _merge_kernel[(b * hq,)](
        o1.float().contiguous(), l1.float().contiguous(), o2.float().contiguous(), l2.float().contiguous(), out,
        s1, s2, D=d, BS1=triton.next_power_of_2(s1), BS2=triton.next_power_of_2(s2), TWO=len(parts) == 2,
    )  # fmt: skip
    return out

