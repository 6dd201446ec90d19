"""decode_latency: milliseconds per decode step at batch x context on a CUDA GPU, and the
attention of one layer alone with its achieved bandwidth.

Protocol: the cache is preallocated for context + a few tokens and filled to `context` tokens
per row (`fill: random` writes random codes and scales / fp16 values at the right length
directly, which is all that timing needs; `fill: prefill` runs a real prefill of random ids). One
decode step (the model's whole forward for one token per row: projections, MLPs, cache write,
attention, LM head) is captured into a CUDA graph (`graphs: true`) and replayed `reps` times
after `warmup` replays, each between CUDA events; every replay writes the token at position
`context` and attends over context + 1 tokens (the caches' device lengths are put back inside
the graph). A capture that runs out of memory fails the cell as out of memory; one that fails for
another reason (a cache not marked graph-safe) is timed uncaptured, with `graph` 0 and a note.
Reported: median and p90, tokens/s = batch / median. Then the attention of layer 0
alone (`attend` of a decode query over the filled cache, captured too), with the bytes that
layer's cache holds over its median time as achieved bandwidth, that as a fraction of the
device-to-device copy bandwidth measured in the same process, and fp16 SDPA at the same shape.

`engine` other than kvbench runs transformers' own fp16 caches as peer rows (fp16 method
only): `hf-dynamic` (stock DynamicCache, torch.cat every step, uncaptured, as users run it),
`hf-static` (StaticCache, uncaptured) and `hf-quantized` (QuantizedCache, if its quanto or HQQ
backend imports).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvbench.params import check
from kvbench.task import Task, TaskContext, TaskResult

ENGINES = ("kvbench", "hf-dynamic", "hf-static", "hf-quantized")
_F = dataclasses.field


@dataclass
class DecodeLatency(Task):
    name = "decode_latency"
    description = "GPU decode step latency (CUDA events, median/p90) and attention bandwidth at batch x context."
    version = 1
    requires_cuda = True

    batch: int = _F(default=8, metadata={"help": "rows decoded together"})
    context: int = _F(default=8192, metadata={"help": "tokens in the cache before the timed step"})
    reps: int = _F(default=100, metadata={"help": "timed decode steps"})
    warmup: int = _F(default=10, metadata={"help": "untimed steps first"})
    graphs: bool = _F(default=True, metadata={"help": "capture the decode step into a CUDA graph"})
    fill: str = _F(default="random", metadata={"choices": ("random", "prefill"), "help": "how the cache is filled"})
    prefill_chunk: int = _F(default=1024, metadata={"help": "tokens per row per prefill forward (fill: prefill)"})
    attention_alone: bool = _F(default=True, metadata={"help": "also time one layer's attention alone"})
    engine: str = _F(default="kvbench", metadata={"choices": ENGINES, "help": "kvbench, or a transformers peer row"})

    def __post_init__(self) -> None:
        check(self.batch >= 1, "batch", f"{self.batch} must be at least 1")
        check(self.context >= 1, "context", f"{self.context} must be at least 1")
        check(self.reps >= 1 and self.warmup >= 0, "reps", "reps must be >= 1 and warmup >= 0")
        check(self.fill in ("random", "prefill"), "fill", f"{self.fill!r} is not one of random, prefill")
        check(self.engine in ENGINES, "engine", f"{self.engine!r} is not one of {', '.join(ENGINES)}")

    def context_len(self) -> int:
        return self.context

    def protocol(self) -> str:
        return (f"batch {self.batch} x context {self.context}, fill {self.fill}, "
                f"{'CUDA-graph' if self.graphs else 'eager'} decode step, CUDA events, median/p90 of "
                f"{self.reps} after {self.warmup} warm-up")

    def run(self, ctx: TaskContext) -> TaskResult:
        from kvbench.decode import require_cuda

        require_cuda(self.name)
        if self.engine != "kvbench":
            return run_peer(self, ctx)
        return run_kvbench(self, ctx)


def _stats_metrics(prefix: str, stats, batch: int) -> dict[str, float]:
    return {f"{prefix}_ms_p50": stats.median_ms, f"{prefix}_ms_p90": stats.p90_ms,
            f"{prefix}_ms_mean": stats.mean_ms, "tokens_per_s": batch * 1e3 / stats.median_ms}


def run_kvbench(t: DecodeLatency, ctx: TaskContext) -> TaskResult:
    from kvbench import gpu_timing as gt
    from kvbench.decode import DecodeEngine, free_cuda

    lm, notes = ctx.lm, []
    copy_bw = gt.copy_bandwidth()
    engine = DecodeEngine(lm, ctx.method, t.batch, t.context + 16, seed=ctx.seed)
    try:
        engine.fill(t.context, t.fill, chunk=t.prefill_chunk)
        engine.fix_length(t.context + 1)
        notes.append(f"fill: {engine.fill_how}")
        notes.append(f"glue: {engine.glue}")
        captured = t.graphs and engine.capture(advance=False)  # out of memory raises: the cell fails
        if t.graphs and not captured:
            notes.append(f"not captured: {engine.graph_error}")
        stats = gt.time_each(lambda: engine.step(advance=False), t.reps, t.warmup)
        m = _stats_metrics("decode", stats, t.batch)
        m.update(graph=float(captured), batch=t.batch, context=t.context,
                 kv_gb=engine.kv_bytes() / 1e9, copy_tb_s=copy_bw / 1e12)
        engine.graph = None
        if t.attention_alone:
            m.update(_attention_alone(t, ctx, engine, copy_bw, notes))
        notes.append(f"device: {gt.device_name()}")
        return TaskResult(metrics=m, notes=notes)
    finally:
        engine.close()
        engine = None  # the caches go before the allocator is emptied
        free_cuda()


def _attention_alone(t: DecodeLatency, ctx: TaskContext, engine, copy_bw: float, notes: list[str]) -> dict:
    from kvbench import gpu_timing as gt

    g = ctx.lm.geometry
    cache = engine.caches[0]
    gen = torch.Generator(device="cuda")
    gen.manual_seed(ctx.seed + 1)
    q = torch.randn(t.batch, g.num_heads, 1, g.head_dim, device="cuda", dtype=ctx.lm.dtype, generator=gen)
    qpos = torch.full((t.batch, 1), t.context, dtype=torch.long, device="cuda")
    scale = g.head_dim ** -0.5
    nbytes = cache.attention_bytes() if hasattr(cache, "attention_bytes") else cache.nbytes()
    safe = engine.graph_safe
    stats, graphed = gt.bench(lambda: cache.attend(q, qpos, scale), reps=max(t.reps, 50), warmup=t.warmup,
                              graph=t.graphs and safe)
    out = {"attn_ms_p50": stats.median_ms, "attn_ms_p90": stats.p90_ms, "attn_graph": float(graphed),
           "attn_read_mb": nbytes / 1e6, "attn_tb_s": nbytes / (stats.median_ms / 1e3) / 1e12}
    out["attn_frac_copy_bw"] = out["attn_tb_s"] * 1e12 / copy_bw
    # fp16 SDPA at the same shape (context + 1 keys), the reference for the speedup.
    n = t.context + 1
    k = torch.randn(t.batch, g.num_kv_heads, n, g.head_dim, device="cuda", dtype=torch.float16, generator=gen)
    v = torch.randn_like(k)
    qh = q.half()
    gqa = g.num_heads != g.num_kv_heads
    ref, _ = gt.bench(lambda: F.scaled_dot_product_attention(qh, k, v, scale=scale, enable_gqa=gqa),
                      reps=max(t.reps, 50), warmup=t.warmup, graph=t.graphs)
    out["sdpa_fp16_ms_p50"] = ref.median_ms
    out["sdpa_fp16_tb_s"] = 2 * k.numel() * 2 / (ref.median_ms / 1e3) / 1e12
    out["attn_speedup_vs_sdpa"] = ref.median_ms / stats.median_ms
    k = v = None  # free the fp16 reference cache
    # The unfused peer: dequantize everything stored, then SDPA (packed methods only).
    if ctx.method.name != "fp16":
        unfused = _unfused_fn(cache, q, qpos, scale)
        if unfused is None:
            notes.append("unfused path: this cache offers no dequantize-then-SDPA read")
        else:
            try:
                st, _ = gt.bench(unfused, reps=20, warmup=3, graph=False)
                out["unfused_attn_ms_p50"] = st.median_ms
                out["fusion_speedup"] = st.median_ms / stats.median_ms
            except Exception as e:  # an OOM of the fp16 copy, say
                notes.append(f"unfused path failed: {type(e).__name__}")
    return out


def _unfused_fn(cache, q, qpos, scale):
    """Dequantize the whole cache to fp16, then SDPA: the torch read path of kvbench.packed_cache
    (KVBENCH_PACKED_KERNELS=0 semantics), or a cache's own `dequantized()`."""
    import os

    if hasattr(cache, "dequantized"):
        def fn():
            k, v = cache.dequantized()
            return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
        return fn
    if hasattr(cache, "stored_kv") or hasattr(cache, "quantized_kv"):
        def fn():
            old = os.environ.get("KVBENCH_PACKED_KERNELS")
            os.environ["KVBENCH_PACKED_KERNELS"] = "0"
            try:
                return cache.attend(q, qpos, scale)
            finally:
                if old is None:
                    del os.environ["KVBENCH_PACKED_KERNELS"]
                else:
                    os.environ["KVBENCH_PACKED_KERNELS"] = old
        return fn
    return None


# --------------------------------------------------------------------------------------------
# Peer rows: transformers' own caches, run the way users run them.


def _hf_cache(kind: str, model, batch: int, n: int, gen, dtype):
    from transformers import DynamicCache, StaticCache

    cfg = model.config
    h = cfg.num_key_value_heads
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if kind == "hf-dynamic":
        cache = DynamicCache(config=cfg)
    elif kind == "hf-static":
        cache = StaticCache(config=cfg, max_cache_len=n + 64)
    else:
        from transformers import QuantizedCache

        cache = QuantizedCache(backend=_quant_backend(), config=cfg, nbits=2)
    kw = {"cache_position": torch.arange(n, device="cuda")}
    for layer in range(cfg.num_hidden_layers):
        k = torch.randn(batch, h, n, d, device="cuda", dtype=dtype, generator=gen)
        cache.update(k, torch.randn_like(k), layer, cache_kwargs=kw)
        del k
    return cache


def _quant_backend() -> str:
    import importlib.util

    if importlib.util.find_spec("optimum.quanto") is not None:
        return "quanto"
    if importlib.util.find_spec("hqq") is not None:
        return "hqq"  # transformers spells the backends "quanto" and "hqq"
    raise ImportError("neither optimum-quanto nor hqq is installed")


def _quant_settings(cache) -> str:
    """What transformers' QuantizedCache ran with: backend and its version, bits, groups, window."""
    import importlib.metadata as md

    layer = cache.layers[0]
    backend = _quant_backend()
    version = md.version("optimum-quanto" if backend == "quanto" else "hqq")
    return (f"QuantizedCache backend {backend} {version}: {layer.nbits}-bit, groups of {layer.q_group_size}, "
            f"axis key {layer.axis_key} / value {layer.axis_value}, last {layer.residual_length} tokens in fp16")


def run_peer(t: DecodeLatency, ctx: TaskContext) -> TaskResult:
    from kvbench import gpu_timing as gt
    from kvbench.decode import free_cuda

    if ctx.method.name != "fp16":
        return TaskResult(metrics={"skipped": 1.0},
                          notes=[f"peer row {t.engine} runs transformers' own cache: measured with fp16 only"])
    if t.engine == "hf-quantized":
        try:
            _quant_backend()
        except ImportError as e:
            return TaskResult(metrics={"skipped": 1.0},
                              notes=[f"transformers QuantizedCache not run: {e} on this machine"])
    model = ctx.lm.model
    gen = torch.Generator(device="cuda")
    gen.manual_seed(ctx.seed)
    cache = _hf_cache(t.engine, model, t.batch, t.context, gen, ctx.lm.dtype)
    ids = torch.randint(model.config.vocab_size, (t.batch, 1), device="cuda", generator=gen)
    state = {"n": t.context}

    @torch.inference_mode()
    def step():
        n = state["n"]
        model(input_ids=ids, past_key_values=cache, use_cache=True,
              position_ids=torch.full((t.batch, 1), n, device="cuda"),
              cache_position=torch.tensor([n], device="cuda"), logits_to_keep=1)
        if t.engine != "hf-static":  # the static cache keeps its length; the others grow
            state["n"] = n + 1

    reps = min(t.reps, 20)
    try:
        stats = gt.time_each(step, reps, min(t.warmup, 3))
        m = _stats_metrics("decode", stats, t.batch)
        m.update(graph=0.0, batch=t.batch, context=t.context)
        notes = [f"peer row: transformers {t.engine}, eager (uncaptured), "
                 f"cache filled with random fp16 by update(); median of {reps}", f"device: {gt.device_name()}"]
        if t.engine == "hf-quantized":
            notes.append(_quant_settings(cache))
        return TaskResult(metrics=m, notes=notes)
    finally:
        cache = None
        free_cuda()
