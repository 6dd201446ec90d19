"""fp16's decode write in one launch: a token's key, value and position into their slots.

`kvbench.decode.StaticKVCache` stores a decode token at slot position + left padding of its row.
As three `scatter_` calls and an add that is four launches a layer (~0.4 ms of a captured Llama-2-7B
step at batch 8, more than the baseline's RMSNorms); here it is one, so the fp16 baseline is not
slowed by bookkeeping the compressed caches have already fused away. A plain copy: the stored
values are the torch path's exactly.
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
    def _write_token_kernel(k_ptr, v_ptr, tok_pos_ptr, pad_ptr, kc_ptr, vc_ptr, slot_pos_ptr,
                            H, cap, ks_b, ks_h, vs_b, vs_h, D: tl.constexpr):
        # one program a (row, KV head): row b's token goes to slot positions[b] + pad[b]
        b = tl.program_id(0)
        h = tl.program_id(1)
        position = tl.load(tok_pos_ptr + b)
        slot = position + tl.load(pad_ptr + b)
        if (slot >= 0) & (slot < cap):
            d = tl.arange(0, D)
            dst = ((b * H + h).to(tl.int64) * cap + slot) * D + d
            k = tl.load(k_ptr + b.to(tl.int64) * ks_b + h * ks_h + d)
            v = tl.load(v_ptr + b.to(tl.int64) * vs_b + h * vs_h + d)
            tl.store(kc_ptr + dst, k.to(kc_ptr.dtype.element_ty))
            tl.store(vc_ptr + dst, v.to(vc_ptr.dtype.element_ty))
            if h == 0:
                tl.store(slot_pos_ptr + b.to(tl.int64) * cap + slot, position)


def write_token(k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, pad: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor, slot_positions: torch.Tensor) -> None:
    """k, v [B, H, 1, D] (any strides, unit channel stride) into k_cache, v_cache [B, H, cap, D]
    (contiguous) at slot positions[b] + pad[b] of row b, and the position into slot_positions
    [B, cap] (int64); a slot outside [0, cap) is not written. positions, pad: [B, 1] int64."""
    if triton is None:
        raise RuntimeError("kv_write.write_token needs triton")
    b, h, t, d = k.shape
    cap = k_cache.shape[2]
    if (t != 1 or v.shape != k.shape or k_cache.shape != (b, h, cap, d) or v_cache.shape != k_cache.shape
            or not (k_cache.is_contiguous() and v_cache.is_contiguous() and slot_positions.is_contiguous())
            or slot_positions.shape != (b, cap) or slot_positions.dtype != torch.int64
            or positions.numel() != b or pad.numel() != b or k.stride(-1) != 1 or v.stride(-1) != 1 or d & (d - 1)):
        raise ValueError("kv_write.write_token: one token a row [B, H, 1, D] (D a power of two, unit channel "
                         "stride), contiguous caches [B, H, cap, D] and slot positions [B, cap] int64, positions "
                         "and pad [B, 1]")
    _write_token_kernel[(b, h)](k, v, positions.reshape(b).contiguous(), pad.reshape(b).contiguous(), k_cache,
                                v_cache, slot_positions, h, cap, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                                D=d, num_warps=1)
