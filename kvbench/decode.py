"""A decode engine for timing and memory runs: preallocated caches, fill, then captured steps.

`DecodeEngine(lm, method, batch, capacity)` makes one `KVSession` of the method's caches, asks
each cache to preallocate `capacity` tokens per row when it can (`reserve`), fills them to a
length (`fill`), and runs decode steps of one token per row through the model (`step`), captured
into a CUDA graph when the caches allow it (`capture`). A step is the model's whole forward:
projections, MLPs, the caches' write and attention, the LM head; no host sync inside. On CUDA the
per-layer RMSNorm, RoPE and SiLU-times-up run as one Triton launch each (`fused_glue`,
`kvbench.kernels.glue`) and each layer's q/k/v and gate/up projections are one GEMM each
(`kvbench.model.fuse_projections`), the same for every method, fp16 included;
`KVBENCH_FUSED_GLUE=0` keeps transformers' own ops and GEMMs.

Optional cache protocol (duck-typed; a plain `LayerCache` still runs, uncaptured and filled
through `append`):

- `reserve(batch, capacity, device, dtype)`: allocate storage for `capacity` tokens per row now,
  so memory does not grow while decoding and a captured step writes into fixed buffers.
- `fill_random(length, generator)`: make the cache hold `length` tokens per row of random
  content quickly (random codes and scales for packed caches, random fp16 for fp16): for timing,
  the values of the stored tokens do not matter, only how many there are.
- `graph_safe` (bool attribute, default False): `append` and `attend` of a decode token do no
  host sync and read their write slot and length from device tensors (or keep them fixed between
  replays), so the step can be captured into a CUDA graph and replayed.
- `attend_len` (attribute): set by the engine for fixed-length timing: attend over exactly that
  many stored tokens (every row full), so no mask is needed.
- `dequantized()`: (k, v) fp16 tensors [B, H_kv, S, D] of what is stored (the unfused peer row:
  dequantize then SDPA).
- `attention_bytes()`: the bytes one `attend` must read (default: `nbytes()`).

Caches without `fill_random` are filled by appending random keys and values in chunks through
their own write path (`fill_by_append`), which works for any `LayerCache`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kvbench.method import KVGeometry, KVMethod, LayerCache, NewTokens
from kvbench.model import LoadedModel, fuse_projections
from kvbench.rope import apply_rope
from kvbench.session import KVSession
from kvbench.simulated import attention as masked_attention


class StaticKVCache(LayerCache):
    """Preallocated full-precision K/V [B, H_kv, capacity, D]: fp16's fast cache (mode: packed).

    Prefill chunks go to the next free slots (host-side cursor). A decode token goes to the slot
    of its position (plus the row's left padding), computed on the device, so a captured step
    replays with positions advanced in place. Attention over a decode token masks slots by
    stored position on the device; with `attend_len` set it reads exactly that many slots.
    """

    graph_safe = True

    def __init__(self, geometry: KVGeometry):
        self.g = geometry
        self.k: torch.Tensor | None = None  # [B, H_kv, cap, D] keys after RoPE
        self.v: torch.Tensor | None = None
        self.pos: torch.Tensor | None = None  # [B, cap] int64 position of each slot, -1 empty
        self.pad: torch.Tensor | None = None  # [B, 1] int64 left padding of each row
        self.cursor = 0  # host-side count of slots written (prefill and uncaptured decode)
        self.attend_len: int | None = None

    @property
    def capacity(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def reserve(self, batch: int, capacity: int, device, dtype) -> None:
        shape = (batch, self.g.num_kv_heads, capacity, self.g.head_dim)
        old_k, old_v, old_pos = self.k, self.v, self.pos
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = torch.full((batch, capacity), -1, dtype=torch.long, device=device)
        if old_k is not None:  # growing (uncaptured use without reserve): keep what is stored
            n = self.cursor
            self.k[:, :, :n], self.v[:, :, :n], self.pos[:, :n] = old_k[:, :, :n], old_v[:, :, :n], old_pos[:, :n]
        if self.pad is None:
            self.pad = torch.zeros(batch, 1, dtype=torch.long, device=device)

    def fill_random(self, length: int, generator: torch.Generator | None = None) -> None:
        assert self.k is not None and length <= self.capacity, "reserve() first, with room for the fill"
        self.k[:, :, :length].normal_(generator=generator)
        self.v[:, :, :length].normal_(generator=generator)
        self.pos[:, :length] = torch.arange(length, device=self.pos.device)
        self.pad.zero_()
        self.cursor = length

    def append(self, new: NewTokens) -> None:
        b, _, t, _ = new.k.shape
        if self.k is None or self.cursor + t > self.capacity:
            self.reserve(b, max(2 * self.capacity, self.cursor + t, 16), new.k.device, new.k.dtype)
        if t == 1 and not new.is_prefill and self._write_kernel(new.k):
            from kvbench.kernels.kv_write import write_token

            write_token(new.k, new.v, new.positions, self.pad, self.k, self.v, self.pos)  # one launch
        elif t == 1 and not new.is_prefill:
            slot = (new.positions + self.pad).view(b, 1, 1, 1).expand(b, self.g.num_kv_heads, 1, self.g.head_dim)
            self.k.scatter_(2, slot, new.k.to(self.k.dtype))
            self.v.scatter_(2, slot, new.v.to(self.v.dtype))
            self.pos.scatter_(1, slot[:, 0, :, 0], new.positions)
        else:
            if self.cursor == 0:
                self.pad.copy_((new.positions < 0).sum(1, keepdim=True))
            s = slice(self.cursor, self.cursor + t)
            self.k[:, :, s], self.v[:, :, s], self.pos[:, s] = new.k, new.v, new.positions
        self.cursor += t

    @staticmethod
    def _write_kernel(x: torch.Tensor) -> bool:
        # the packed caches' switch (CUDA, triton, KVBENCH_PACKED_KERNELS unset or 1), so fp16's
        # write takes a kernel exactly where theirs do
        from kvbench.packed_cache import kernels_enabled

        return x.dtype in (torch.float16, torch.float32) and kernels_enabled(x)

    def attend(self, q: torch.Tensor, q_positions: torch.Tensor, scaling: float) -> torch.Tensor:
        gqa = q.shape[1] != self.g.num_kv_heads
        if self.attend_len is not None:  # fixed-length timing: every row holds attend_len tokens
            n = self.attend_len
            return F.scaled_dot_product_attention(
                q, self.k[:, :, :n], self.v[:, :, :n], scale=scaling, enable_gqa=gqa
            )
        if q.shape[2] == 1:  # a decode token: mask on the device, no host sync
            allowed = (self.pos >= 0) & (self.pos <= q_positions[:, -1:])  # [B, cap]
            return F.scaled_dot_product_attention(
                q, self.k, self.v, attn_mask=allowed[:, None, None, :], scale=scaling, enable_gqa=gqa
            )
        n = self.cursor
        return masked_attention(q, self.k[:, :, :n], self.v[:, :, :n], q_positions, self.pos[:, :n], scaling)

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.attend_len or self.cursor
        return self.k[:, :, :n], self.v[:, :, :n]

    def attention_bytes(self) -> int:
        n = self.attend_len or self.capacity
        return 0 if self.k is None else 2 * self.k[:, :, :n].numel() * self.k.element_size()

    def nbytes(self) -> int:
        return 0 if self.k is None else 2 * self.k.numel() * self.k.element_size() + self.pos.numel() * 8


def rope_tables(geometry: KVGeometry, positions: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, T, D] for positions [B, T] (Llama's default RoPE, rotate-half layout)."""
    d = geometry.head_dim
    inv_freq = 1.0 / (geometry.rope_theta ** (torch.arange(0, d, 2, device=positions.device, dtype=torch.float32) / d))
    freqs = positions.clamp_min(0).float()[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], -1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def fill_by_append(
    cache: LayerCache,
    geometry: KVGeometry,
    batch: int,
    length: int,
    chunk: int,
    device,
    dtype,
    needs_layer_input: bool,
    generator: torch.Generator | None = None,
) -> None:
    """Append `length` random tokens per row through the cache's own write path, in chunks."""
    h, d = geometry.num_kv_heads, geometry.head_dim
    for start in range(0, length, chunk):
        t = min(chunk, length - start)
        positions = torch.arange(start, start + t, device=device).expand(batch, t)
        cos, sin = rope_tables(geometry, positions, dtype)
        k_pre = torch.randn(batch, h, t, d, device=device, dtype=dtype, generator=generator)
        v = torch.randn(batch, h, t, d, device=device, dtype=dtype, generator=generator)
        layer_input = (
            torch.randn(batch, t, geometry.hidden_size, device=device, dtype=dtype, generator=generator)
            if needs_layer_input
            else None
        )
        new = NewTokens(
            k_pre=k_pre, k=apply_rope(k_pre, cos, sin), v=v, cos=cos, sin=sin, positions=positions,
            layer_input=layer_input, is_prefill=start == 0,
        )
        cache.append(new)
        del new, k_pre, v, layer_input, cos, sin


def fill_chunk(batch: int, target_tokens: int = 32768, multiple: int = 128) -> int:
    """Tokens per row per fill chunk so one chunk holds about `target_tokens` tokens in all."""
    return max(multiple, (target_tokens // max(batch, 1)) // multiple * multiple)


# --------------------------------------------------------------------------------------------
# Adapters for the packed caches of kvbench.packed_cache (used unless a cache brings its own
# `fill_random` / `graph_safe`). They write the caches' documented layout directly.


def _packed_kind(cache) -> str | None:
    from kvbench import packed_cache as pc

    if isinstance(cache, pc.KIVIPackedCache):
        return "kivi"
    if isinstance(cache, pc.PackedPerTokenCache):
        return "per_token"
    return None


def reserve(cache: LayerCache, batch: int, capacity: int, device, dtype) -> bool:
    """Preallocate `capacity` tokens per row; False when the cache cannot."""
    if isinstance(cache, StaticKVCache):
        cache.reserve(batch, capacity, device, dtype)
        return True
    kind = _packed_kind(cache)
    # Exactly `capacity` slots: the caches' own reserve() rounds up to a power of two, which
    # would count up to twice the bytes the run needs.
    if kind == "per_token":
        cache.capacity = capacity
        cache.dtype = dtype
        cache.positions = torch.full((batch, capacity), -1, dtype=torch.int32, device=device)
        cache.lengths = torch.zeros(batch, dtype=torch.int64, device=device)
        cache.kstore.ensure(batch, capacity, device)
        cache.vstore.ensure(batch, capacity, device)
        return True
    if kind == "kivi":
        cache.capacity = capacity
        cache.dtype = dtype
        cache.n = torch.zeros(batch, dtype=torch.int64, device=device)
        cache.nq = torch.zeros(batch, dtype=torch.int64, device=device)
        shape = (batch, cache.H, cache.W, cache.D)
        cache.win_k = torch.zeros(shape, dtype=dtype, device=device)
        cache.win_v = torch.zeros(shape, dtype=dtype, device=device)
        groups = -(-capacity // cache.G)
        pb = cache.G * cache.spec.bits // 8
        cache.k_codes = torch.zeros(batch, cache.H, groups, cache.D, pb, dtype=torch.uint8, device=device)
        cache.k_scale = torch.zeros(batch, cache.H, groups, cache.D, dtype=torch.float16, device=device)
        cache.k_zero = torch.zeros_like(cache.k_scale)
        cache.vstore.ensure(batch, groups * cache.G, device)
        return True
    return False


def _random_codes_(t: torch.Tensor, gen) -> None:
    t.random_(0, 256, generator=gen)  # in place: no temporary as large as the codes


def _random_scales_(scale: torch.Tensor, zero: torch.Tensor, gen) -> None:
    scale.uniform_(0.01, 0.06, generator=gen)
    zero.normal_(0.0, 0.1, generator=gen)


def fill_random_packed(cache, geometry: KVGeometry, length: int, gen, sinks: int = 0) -> bool:
    """Random codes and scales for `length` tokens per row, written into a reserved packed cache
    of kvbench.packed_cache in its layout (RotateKV: `sinks` of them as full-precision tokens)."""
    kind = _packed_kind(cache)
    if kind == "per_token":
        b, dev = cache.lengths.shape[0], cache.lengths.device
        n_fp = min(sinks, length)
        nq = length - n_fp
        for store in (cache.kstore, cache.vstore):
            _random_codes_(store.codes[:, :, :nq], gen)
            _random_scales_(store.scale[:, :, :nq], store.zero[:, :, :nq], gen)
        cache.positions[:, :nq] = torch.arange(n_fp, length, device=dev, dtype=torch.int32)
        cache.lengths.fill_(nq)
        cache.used = nq
        if cache.rope is not None:  # the model's RoPE rows for every position up to capacity
            cap = cache.positions.shape[1] + n_fp
            cos, sin = rope_tables(geometry, torch.arange(cap, device=dev)[None], cache.dtype)
            cache.rope.cos, cache.rope.sin = cos[0].contiguous(), sin[0].contiguous()
        if n_fp:
            h, d = geometry.num_kv_heads, geometry.head_dim
            k = torch.randn(b, h, n_fp, d, device=dev, dtype=cache.dtype, generator=gen)
            v = torch.randn(b, h, n_fp, d, device=dev, dtype=cache.dtype, generator=gen)
            pos = torch.arange(n_fp, device=dev).expand(b, n_fp)
            cache.fp.append(k, v, pos, torch.ones(b, n_fp, dtype=torch.bool, device=dev))
        return True
    if kind == "kivi":
        b, dev = cache.n.shape[0], cache.n.device
        nq = int(cache.quantized_below(torch.tensor(length - 1))) if length > 0 else 0
        groups = nq // cache.G
        _random_codes_(cache.k_codes[:, :, :groups], gen)
        _random_scales_(cache.k_scale[:, :, :groups], cache.k_zero[:, :, :groups], gen)
        vs = cache.vstore
        _random_codes_(vs.codes[:, :, :nq], gen)
        _random_scales_(vs.scale[:, :, :nq], vs.zero[:, :, :nq], gen)
        cache.win_k.normal_(generator=gen)
        cache.win_v.normal_(generator=gen)
        cache.n.fill_(length)
        cache.nq.fill_(nq)
        cache.used = length
        w_pos = torch.arange(nq, length, device=dev)
        cache._stash = [(cache.win_k[r][:, w_pos % cache.W], cache.win_v[r][:, w_pos % cache.W], w_pos)
                        for r in range(b)]
        return True
    return False


def make_graph_safe(cache) -> bool:
    """Whether a decode step over this cache can be captured; for the per-token packed caches,
    replaces the RoPE-table update (a host sync, `int(pos.max())`) by a sync-free write into
    the table preallocated by `fill_random_packed`."""
    if getattr(cache, "graph_safe", False):
        return True
    if _packed_kind(cache) != "per_token":
        return False
    rope = cache.rope
    if rope is not None:
        if rope.cos is None:
            return False

        def update(new: NewTokens, bound=None, rope=rope) -> None:  # decode tokens: all valid, in the table
            p = new.positions.clamp_min(0).reshape(-1)
            rope.cos[p] = new.cos.reshape(-1, new.cos.shape[-1]).to(rope.cos.dtype)
            rope.sin[p] = new.sin.reshape(-1, new.sin.shape[-1]).to(rope.sin.dtype)

        rope.update = update
    return True


def device_counters(cache) -> list[torch.Tensor]:
    """Device tensors a decode append advances (restored after each fixed-length replay)."""
    kind = _packed_kind(cache)
    if kind == "per_token":
        return [cache.lengths]
    if kind == "kivi":
        return [cache.n, cache.nq]
    return []


def _restore(counters: list[torch.Tensor], saved: list[torch.Tensor]) -> None:
    """Put the caches' device counters back after a fixed-length step: one multi-tensor launch
    where a copy each took one or two launches a layer (about 1 us each in a captured step, which
    fp16's cache, with no device counters, never paid)."""
    if counters:
        torch._foreach_copy_(counters, saved)


def _fused_glue_wanted(asked: bool | None, device) -> bool:
    import os

    from kvbench.kernels import glue

    ok = torch.device(device).type == "cuda" and glue.triton is not None
    if asked is None:
        return ok and os.environ.get("KVBENCH_FUSED_GLUE", "1") != "0"
    if asked and not ok:
        raise ValueError("DecodeEngine: fused_glue needs a CUDA device and triton")
    return asked


class DecodeEngine:
    """One batch of `batch` rows with room for `capacity` tokens each, driven one token at a time."""

    def __init__(self, lm: LoadedModel, method: KVMethod, batch: int, capacity: int, seed: int = 0,
                 fused_glue: bool | None = None):
        self.lm, self.method, self.batch, self.capacity = lm, method, batch, capacity
        self.g = lm.geometry
        self.device = lm.device
        self.session = KVSession(method, self.g)
        # RMSNorm, RoPE and SiLU-times-up in one Triton launch each, for every method alike (None:
        # on CUDA with triton unless KVBENCH_FUSED_GLUE=0): ~700 fewer launches a Llama-2-7B step
        self.session.fused_glue = _fused_glue_wanted(fused_glue, self.device)
        if self.session.fused_glue:  # and one GEMM for q, k, v and one for gate, up (same for every method)
            fuse_projections(lm.model)
        self.glue = ("fused (kvbench.kernels.glue: RMSNorm, RoPE, SiLU-mul; q/k/v and gate/up projections "
                     "stacked)" if self.session.fused_glue else "transformers' own (torch ops)")
        self.caches = self.session.caches
        self.preallocated = all([reserve(c, batch, capacity, self.device, lm.dtype) for c in self.caches])
        self.gen = torch.Generator(device=self.device)
        self.gen.manual_seed(seed)
        vocab = lm.model.config.vocab_size
        self.ids = torch.randint(vocab, (batch, 1), device=self.device, generator=self.gen)
        self.positions = torch.zeros(batch, 1, dtype=torch.long, device=self.device)
        self.length = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.graph_error: str | None = None
        self.fill_how = ""

    @property
    def graph_safe(self) -> bool:
        return all([make_graph_safe(c) for c in self.caches])

    def kv_bytes(self) -> int:
        return self.session.nbytes()

    # -- filling -----------------------------------------------------------------------------

    def fill(self, length: int, how: str = "random", chunk: int | None = None) -> None:
        """Make every row hold `length` tokens: `random` content written directly (fast; for
        timing and memory), or a real `prefill` of random token ids through the model in chunks
        of `chunk` tokens per row."""
        if how == "random":
            sinks = getattr(self.method, "sinks", 0) if self.method.name == "rotatekv" else 0
            direct = True
            for c in self.caches:
                if hasattr(c, "fill_random"):
                    c.fill_random(length, self.gen)
                elif self.preallocated and fill_random_packed(c, self.g, length, self.gen, sinks):
                    pass
                else:
                    direct = False
                    fill_by_append(
                        c, self.g, self.batch, length, chunk or fill_chunk(self.batch), self.device,
                        self.lm.dtype, self.session.needs_layer_input, self.gen,
                    )
            self.session.is_prefill = False
            self.fill_how = "random content written directly" if direct else "random K/V appended through the write path"
        elif how == "prefill":
            chunk = chunk or length
            vocab = self.lm.model.config.vocab_size
            for start in range(0, length, chunk):
                t = min(chunk, length - start)
                ids = torch.randint(vocab, (self.batch, t), device=self.device, generator=self.gen)
                pos = torch.arange(start, start + t, device=self.device).expand(self.batch, t)
                self.lm.forward(self.session, ids, pos, logits_to_keep=1)
            self.fill_how = f"model prefill in chunks of {chunk} tokens per row"
        else:
            raise ValueError(f"fill {how!r}: expected random or prefill")
        self.length = length
        self.positions.fill_(length)

    # -- stepping ----------------------------------------------------------------------------

    def fix_length(self, n: int | None) -> None:
        """Attend over exactly n stored tokens in every layer (fixed-length timing), or unset."""
        for c in self.caches:
            if hasattr(c, "attend_len"):
                c.attend_len = n

    def _forward(self) -> torch.Tensor:
        return self.lm.forward(self.session, self.ids, self.positions, logits_to_keep=1)

    def _step_advance(self) -> None:
        self._forward()
        self.positions.add_(1)

    def capture(self, advance: bool) -> bool:
        """Capture one decode step (and, with `advance`, the in-place position increment). False, with
        `graph_error`, where the step cannot be captured: the caller may time it uncaptured and say so.
        A capture that runs out of memory raises instead: an uncaptured timing would set launch-bound
        steps against captured ones, so the tasks treat it as the out-of-memory it is (a failed cell,
        or a lower batch)."""
        self.graph, self.graph_error = None, None
        if not self.graph_safe:
            self.graph_error = "caches are not marked graph_safe: decode steps run uncaptured"
            return False
        counters = [t for c in self.caches for t in device_counters(c)]
        snapshot = [t.clone() for t in counters]

        def fixed() -> None:  # one step, then the caches' device lengths put back
            self._forward()
            with torch.inference_mode():
                _restore(counters, snapshot)

        fn = self._step_advance if advance else fixed
        saved = self.positions.clone()
        used = [(c, c.used) for c in self.caches if hasattr(c, "used")]
        try:
            from kvbench.gpu_timing import capture

            self.graph = capture(fn, warmup=1)
        except Exception as e:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            if is_oom(e):
                raise
            self.graph_error = f"capture failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        finally:
            self.positions.copy_(saved)  # warm-up and capture must not move the timed steps
            if not advance:
                for c, u in used:
                    c.used = u
        return self.graph is not None

    def step(self, advance: bool = True) -> None:
        """One decode token per row (graph replay when captured)."""
        if self.graph is not None:
            self.graph.replay()
        elif advance:
            self._step_advance()
        else:  # eager fixed-length step: put the caches' device lengths back, as the graph does
            counters = [t for c in self.caches for t in device_counters(c)]
            snapshot = [t.clone() for t in counters]
            used = [(c, c.used) for c in self.caches if hasattr(c, "used")]  # host-side bounds
            self._forward()
            for c, u in used:
                c.used = u
            with torch.inference_mode():  # caches may have made them inside the forward
                _restore(counters, snapshot)
        if advance:
            self.length += 1

    def close(self) -> None:
        self.graph = None
        self.session = None
        self.caches = None


def attention_alone(cache: LayerCache, q: torch.Tensor, q_positions: torch.Tensor, scaling: float):
    """A closure calling one layer's attention over its stored tokens (for timing it alone)."""
    return lambda: cache.attend(q, q_positions, scaling)


def sdpa_reference_bytes(batch: int, kv_heads: int, tokens: int, head_dim: int, elt: int = 2) -> int:
    return 2 * batch * kv_heads * tokens * head_dim * elt


def softmax_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)


def require_cuda(task: str) -> None:
    """Raise a one-line UserError when CUDA is not available (GPU tasks run only there)."""
    from kvbench.errors import UserError

    if not torch.cuda.is_available():
        raise UserError(f"task {task} measures GPU memory or speed and needs CUDA; none is available here")


def free_cuda() -> None:
    """Drop what Python still references and hand cached blocks back (after an OOM, say)."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()

