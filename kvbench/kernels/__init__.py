"""GPU kernels (Triton, and hand-laid CUDA compiled by NVRTC at first use), each beside a
plain-torch reference with the same contract.

Every module imports without triton or CUDA (triton is imported in a try); calling a kernel
without triton raises RuntimeError. Triton kernels run on CUDA tensors, or on CPU tensors under
TRITON_INTERPRET=1 (tests/test_kernels.py). The CUDA kernels run on CUDA only; each has a torch
emulation of its dataflow (same operands and index maps) that the CPU tests check against float64,
and `checks` compares kernel, emulation and reference on the GPU.

* `hadamard_triton`: Kronecker-structured Hadamard rotations of rows (used by kvbench.hadamard).
* `quant_write.quantize_pack_rows`: write path. (Hadamard-rotate,) quantize group-wise and pack
  rows in one pass, straight into a packed cache's slots (`dest`, `out`); bit-identical to
  kvbench.quant + kvbench.packing without rotation. Reference: `reference_quantize_pack_rows`.
  A decode step's token (one a row) goes through `quantize_pack_decode` (the slot lengths[b] and
  its position written in the kernel), KIVI's token through `kivi_ring_append` (into its ring
  slot, with the counters' advance) and its boundary group through `kivi_group_write` (straight
  from the ring window: keys as channel rows over the group, values as token rows).
* `rotatekv_write.quantize_pack_grouped`: RotateKV's key write. Quantize rotated keys in the
  groups of the calibrated permutation and pack each head group's row in rotated order, in one
  launch, bit-identical to the torch path (a decode token: the slot from the lengths and its
  position written in the kernel). Reference: `reference_quantize_pack_grouped`.
* `kv_write.write_token`: fp16's decode write (`decode.StaticKVCache`): a token's key, value and
  position into their slots in one launch, a plain copy (the torch path's three scatters did it in
  four).
* `side_stream`: a second CUDA stream for a decode step's independent launches (the
  full-precision partial, the value writes), a parallel branch of a captured graph.
* `decode_attention`: fused decode attention over packed caches, split over the context with a
  log-sum-exp merge, GQA in the M dimension of tl.dot:
  - `decode_per_token(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, lengths, scaling,
    bits=, group_size=, integer_zero=, max_len=)`: rtn (keys after RoPE) and quarot (pass H.q,
    apply `rotate_partials` to the outputs);
  - `decode_kivi(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, nq, scaling, ...)`;
  - `decode_rotatekv(q, k_codes, k_scale, k_zero, gid, v_codes, v_scale, v_zero, lengths,
    positions, cos, sin, scaling, bits=, group_size=, head_group=, pre_rope=)`;
  each returns partials (o [B, Hq, S, D] fp32, lse [B, Hq, S]); `merge.merge_partials_fused`
  (one launch; reference `reference.merge_partials`) merges them with the full-precision tokens'
  partials (`fp_partial.fp_partial_fused`: one launch for sinks or KIVI's window, `ring=` for the
  window's validity; reference `reference.fp_partial`).
* `decode_mha.decode_per_token_mha`: the per-token read for one query head per KV head (MHA):
  by default (2-bit, head_dim 128, where NVRTC works) two hand-laid CUDA passes on the tensor
  cores (`decode_mha_cuda`: `token_scores_cuda` writes the scores and each 16-token tile's
  maximum, `values_cuda` reads the values; quarot's Hadamard rotations inside them with
  `hadamard=True`), else one Triton kernel on CUDA cores (codes unpacked in place, next tile's
  loads in flight, lazy softmax rescaling). `decode_per_token` dispatches to it where
  `decode_mha.supports` says so, and `packed_decode` uses it for RotateKV with post-RoPE keys, a
  1-head Hadamard and no reordering.
* `decode_rotatekv_mha.decode_rotatekv_mha`: RotateKV's read for one query head per KV head when a
  byte holds one channel of every head of the group (4 heads at 2 bits): one byte load a tile,
  the head mix in-thread, scales gathered by warp shuffle; pre-RoPE keys through one H_{D/2}
  tensor-core product a channel half and head. By default in two passes: the scores to a scratch
  row (`rotatekv_scores_cuda`, hand-laid CUDA, where it applies: pre-RoPE keys, or post-RoPE keys
  with the group's Hadamard folded into the query operand; else Triton), then the values
  with the exact maximum (`values_cuda`, else `decode_mha.values_from_scores`); `two_pass=False`
  is the fused Triton kernel with an online softmax (`stack_heads`: the group's heads as the rows
  of one product). `packed_decode` uses it for those shapes.
* `decode_kivi_mha.decode_kivi_mha`: KIVI's read for one query head per KV head, in two passes:
  by default both hand-laid CUDA (`kivi_scores_cuda`: 8 groups a warp on the tensor cores, then
  `values_cuda` with float zeros), else a Triton kernel with both passes (keys with in-thread
  channel sums, scores to an L2-resident scratch row; values as decode_mha with the exact
  maximum); `decode_kivi` dispatches to it.
* `nvrtc`, `cuda_prelude`: compiling the CUDA sources at first use (cached per shape), and the
  inline-PTX helpers they share.
  - `packed_decode(cache, q, scaling)`: the whole decode attention of a
    `kvbench.packed_cache` cache (what `cache.attend` calls on CUDA for one query per row).
* `reference`: the plain-torch references (`ref_decode_*`, `fp_partial`, `merge_partials`,
  `sdpa_decode`).
* `checks`: correctness checks shared by the tests (interpreter, small shapes) and
  benchmarks/kernels_gpu.py (GPU shapes), with the stated error bounds.

Using a packed cache on the GPU (what a decode-latency task does):

    method = RotateKV(mode="packed")            # or RTN / QuaRot / KIVI(mode="packed")
    session = KVSession(method, geometry)       # one packed cache per layer
    for c in session.caches: c.reserve(prompt_len + new_tokens)   # preallocate: no growth
    ... prefill, then decode steps; cache.attend uses packed_decode when q is on CUDA
    cache.nbytes()   # bytes it holds (allocated capacity); cache.used_nbytes(): filled slots

CUDA graphs: for rtn, quarot, rotatekv and kivi a decode step (append + attend) does no host sync
once capacity is reserved (lengths live on the device, the split size comes from the host-side
bound `cache.used`, matrices are cached on the device after the first call, the RoPE table grows
from a host bound while capturing). KIVI's decode append is device-side too (every row quantizes
the group at its boundary, rows that cross it keep the result; `graph_safe = True`); its prefill
append syncs. Warm up once before capturing. A graph keeps its grid, so
while capturing the kernels cover the whole reserved capacity (masked tiles past each row's
length cost ALU, not memory): capture per context bucket for the fastest replays. The kernels
specialize on the tiles per split (`decode_attention.split_plan`: a power of two eagerly, so a
growing context recompiles O(log context) times; the exact count while capturing).
"""
