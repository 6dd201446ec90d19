"""Packed-mode storage: caches that hold real bit-packed codes, fp16 scales and zero points.

One module (not a package) so that it installs with the `kvbench` package as it is. The caches
here are the `mode: packed` counterparts of the simulated caches of rtn, kivi, quarot and
rotatekv. They store what a GPU kernel reads and dequantize it on read with exactly the
arithmetic of `kvbench.quant.dequantize`, so attention sees bit-identical keys and values to the
simulated mode (tests/test_packed_cache.py checks that, tensor for tensor).

Layout (all tensors preallocated with a slot capacity that grows by doubling):

* Rows are compacted: row b's stored tokens sit in slots 0 .. lengths[b] - 1, in the order they
  arrived; left padding (position -1) takes no slot. `positions` [B, cap] int32 holds each
  slot's position (-1 past the end). `lengths` [B] lives on the device (no host sync to append);
  the host keeps `used`, an upper bound on max(lengths) (the sum of the T of every append), and
  reads go over slots [0, used).
* Per-token quantized tensors (`PerTokenStore`): codes [B, S, cap, n * bits / 8] uint8 in the
  `kvbench.packing` layout (plane layout for 2/4/8 bits: code i of a row of n codes is in byte
  i % (n*bits/8), bits (i // (n*bits/8)) * bits), scale and zero [B, S, cap, n / G] fp16. S is
  the number of "streams": KV heads for rtn / quarot / V of every method, head groups for
  RotateKV's keys (a row of head_group * head_dim codes in *rotated* channel order, i.e. the
  calibrated permutation undone on the codes, see `RotateKVPackedCache`).
* Full-precision tokens (RotateKV's attention sinks) sit in a separate fp store
  [B, H_kv, cap_fp, D] of the model dtype, keys after RoPE, with their own lengths/positions.
* KIVI keeps quantized key groups channel-major ([B, H, groups, D, G * bits / 8]: the G tokens
  of one channel packed together, scale/zero per (group, channel)), values per token, and the
  full-precision window as a ring buffer of W = residual + group_size slots indexed by
  position % W (no shifting when the window moves). Its decode append runs on the device with
  no host sync (CUDA-graph capturable); its prefill append decides evictions on the host.

`nbytes()` counts every tensor the cache holds at its allocated capacity (codes, scales,
zeros, positions, lengths, fp tokens, rope tables); `used_nbytes()` counts only filled slots.
`reserve(tokens)` preallocates, so that decode does not grow the tensors (CUDA-graph friendly).

Reads: `attend` dequantizes what is stored and runs `kvbench.simulated.attention` (any T, any
device). On CUDA, with triton importable and one decode query per row, it calls the fused decode
kernels of `kvbench.kernels.decode_attention` instead (set KVBENCH_PACKED_KERNELS=0 to keep the
torch path); `kernel_inputs()` of each cache returns the tensors those kernels take.
"""

from __future__ import annotations

import os

import torch

from kvbench.hadamard import hadamard_transform, inverse_hadamard_transform
from kvbench.method import LayerCache, NewTokens
from kvbench.packing import pack, unpack
from kvbench.quant import QuantSpec, Quantized, dequantize, quantize
from kvbench.rope import apply_rope
from kvbench.simulated import attention, causal_mask

_MIN_CAPACITY = 16


def _capacity_for(n: int, current: int) -> int:
    cap = max(current, _MIN_CAPACITY)
    while cap < n:
        cap *= 2
    return cap


def _grow(t: torch.Tensor, cap: int, dim: int, fill=0) -> torch.Tensor:
    """t with dim `dim` extended to `cap` (new entries = fill)."""
    if t.shape[dim] >= cap:
        return t
    shape = list(t.shape)
    shape[dim] = cap - t.shape[dim]
    return torch.cat([t, torch.full(shape, fill, dtype=t.dtype, device=t.device)], dim)


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def slot_destinations(mask: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """[B, T] slot of each new token: masked tokens go to lengths[b], lengths[b] + 1, ... in
    order; the others to the slots after those (they are scratch: never counted as stored).
    Every destination is < lengths[b] + T. No host sync."""
    m = mask.long()
    c = m.cumsum(1)
    n = c[:, -1:]
    other = (1 - m).cumsum(1)
    base = lengths[:, None]
    return torch.where(mask, base + c - 1, base + n + other - 1)


def kernels_enabled(x: torch.Tensor) -> bool:
    """Whether the Triton/CUDA write and read paths run for tensors like x: on CUDA, with triton, unless
    KVBENCH_PACKED_KERNELS=0 (the torch paths then, for A/B runs and debugging)."""
    if not x.is_cuda or os.environ.get("KVBENCH_PACKED_KERNELS", "1") == "0":
        return False
    from kvbench.kernels import decode_attention

    return decode_attention.is_available()


# --------------------------------------------------------------------------------------------
# Storage building blocks


class PerTokenStore:
    """Per-token quantized rows: codes [B, S, cap, n*bits/8] + fp16 scale/zero [B, Ss, cap, ngs].

    Usually Ss = S and ngs = n / G (each stream's groups). RotateKV's keys use S head groups of
    codes but Ss = 1 with all C / G groups of a token side by side (its groups follow the
    permuted channel order, not the head groups).
    """

    def __init__(self, spec: QuantSpec, streams: int, row: int, scale_streams: int | None = None):
        self.spec, self.streams, self.row = spec, streams, row
        self.scale_streams = streams if scale_streams is None else scale_streams
        self.ng = streams * row // spec.group_size // self.scale_streams
        self.codes = self.scale = self.zero = None

    @property
    def row_bytes(self) -> int:
        return self.row * self.spec.bits // 8

    def ensure(self, batch: int, cap: int, device) -> None:
        if self.codes is None:
            self.codes = torch.zeros(batch, self.streams, cap, self.row_bytes, dtype=torch.uint8, device=device)
            self.scale = torch.zeros(batch, self.scale_streams, cap, self.ng, dtype=torch.float16, device=device)
            self.zero = torch.zeros_like(self.scale)
        else:
            self.codes = _grow(self.codes, cap, 2)
            self.scale = _grow(self.scale, cap, 2)
            self.zero = _grow(self.zero, cap, 2)

    def write(self, q: Quantized, dest: torch.Tensor) -> None:
        """q: codes [B, S, T, n], scale/zero [B, Ss, T, ngs]; dest [B, T] slots."""
        b_idx = torch.arange(dest.shape[0], device=dest.device)[:, None]
        # codes[b_idx, :, dest] is [B, T, S, bytes] (advanced indices first).
        self.codes[b_idx, :, dest] = pack(q.codes, self.spec.bits, check=False).transpose(1, 2)
        self.scale[b_idx, :, dest] = q.scale.transpose(1, 2)
        self.zero[b_idx, :, dest] = q.zero.transpose(1, 2)

    def read(self, slots: int) -> Quantized:
        return Quantized(
            codes=unpack(self.codes[:, :, :slots], self.spec.bits, self.row),
            scale=self.scale[:, :, :slots],
            zero=self.zero[:, :, :slots],
        )

    def nbytes(self) -> int:
        return _nbytes(self.codes, self.scale, self.zero)

    def used_nbytes(self, slots: int) -> int:
        if self.codes is None:
            return 0
        per_slot = self.streams * self.row_bytes + 4 * self.scale_streams * self.ng
        return self.codes.shape[0] * slots * per_slot


class FullPrecisionStore:
    """Tokens kept exactly: k (after RoPE) and v [B, H, cap, D], compacted per row."""

    def __init__(self):
        self.k = self.v = self.positions = self.lengths = None
        self.used = 0
        self._valid = None  # positions >= 0 of the used slots, until the next append

    def append(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor) -> None:
        b, h, t, d = k.shape
        if self.k is None:
            cap = _capacity_for(t, 0)
            self.k = torch.zeros(b, h, cap, d, dtype=k.dtype, device=k.device)
            self.v = torch.zeros(b, h, cap, d, dtype=v.dtype, device=v.device)
            self.positions = torch.full((b, cap), -1, dtype=torch.int32, device=k.device)
            self.lengths = torch.zeros(b, dtype=torch.int64, device=k.device)
        self.used += t
        cap = _capacity_for(self.used, self.k.shape[2])
        self.k, self.v = _grow(self.k, cap, 2), _grow(self.v, cap, 2)
        self.positions = _grow(self.positions, cap, 1, -1)
        dest = slot_destinations(mask, self.lengths)
        b_idx = torch.arange(b, device=k.device)[:, None]
        self.k[b_idx, :, dest] = k.transpose(1, 2)
        self.v[b_idx, :, dest] = v.transpose(1, 2)
        self.positions[b_idx, dest] = torch.where(mask, positions, -1).to(torch.int32)
        self.lengths += mask.sum(1)
        self._valid = None

    def view(self):
        """(k, v, positions) over the used slots, or None when empty."""
        if self.k is None or self.used == 0:
            return None
        s = self.used
        return self.k[:, :, :s], self.v[:, :, :s], self.positions[:, :s]

    def valid(self) -> torch.Tensor:
        """[B, used] bool: the used slots holding a token. Kept until the next append: only a
        prefill appends here (RotateKV's sinks), so every decode step's read of every layer would
        otherwise compute the same mask again."""
        if self._valid is None:
            self._valid = self.positions[:, : self.used] >= 0
        return self._valid

    def nbytes(self) -> int:
        return _nbytes(self.k, self.v, self.positions, self.lengths)


class RopeTable:
    """cos/sin rows by position, as the model computed them (so RoPE on read is bit-identical).

    Shared by the whole batch: [max position + 1, D] in the dtype of the model's tables.
    """

    def __init__(self):
        self.cos = self.sin = None

    def update(self, new: NewTokens, bound: int | None = None) -> None:
        """Store the new tokens' rows. `bound` (> every position) avoids the host sync of
        reading max(position); it is used while a CUDA graph is being captured."""
        pos = new.positions
        capturing = pos.is_cuda and torch.cuda.is_current_stream_capturing()
        if capturing and bound is not None:
            top = bound
        else:
            top = int(pos.max()) + 1 if pos.numel() else 0  # one host sync per append
        if self.cos is None:
            d = new.cos.shape[-1]
            cap = _capacity_for(top, 0)
            self.cos = torch.zeros(cap, d, dtype=new.cos.dtype, device=new.cos.device)
            self.sin = torch.zeros_like(self.cos)
        cap = _capacity_for(top, self.cos.shape[0])
        self.cos, self.sin = _grow(self.cos, cap, 0), _grow(self.sin, cap, 0)
        valid = new.valid
        idx = pos[valid]
        self.cos[idx] = new.cos[valid]
        self.sin[idx] = new.sin[valid]

    def lookup(self, positions: torch.Tensor):
        p = positions.clamp_min(0).long()
        return self.cos[p], self.sin[p]

    def nbytes(self) -> int:
        return _nbytes(self.cos, self.sin)


def share_rope_tables(caches: list) -> None:
    """Give every layer's per-token packed cache that keeps a RoPE table the first one's table: a
    model applies one RoPE (`KVGeometry.rope_theta`) at every layer, so the rows are the same. The
    first cache (layer 0, which appends first in every forward) writes the new tokens' rows and
    counts the table's bytes; the others only read it. Saves the table's update launches of every
    other layer each step, and its bytes (4 MB a layer at 8192 positions and head_dim 128)."""
    owners = [c for c in caches if isinstance(c, PackedPerTokenCache) and c.rope is not None]
    for c in owners[1:]:
        c.rope, c.owns_rope = owners[0].rope, False


# --------------------------------------------------------------------------------------------
# Per-token methods: rtn, quarot, rotatekv


class PackedPerTokenCache(LayerCache):
    """Base of the per-token packed caches. Subclasses define how new tokens become codes
    (`quantize_new`) and how stored codes become attention's keys and values (`dequantize_stored`).
    """

    def __init__(self, spec: QuantSpec, k_streams: int, k_row: int, v_streams: int, v_row: int,
                 needs_rope_table: bool = False, capacity: int = 0, k_scale_streams: int | None = None):
        self.spec = spec
        self.kstore = PerTokenStore(spec, k_streams, k_row, k_scale_streams)
        self.vstore = PerTokenStore(spec, v_streams, v_row)
        self.fp = FullPrecisionStore()
        self.rope = RopeTable() if needs_rope_table else None
        self.owns_rope = True  # False when another layer's cache keeps the table (`share_rope_tables`)
        self.lengths: torch.Tensor | None = None  # [B] int64, device
        self.positions: torch.Tensor | None = None  # [B, cap] int32
        self.used = 0  # host-side upper bound of max(lengths)
        self.capacity = capacity
        self.dtype: torch.dtype | None = None
        self._chunks: list = []  # (dest, mask) of every append, for replay_chunks
        self._replayed: tuple = (0, None, None)  # (chunks replayed, k, v) of the last `stored_kv`

    # -- storage -------------------------------------------------------------------------

    def reserve(self, tokens: int) -> None:
        """Preallocate room for `tokens` slots per row (applied at, or right after, allocation)."""
        self.capacity = max(self.capacity, tokens)
        if self.lengths is not None:
            self._ensure(self.lengths.shape[0], self.lengths.device)

    def _ensure(self, batch: int, device) -> None:
        cap = _capacity_for(max(self.used, self.capacity), 0 if self.positions is None else self.positions.shape[1])
        if self.positions is None:
            self.positions = torch.full((batch, cap), -1, dtype=torch.int32, device=device)
            self.lengths = torch.zeros(batch, dtype=torch.int64, device=device)
        else:
            self.positions = _grow(self.positions, cap, 1, -1)
        self.kstore.ensure(batch, cap, device)
        self.vstore.ensure(batch, cap, device)

    def quantize_new(self, new: NewTokens) -> tuple[Quantized, Quantized]:
        raise NotImplementedError

    #: (key rows, rotate) for the fused Triton write, or None when this cache has none.
    def fused_write_inputs(self, new: NewTokens):
        return None

    def _write_fused(self, new: NewTokens, dest: torch.Tensor) -> bool:
        """On CUDA with triton: (rotate,) quantize and pack K and V straight into their slots
        with kvbench.kernels.quant_write (one launch each)."""
        inputs = self.fused_write_inputs(new)
        if inputs is None or not kernels_enabled(new.k) or self.spec.bits not in (2, 4, 8):
            return False
        from kvbench.kernels.quant_write import quantize_pack_rows

        keys, rotate = inputs
        b, h, t, d = keys.shape
        if d & (d - 1):
            return False
        spec = self.spec
        for x, store in ((keys, self.kstore), (new.v, self.vstore)):
            cap = store.codes.shape[2]
            rows = ((torch.arange(b, device=dest.device)[:, None, None] * store.streams
                     + torch.arange(h, device=dest.device)[None, :, None]) * cap + dest[:, None, :]).reshape(-1)
            out = (store.codes.view(-1, store.row_bytes), store.scale.view(-1, store.ng), store.zero.view(-1, store.ng))
            quantize_pack_rows(x.reshape(-1, d), bits=spec.bits, group_size=spec.group_size,
                               clip_ratio=spec.clip_ratio, integer_zero=spec.integer_zero, rotate=rotate,
                               dest=rows, out=out)
        return True

    def _append_decode_fused(self, new: NewTokens, valid: torch.Tensor) -> bool:
        """One token a row on CUDA with triton (the fused write's gating): kvbench.kernels.quant_write
        writes keys (and each slot's position) and values at slot lengths[b] in one launch each,
        then the lengths advance. Four launches where the general path takes about thirty: in a
        captured decode step each small launch costs a few microseconds, every layer."""
        inputs = self.fused_write_inputs(new)
        if inputs is None or not kernels_enabled(new.k) or self.spec.bits not in (2, 4, 8):
            return False
        from kvbench.kernels.quant_write import quantize_pack_decode

        keys, rotate = inputs
        d = keys.shape[-1]
        if d & (d - 1):
            return False
        if self.replay_chunks:  # (before the lengths move)
            self._chunks.append((self.lengths[:, None].clone(), valid))
        spec = self.spec
        for x, store, slot_positions in ((keys, self.kstore, self.positions), (new.v, self.vstore, None)):
            quantize_pack_decode(x, self.lengths, new.positions, (store.codes, store.scale, store.zero),
                                 bits=spec.bits, group_size=spec.group_size, clip_ratio=spec.clip_ratio,
                                 integer_zero=spec.integer_zero, rotate=rotate, slot_positions=slot_positions)
        self.lengths += valid[:, 0]
        return True

    def dequantize_stored(self, kq: Quantized, vq: Quantized, positions: torch.Tensor):
        raise NotImplementedError

    def exact_tokens(self, new: NewTokens) -> torch.Tensor | None:
        return None

    def append(self, new: NewTokens) -> None:
        b, _, t, _ = new.k.shape
        self.dtype = new.k.dtype
        if self.rope is not None and self.owns_rope:
            self.rope.update(new, bound=max(self.used + t, self.capacity))
        valid = new.valid
        exact = self.exact_tokens(new)
        to_quant = valid if exact is None else valid & ~exact
        self.used += t
        self._ensure(b, new.k.device)
        if t == 1 and exact is None:
            # a decode step: slot_destinations reduces to each row's length (a padding token's
            # scratch slot too), so no slot arithmetic; rtn and quarot write in two launches
            if self._append_decode_fused(new, valid):
                return
            dest = self.lengths[:, None].clone()
        else:
            dest = slot_destinations(to_quant, self.lengths)
        if not self._write_fused(new, dest):
            kq, vq = self.quantize_new(new)
            self.kstore.write(kq, dest)
            self.vstore.write(vq, dest)
        stored = torch.where(to_quant, new.positions, -1).to(torch.int32)
        if t == 1:  # one slot a row: a scatter and an add (no arange, index_put or reduction)
            self.positions.scatter_(1, dest, stored)
            self.lengths += to_quant[:, 0]
        else:
            self.positions[torch.arange(b, device=dest.device)[:, None], dest] = stored
            self.lengths += to_quant.sum(1)
        if self.replay_chunks:
            self._chunks.append((dest, to_quant))
        if exact is not None:
            self.fp.append(new.k, new.v, new.positions, exact)

    # -- reads ---------------------------------------------------------------------------

    #: Dequantize in the chunks the tokens arrived in (see `stored_kv`).
    replay_chunks = False

    def stored_kv(self):
        """(k, v, positions) of the quantized part as attention sees it: [B, H, used, D].

        Methods whose read applies a matmul (the inverse Hadamard of quarot and rotatekv) set
        `replay_chunks`: the stored codes are then dequantized append by append, in tensors of
        the very shapes the simulated cache transformed, because a CPU GEMM's result for a row
        depends on how many rows it is given; so the keys and values come out bit-identical to
        the simulated mode's. (The GPU kernels read the packed tensors directly.)
        """
        s = self.used
        pos = self.positions[:, :s]
        if not self.replay_chunks:
            k, v = self.dequantize_stored(self.kstore.read(s), self.vstore.read(s), pos)
            return k, v, pos
        # Each chunk's stored slots never change once written, so the chunks replayed by an earlier
        # call are kept and only the new ones are dequantized: one decode step replayed every
        # earlier step again (300 steps of one layer took 11.6 s on the CPU).
        done, k, v = self._replayed
        if k is not None and k.shape[2] < s:
            k = torch.cat([k, k.new_zeros(*k.shape[:2], s - k.shape[2], k.shape[-1])], 2)
            v = torch.cat([v, v.new_zeros(*v.shape[:2], s - v.shape[2], v.shape[-1])], 2)
        for dest, mask in self._chunks[done:]:
            b_idx = torch.arange(dest.shape[0], device=dest.device)[:, None]
            ks, vs = self.kstore, self.vstore
            kq = Quantized(unpack(ks.codes[b_idx, :, dest].transpose(1, 2), ks.spec.bits, ks.row),
                           ks.scale[b_idx, :, dest].transpose(1, 2), ks.zero[b_idx, :, dest].transpose(1, 2))
            vq = Quantized(unpack(vs.codes[b_idx, :, dest].transpose(1, 2), vs.spec.bits, vs.row),
                           vs.scale[b_idx, :, dest].transpose(1, 2), vs.zero[b_idx, :, dest].transpose(1, 2))
            kc, vc = self.dequantize_stored(kq, vq, self.positions[b_idx, dest])
            if k is None:
                k = kc.new_zeros(*kc.shape[:2], s, kc.shape[-1])
                v = vc.new_zeros(*vc.shape[:2], s, vc.shape[-1])
            # Only the chunk's stored tokens: its scratch slots may hold later tokens by now.
            d = torch.where(mask, dest, s)  # s: a dump column
            kk = torch.cat([k, k[:, :, :1]], 2)
            vv = torch.cat([v, v[:, :, :1]], 2)
            kk[b_idx, :, d] = kc.transpose(1, 2)
            vv[b_idx, :, d] = vc.transpose(1, 2)
            k, v = kk[:, :, :s], vv[:, :, :s]
        self._replayed = (len(self._chunks), k, v)
        return k, v, pos

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(k, v) [B, H, used, D] of every stored slot dequantized at once, every call: the read of
        the unfused peer row (`decode_latency`: dequantize the whole cache, then SDPA). Not
        `stored_kv`, whose replay keeps earlier appends and, after a random fill (which writes the
        stores directly), knows only the decode steps' appends."""
        s = self.used
        return self.dequantize_stored(self.kstore.read(s), self.vstore.read(s), self.positions[:, :s])

    def attend(self, q: torch.Tensor, q_positions: torch.Tensor, scaling: float) -> torch.Tensor:
        if q.shape[2] == 1 and kernels_enabled(q) and self.kernel_supported():
            from kvbench.kernels import decode_attention

            return decode_attention.packed_decode(self, q, scaling)
        k, v, pos = self.stored_kv()
        fp = self.fp.view()
        if fp is not None:
            k = torch.cat([k, fp[0].to(k.dtype)], 2)
            v = torch.cat([v, fp[1].to(v.dtype)], 2)
            pos = torch.cat([pos, fp[2]], 1)
            # Keys in position order, scratch slots dropped: the same key sequence as the
            # simulated cache for unpadded rows, so attention takes the same (causal) path.
            key = torch.where(pos >= 0, pos, torch.iinfo(torch.int32).max)
            order = torch.argsort(key, dim=1, stable=True)[:, : int((pos >= 0).sum(1).max())]
            idx = order[:, None, :, None]
            k = k.gather(2, idx.expand(*k.shape[:2], -1, k.shape[-1]))
            v = v.gather(2, idx.expand(*v.shape[:2], -1, v.shape[-1]))
            pos = pos.gather(1, order)
        return attention(q, k.to(q.dtype), v.to(q.dtype), q_positions, pos.long(), scaling)

    def kernel_supported(self) -> bool:
        return False

    def nbytes(self) -> int:
        extra = self.rope.nbytes() if self.rope is not None and self.owns_rope else 0
        return (self.kstore.nbytes() + self.vstore.nbytes() + self.fp.nbytes()
                + _nbytes(self.positions, self.lengths) + extra)

    def used_nbytes(self) -> int:
        """Bytes of the filled slots only (codes, scales, zeros, positions, fp tokens)."""
        if self.positions is None:
            return 0
        fp = 0
        if self.fp.k is not None:
            b, h, _, d = self.fp.k.shape
            fp = self.fp.used * b * (2 * h * d * self.fp.k.element_size() + 4)
        return (self.kstore.used_nbytes(self.used) + self.vstore.used_nbytes(self.used)
                + self.positions.shape[0] * self.used * 4 + fp)


class RTNPackedCache(PackedPerTokenCache):
    """rtn: per-token groups along head_dim; keys after RoPE, or before (RoPE on read)."""

    def __init__(self, spec: QuantSpec, pre_rope: bool, num_kv_heads: int, head_dim: int, capacity: int = 0):
        super().__init__(spec, num_kv_heads, head_dim, num_kv_heads, head_dim, needs_rope_table=pre_rope,
                         capacity=capacity)
        self.pre_rope = pre_rope

    def quantize_new(self, new):
        return quantize(new.k_pre if self.pre_rope else new.k, self.spec), quantize(new.v, self.spec)

    def fused_write_inputs(self, new):
        return (new.k_pre if self.pre_rope else new.k), False

    def dequantize_stored(self, kq, vq, positions):
        k = dequantize(kq, self.spec, dtype=self.dtype)
        if self.pre_rope:
            cos, sin = self.rope.lookup(positions)
            k = apply_rope(k, cos, sin)
        return k, dequantize(vq, self.spec, dtype=self.dtype)

    def kernel_supported(self) -> bool:
        return self.spec.bits in (2, 4, 8) and not self.pre_rope


class QuaRotPackedCache(PackedPerTokenCache):
    """quarot: codes of H.k (after RoPE) and H.v per head; read rotates back (the kernel rotates
    the query by H instead, and the output back by H)."""

    replay_chunks = True

    def __init__(self, spec: QuantSpec, num_kv_heads: int, head_dim: int, capacity: int = 0):
        super().__init__(spec, num_kv_heads, head_dim, num_kv_heads, head_dim, capacity=capacity)

    def quantize_new(self, new):
        return quantize(hadamard_transform(new.k), self.spec), quantize(hadamard_transform(new.v), self.spec)

    def fused_write_inputs(self, new):
        return new.k, True

    def dequantize_stored(self, kq, vq, positions):
        k = inverse_hadamard_transform(dequantize(kq, self.spec, dtype=self.dtype))
        v = inverse_hadamard_transform(dequantize(vq, self.spec, dtype=self.dtype))
        return k, v

    def kernel_supported(self) -> bool:
        d = self.kstore.row
        return self.spec.bits in (2, 4, 8) and d & (d - 1) == 0


class RotateKVPackedCache(PackedPerTokenCache):
    """rotatekv: keys rotated by the grouped-head Hadamard (before or after RoPE) and permuted by
    the calibrated channel order, quantized in groups of the *permuted* order, exactly as the
    simulated cache does. The codes are stored back in rotated (unpermuted) order, one row of
    head_group * head_dim codes per head group, so a kernel reads each head group's channels
    contiguously; `key_group_of_channel` [C] maps each rotated channel to the quantization
    group (index into the token's C / G scales) it was quantized in. Key scales/zeros are kept
    per token: [B, 1, cap, C / G]. Values: per-head Hadamard, per-token groups (G must divide
    head_dim in packed mode). Sinks: full-precision tokens in the fp store.
    """

    replay_chunks = True

    def __init__(self, method, layer_idx: int, geometry, capacity: int = 0):
        from kvbench.rotation import inverse_permutation

        g = geometry
        self.m, self.g, self.layer_idx = method, g, layer_idx
        spec = method.spec(g)
        self.head_group = method.resolved_head_group(g)
        self.key_block = self.head_group * g.head_dim
        self.num_groups = g.num_kv_heads // self.head_group
        if g.head_dim % spec.group_size:
            from kvbench.params import ParamError

            raise ParamError("group_size", f"packed rotatekv needs group_size to divide head_dim {g.head_dim} "
                             f"(value groups per head), got {spec.group_size}")
        super().__init__(spec, self.num_groups, self.key_block, g.num_kv_heads, g.head_dim,
                         needs_rope_table=method.pre_rope, capacity=capacity, k_scale_streams=1)
        self.perm = method.permutation(layer_idx, g, "cpu")
        self.inv = inverse_permutation(self.perm)
        # stored channel i = rotated channel perm[i]; group of stored i is i // G.
        self.key_group_of_channel = (self.inv // spec.group_size).to(torch.int32)  # [C]
        self._dev: dict = {}

    def _gid_on(self, device) -> torch.Tensor:
        key = "gid:" + str(device)
        if key not in self._dev:
            self._dev[key] = self.key_group_of_channel.to(device)
        return self._dev[key]

    def _on(self, device):
        key = str(device)
        if key not in self._dev:
            self._dev[key] = (self.perm.to(device), self.inv.to(device))
        return self._dev[key]

    def _fused_write_tables(self, dev, b: int):
        """Device tables of the fused writes, built once per (device, batch, capacity): the key
        kernel's channel order and group map, and the first flattened value row of each (batch row,
        head); None where the kernels do not take this layout."""
        from kvbench.kernels import rotatekv_write as rw

        g, spec, ks, vs = self.g, self.spec, self.kstore, self.vstore
        c, d = g.kv_channels, g.head_dim
        if d & (d - 1) or not rw.supports(c, c // spec.group_size, self.key_block, spec.bits):
            return None
        key = ("fused", str(dev), b, ks.codes.shape[2], vs.codes.shape[2])
        if self._dev.get("fused") is None or self._dev["fused"][0] != key:
            vbase = (torch.arange(b, device=dev)[:, None] * vs.streams + torch.arange(vs.streams, device=dev))
            self._dev["fused"] = (key, self.perm.to(device=dev, dtype=torch.int32), self.key_group_of_channel.to(dev),
                                  (vbase * vs.codes.shape[2])[:, :, None])
        return self._dev["fused"][1:]

    def _append_decode_fused(self, new, valid):
        """One token a row on CUDA with triton: the key write of `_write_fused` at slot lengths[b],
        writing the slot's position in the same launch, and the values through
        `quant_write.quantize_pack_decode`; then the lengths advance. The same codes as the general
        path (the same kernels' arithmetic), without its slot bookkeeping: a clone of the lengths,
        the value rows' index sum, and a where, a cast and a scatter for the positions, every layer
        of a captured step. Unlike `_write_fused`, a padding token (position < 0) is not written:
        its slot lies past its row's length either way, as in the per-token caches' decode write."""
        if not kernels_enabled(new.k):
            return False
        from kvbench.kernels import rotatekv_write as rw
        from kvbench.kernels import side_stream
        from kvbench.kernels.quant_write import quantize_pack_decode

        b = new.k.shape[0]
        tables = self._fused_write_tables(new.k.device, b)
        if tables is None:
            return False
        order, gid, _ = tables
        spec, ks, vs = self.spec, self.kstore, self.vstore
        if self.replay_chunks:  # (before the lengths move)
            self._chunks.append((self.lengths[:, None].clone(), valid))
        side = side_stream.fork(new.k.device)  # the values' three launches beside the keys' three
        with side_stream.on(side):
            quantize_pack_decode(self._rotated_values(new), self.lengths, new.positions, (vs.codes, vs.scale, vs.zero),
                                 bits=spec.bits, group_size=spec.group_size, clip_ratio=spec.clip_ratio,
                                 integer_zero=spec.integer_zero)
        rot = self.m.rotated_keys(new, self.g)  # [B, 1, C] float32, as quantize_new computes it
        rw.quantize_pack_grouped(rot.reshape(b, -1), gid, order=order, bits=spec.bits, num_qgroups=ks.ng,
                                 clip_ratio=spec.clip_ratio, integer_zero=spec.integer_zero, key_block=self.key_block,
                                 codes_out=ks.codes.view(-1, ks.row_bytes), scale_out=ks.scale.view(-1, ks.ng),
                                 zero_out=ks.zero.view(-1, ks.ng), capacity=ks.codes.shape[2], lengths=self.lengths,
                                 token_positions=new.positions, slot_positions=self.positions)
        side_stream.join(side)
        self.lengths += valid[:, 0]
        return True

    def _write_fused(self, new, dest):
        """On CUDA with triton (same gating as the base class): rotated keys in torch (the very
        `rotated_keys` of the torch path), then kvbench.kernels.rotatekv_write quantizes them in
        the permuted groups and packs each head group's row into its slot (one launch: codes,
        scales and zeros bit-identical to `quantize_new` + `PerTokenStore.write`); values rotated
        as `quantize_new` rotates them, then quant_write.quantize_pack_rows (bit-identical too).
        Every token is written at its `dest` slot, scratch slots of padding and sinks included, as
        the torch path does."""
        if not kernels_enabled(new.k):
            return False
        from kvbench.kernels import rotatekv_write as rw
        from kvbench.kernels.quant_write import quantize_pack_rows

        b, t = dest.shape
        tables = self._fused_write_tables(dest.device, b)
        if tables is None:
            return False
        order, gid, vbase = tables
        g, spec, ks, vs = self.g, self.spec, self.kstore, self.vstore
        c, d = g.kv_channels, g.head_dim
        rot = self.m.rotated_keys(new, g)  # [B, T, C] float32, as quantize_new computes it
        # Key rows from the slots in the kernel: codes (b * Hg + kb) * cap + dest, scales b * cap + dest.
        rw.quantize_pack_grouped(rot.reshape(b * t, c), gid, order=order, bits=spec.bits, num_qgroups=ks.ng,
                                 clip_ratio=spec.clip_ratio, integer_zero=spec.integer_zero, key_block=self.key_block,
                                 codes_out=ks.codes.view(-1, ks.row_bytes), scale_out=ks.scale.view(-1, ks.ng),
                                 zero_out=ks.zero.view(-1, ks.ng), dest=dest, capacity=ks.codes.shape[2])
        rows = (vbase + dest[:, None, :]).view(-1)  # [B, H, T] flattened, the order of new.v's rows
        # Values rotated by the torch path's own Hadamard, not the kernel's: an in-kernel rotation
        # rounds differently (1e-4 of the fp16 scales one ulp apart on the H100), and at 2 bits
        # that moved SmolLM2's packed perplexity 1.2% off the simulated mode's.
        quantize_pack_rows(self._rotated_values(new).reshape(-1, d), bits=spec.bits, group_size=spec.group_size,
                           clip_ratio=spec.clip_ratio, integer_zero=spec.integer_zero, rotate=False, dest=rows,
                           out=(vs.codes.view(-1, vs.row_bytes), vs.scale.view(-1, vs.ng), vs.zero.view(-1, vs.ng)))
        return True

    def quantize_new(self, new):
        m, g = self.m, self.g
        perm, inv = self._on(new.k.device)
        stored = m.rotated_keys(new, g)[..., perm]  # [B, T, C]
        kq = quantize(stored, self.spec)
        # Codes back to rotated order, one row per head group [B, Hg, T, n]; scales stay in
        # stored-group order [B, 1, T, C / G].
        b, t, c = stored.shape
        codes = kq.codes[..., inv].reshape(b, t, self.num_groups, self.key_block).transpose(1, 2)
        kq = Quantized(codes=codes, scale=kq.scale.unsqueeze(1), zero=kq.zero.unsqueeze(1))
        return kq, quantize(self._rotated_values(new), self.spec)

    def _rotated_values(self, new) -> torch.Tensor:
        """[B, H, T, D] float32: values rotated by the per-head Hadamard."""
        from kvbench.rotation import grouped_hadamard, heads_to_tokens

        g = self.g
        v = grouped_hadamard(heads_to_tokens(new.v.float()), g.head_dim)  # [B, T, C]
        b, t, _ = v.shape
        return v.reshape(b, t, g.num_kv_heads, g.head_dim).transpose(1, 2)

    def dequantize_rotated_keys(self, kq: Quantized) -> torch.Tensor:
        """[B, S, C] float32 dequantized keys in rotated order (what the simulated cache gets
        from fake_quantize(stored)[..., inv])."""
        perm, _ = self._on(kq.codes.device)
        b, hg, s, n = kq.codes.shape
        codes = kq.codes.transpose(1, 2).reshape(b, s, hg * n)[..., perm]  # stored order
        stored = dequantize(Quantized(codes, kq.scale[:, 0], kq.zero[:, 0]), self.spec, dtype=torch.float32)
        return stored[..., self._on(kq.codes.device)[1]]

    def dequantize_stored(self, kq, vq, positions):
        from kvbench.rotation import grouped_hadamard, heads_to_tokens, tokens_to_heads

        g = self.g
        restored = self.dequantize_rotated_keys(kq)
        k = tokens_to_heads(grouped_hadamard(restored, self.key_block, inverse=True), g.num_kv_heads)
        if self.m.pre_rope:
            cos, sin = self.rope.lookup(positions)
            k = apply_rope(k, cos, sin)
        vd = dequantize(vq, self.spec, dtype=torch.float32)  # [B, H, S, D]
        v = tokens_to_heads(grouped_hadamard(heads_to_tokens(vd), g.head_dim, inverse=True), g.num_kv_heads)
        return k.to(self.dtype), v.to(self.dtype)

    def exact_tokens(self, new):
        from kvbench.rotation import sink_tokens

        if self.m.sinks == 0 or not new.is_prefill or new.layer_input is None:
            return None
        return sink_tokens(new.layer_input, new.valid, self.m.sinks)

    def kernel_supported(self) -> bool:
        d = self.g.head_dim
        return (self.spec.bits in (2, 4, 8) and d & (d - 1) == 0 and self.head_group in (1, 2, 4, 8)
                and d >= 16)


# --------------------------------------------------------------------------------------------
# KIVI


class KIVIPackedCache(LayerCache):
    """kivi, packed: the same boundary rule as the simulated KIVICache (see methods/kivi.py).

    Per row b, tokens below nq[b] (a multiple of G) are quantized: keys channel-major per group
    of G tokens (k_codes [B, H, cap_groups, D, G*bits/8], k_scale/k_zero [B, H, cap_groups, D]),
    values per token (vstore). Tokens from nq[b] on are in the full-precision ring window
    [B, H, W, D], slot = position % W, W = residual + G. Positions must be 0, 1, 2, ... for the
    valid tokens of each row (left padding is fine), as the simulated cache assumes.
    """

    def __init__(self, spec: QuantSpec, residual: int, num_kv_heads: int, head_dim: int, capacity: int = 0):
        self.spec, self.residual = spec, residual
        self.G = spec.group_size
        self.H, self.D = num_kv_heads, head_dim
        self.W = residual + self.G
        self.vstore = PerTokenStore(spec, num_kv_heads, head_dim)
        self.k_codes = self.k_scale = self.k_zero = None
        self.win_k = self.win_v = None
        self.used = 0  # host-side bound of max(n)
        self.n: torch.Tensor | None = None  # [B] tokens stored per row (device)
        self.nq: torch.Tensor | None = None  # [B] quantized tokens per row (device)
        self.capacity = capacity
        self.dtype = None
        self._stash = None  # exact tokens of the last append, for the attend that follows
        self._nq_old = None  # [B]: the boundary before a fused decode append (kivi_group_write reads it)

    def reserve(self, tokens: int) -> None:
        self.capacity = max(self.capacity, tokens)
        if self.n is not None:
            self._ensure_quant(self.capacity)

    def quantized_below(self, q_positions: torch.Tensor) -> torch.Tensor:
        g = self.G
        return torch.div((q_positions + 1 - self.residual).clamp_min(0), g, rounding_mode="floor") * g

    def _ensure_quant(self, tokens: int) -> None:
        groups = -(-tokens // self.G)
        cur = 0 if self.k_codes is None else self.k_codes.shape[2]
        cap_g = _capacity_for(groups, cur) if groups > cur else cur
        b, dev = self.n.shape[0], self.n.device
        if self.k_codes is None:
            pb = self.G * self.spec.bits // 8
            self.k_codes = torch.zeros(b, self.H, cap_g, self.D, pb, dtype=torch.uint8, device=dev)
            self.k_scale = torch.zeros(b, self.H, cap_g, self.D, dtype=torch.float16, device=dev)
            self.k_zero = torch.zeros_like(self.k_scale)
        else:
            self.k_codes = _grow(self.k_codes, cap_g, 2)
            self.k_scale = _grow(self.k_scale, cap_g, 2)
            self.k_zero = _grow(self.k_zero, cap_g, 2)
        self.vstore.ensure(b, cap_g * self.G, dev)

    #: A decode append (one token per row) and the kernel read run without host syncs, so a decode
    #: step can be captured into a CUDA graph once `reserve` made room (kvbench.decode reads this).
    graph_safe = True

    def append(self, new: NewTokens) -> None:
        b, h, t, d = new.k.shape
        dev = new.k.device
        self.dtype = new.k.dtype
        if self.n is not None and t == 1 and not new.is_prefill:
            self._append_decode(new)
            return
        if self.n is None:
            self.n = torch.zeros(b, dtype=torch.int64, device=dev)
            self.nq = torch.zeros(b, dtype=torch.int64, device=dev)
            self.win_k = torch.zeros(b, h, self.W, d, dtype=new.k.dtype, device=dev)
            self.win_v = torch.zeros(b, h, self.W, d, dtype=new.v.dtype, device=dev)
            self._ensure_quant(max(self.capacity, t))
        valid = new.valid
        n_old, nq_old = self.n.tolist(), self.nq.tolist()
        counts = valid.sum(1).tolist()
        n_new = [a + c for a, c in zip(n_old, counts)]
        nq_new = [int(self.quantized_below(torch.tensor(x - 1))) if x > 0 else 0 for x in n_new]
        self._ensure_quant(max(n_new) if n_new else 0)
        stash = []
        for row in range(b):
            # Exact tokens from the old boundary on: the window, then the new valid tokens.
            old_pos = torch.arange(nq_old[row], n_old[row], device=dev)
            wk = self.win_k[row][:, old_pos % self.W]
            wv = self.win_v[row][:, old_pos % self.W]
            sel = valid[row]
            ek = torch.cat([wk, new.k[row][:, sel]], 1)  # [H, n_new - nq_old, D]
            ev = torch.cat([wv, new.v[row][:, sel]], 1)
            pos = torch.arange(nq_old[row], n_new[row], device=dev)
            stash.append((ek, ev, pos))
            # Groups that leave the window: [nq_old, nq_new).
            m = nq_new[row] - nq_old[row]
            if m > 0:
                self._write_quantized(row, nq_old[row], ek[:, :m], ev[:, :m])
            keep = pos >= nq_new[row]
            self.win_k[row][:, pos[keep] % self.W] = ek[:, keep]
            self.win_v[row][:, pos[keep] % self.W] = ev[:, keep]
        self.n.copy_(torch.tensor(n_new, dtype=torch.int64))
        self.nq.copy_(torch.tensor(nq_new, dtype=torch.int64))
        self.used = max(self.used, max(n_new) if n_new else 0)
        self._stash = stash

    def _append_decode(self, new: NewTokens) -> None:
        """A decode step (one valid token per row) on the device, with no host sync: the token
        goes into its ring slot; every row quantizes the group starting at its boundary nq, and
        rows whose boundary Q(n - 1) moved past it keep the result (a masked write). The same
        quantize calls on the same values as the host path, so the codes are identical."""
        b = new.k.shape[0]
        dev = new.k.device
        g, w = self.G, self.W
        self.used += 1
        if self.used > self.k_codes.shape[2] * g:  # host-side bound: grows only without reserve()
            self._ensure_quant(self.used)
        if kernels_enabled(new.k) and self.spec.bits in (2, 4, 8) and not (g & (g - 1) or self.D & (self.D - 1)):
            from kvbench.kernels.quant_write import kivi_ring_append

            if self._nq_old is None or self._nq_old.shape != self.nq.shape or self._nq_old.device != self.nq.device:
                self._nq_old = torch.empty_like(self.nq)
            # the token into its ring slot, n + 1, and the boundary to Q(n - 1) (one token a step moves
            # it by G at most), the old boundary kept for the group write: one launch
            kivi_ring_append(new.k, new.v, self.win_k, self.win_v, self.n, self.nq, self._nq_old,
                             residual=self.residual, group_size=g)
            self._write_group_fused(self._nq_old)
            self._stash = None
            return
        bi = torch.arange(b, device=dev)
        slot = self.n % w
        self.win_k[bi, :, slot] = new.k[:, :, 0].to(self.win_k.dtype)
        self.win_v[bi, :, slot] = new.v[:, :, 0].to(self.win_v.dtype)
        self.n.add_(1)
        cross = self.quantized_below(self.n - 1) > self.nq  # [B]: a group leaves the window
        ar = torch.arange(g, device=dev)
        gslot = (self.nq[:, None] + ar) % w  # [B, G] ring slots of the group at nq
        k = self.win_k[bi[:, None], :, gslot].transpose(1, 2)  # [B, H, G, D]
        v = self.win_v[bi[:, None], :, gslot].transpose(1, 2)
        kq = quantize(k.transpose(-1, -2), self.spec)  # per channel over the G tokens
        gi = torch.clamp(self.nq // g, max=self.k_codes.shape[2] - 1)
        keep = cross[:, None, None, None]
        self.k_codes[bi, :, gi] = torch.where(keep, pack(kq.codes, self.spec.bits, check=False), self.k_codes[bi, :, gi])
        self.k_scale[bi, :, gi] = torch.where(cross[:, None, None], kq.scale[..., 0], self.k_scale[bi, :, gi])
        self.k_zero[bi, :, gi] = torch.where(cross[:, None, None], kq.zero[..., 0], self.k_zero[bi, :, gi])
        vq = quantize(v, self.spec)  # per token: codes [B, H, G, D], scale [B, H, G, D/G]
        vs = self.vstore
        tslots = torch.clamp(self.nq[:, None] + ar, max=vs.codes.shape[2] - 1)  # [B, G]
        for dst, val in ((vs.codes, pack(vq.codes, self.spec.bits, check=False)), (vs.scale, vq.scale),
                         (vs.zero, vq.zero)):
            dst[bi[:, None], :, tslots] = torch.where(keep, val.transpose(1, 2), dst[bi[:, None], :, tslots])
        self.nq.add_(torch.where(cross, g, 0))
        self._stash = None

    def _write_group_fused(self, nq_old: torch.Tensor) -> None:
        """The group at each row's boundary, quantized and packed straight from the ring window into
        the stores by kvbench.kernels.quant_write.kivi_group_write (the torch quantizer's arithmetic
        bit for bit), for the rows whose boundary moved past `nq_old` (the kernel reads the advanced
        n and the old boundary): keys as rows of
        one channel over the G tokens, values as rows of one token. Two launches and no gather,
        where the torch path takes dozens (a gather of every row's group, every step)."""
        from kvbench.kernels import side_stream
        from kvbench.kernels.quant_write import kivi_group_write

        spec, vs = self.spec, self.vstore
        side = side_stream.fork(self.n.device)  # keys and values are independent: the values beside
        for keys, win, out, stream in ((True, self.win_k, (self.k_codes, self.k_scale, self.k_zero), None),
                                       (False, self.win_v, (vs.codes, vs.scale, vs.zero), side)):
            with side_stream.on(stream):
                kivi_group_write(win, self.n, nq_old, out, keys=keys, bits=spec.bits, group_size=self.G,
                                 value_group_size=spec.group_size, residual=self.residual,
                                 clip_ratio=spec.clip_ratio, integer_zero=spec.integer_zero)
        side_stream.join(side)

    def _window(self):
        """The full-precision ring as attention inputs: (k, v [B, H, W, D], positions [B, W])."""
        w = self.W
        slot = torch.arange(w, device=self.n.device)
        pos = self.nq[:, None] + (slot[None] - self.nq[:, None]) % w
        return self.win_k, self.win_v, torch.where(pos < self.n[:, None], pos, -1)

    def _write_quantized(self, row: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Quantize tokens [start, start + m) of a row (m a multiple of G) into the packed stores."""
        h, m, d = k.shape
        g = self.G
        grouped = k.reshape(h, m // g, g, d).transpose(-1, -2)  # [H, n, D, G]
        kq = quantize(grouped, self.spec)  # scale [H, n, D, 1]
        g0 = start // g
        self.k_codes[row, :, g0 : g0 + m // g] = pack(kq.codes, self.spec.bits, check=False)
        self.k_scale[row, :, g0 : g0 + m // g] = kq.scale[..., 0]
        self.k_zero[row, :, g0 : g0 + m // g] = kq.zero[..., 0]
        vq = quantize(v, self.spec)  # [H, m, D/G]
        self.vstore.codes[row, :, start : start + m] = pack(vq.codes, self.spec.bits, check=False)
        self.vstore.scale[row, :, start : start + m] = vq.scale
        self.vstore.zero[row, :, start : start + m] = vq.zero

    def quantized_kv(self, slots: int):
        """Dequantized keys and values of tokens [0, slots) of every row: [B, H, slots, D]."""
        g = self.G
        ng = -(-slots // g)
        codes = unpack(self.k_codes[:, :, :ng], self.spec.bits, g)  # [B, H, ng, D, G]
        kq = Quantized(codes, self.k_scale[:, :, :ng, :, None], self.k_zero[:, :, :ng, :, None])
        k = dequantize(kq, self.spec, dtype=self.dtype).transpose(-1, -2)  # [B, H, ng, G, D]
        k = k.reshape(k.shape[0], self.H, ng * g, self.D)[:, :, :slots]
        v = dequantize(self.vstore.read(slots), self.spec, dtype=self.dtype)
        return k, v

    def attend(self, q: torch.Tensor, q_positions: torch.Tensor, scaling: float) -> torch.Tensor:
        if q.shape[2] == 1 and kernels_enabled(q) and self.kernel_supported():
            from kvbench.kernels import decode_attention

            return decode_attention.packed_decode(self, q, scaling)
        b = q.shape[0]
        dev = q.device
        nq = self.nq.tolist()
        sq = max(nq) if nq else 0
        k_parts, v_parts, pos_parts, kind = [], [], [], []
        if sq > 0:
            kqd, vqd = self.quantized_kv(sq)
            ar = torch.arange(sq, device=dev)
            qpos = torch.where(ar[None] < self.nq[:, None], ar[None], -1)
            k_parts.append(kqd)
            v_parts.append(vqd)
            pos_parts.append(qpos)
            kind.append(torch.ones(sq, dtype=torch.bool, device=dev))
        if self._stash is None:  # after a decode append: the window is the ring
            ek, ev, epos = self._window()
            se = epos.shape[1]
        else:
            se = max(s[2].numel() for s in self._stash)
            ek = torch.zeros(b, self.H, se, self.D, dtype=self.dtype, device=dev)
            ev = torch.zeros_like(ek)
            epos = torch.full((b, se), -1, dtype=torch.int64, device=dev)
            for row, (k, v, pos) in enumerate(self._stash):
                ek[row, :, : pos.numel()] = k
                ev[row, :, : pos.numel()] = v
                epos[row, : pos.numel()] = pos
        k_parts.append(ek)
        v_parts.append(ev)
        pos_parts.append(epos)
        kind.append(torch.zeros(se, dtype=torch.bool, device=dev))
        keys = torch.cat(k_parts, 2).to(q.dtype)
        values = torch.cat(v_parts, 2).to(q.dtype)
        positions = torch.cat(pos_parts, 1)
        is_quant = torch.cat(kind)[None, None, :]  # [1, 1, S]
        allowed = causal_mask(q_positions, positions)
        boundary = self.quantized_below(q_positions)  # [B, Tq]
        below = positions[:, None, :] < boundary[:, :, None]
        mask = allowed & torch.where(is_quant, below, ~below)
        return attention(q, keys, values, q_positions, positions, scaling, allowed=mask)

    def kernel_supported(self) -> bool:
        return self.spec.bits in (2, 4, 8) and self.D & (self.D - 1) == 0

    def nbytes(self) -> int:
        return (_nbytes(self.k_codes, self.k_scale, self.k_zero, self.win_k, self.win_v, self.n, self.nq)
                + self.vstore.nbytes())

    def used_nbytes(self) -> int:
        if self.n is None:
            return 0
        nq = int(self.nq.sum())
        b = self.n.shape[0]
        per_tok_k = self.H * self.D * (self.spec.bits / 8 + 4 / self.G)
        per_tok_v = self.H * (self.D * self.spec.bits / 8 + 4 * self.D / self.G)
        window = int((self.n - self.nq).sum()) * self.H * self.D * 2 * self.win_k.element_size()
        return int(nq * (per_tok_k + per_tok_v)) + window + 16 * b
