"""max_batch: the largest batch that completes prefill of `prompt_len` tokens plus
`decode_steps` decode steps on this GPU, and decode throughput at that batch.

Search: batch 1, 2, 4, ... until one fails with out-of-memory, then bisection between the last
that fit and the first that did not (each OOM caught, references dropped, gc and
torch.cuda.empty_cache before the next try). One try at batch B:

1. the method's caches for B rows, preallocated for prompt_len + decode_steps tokens per row
   where the cache can preallocate;
2. filled to prompt_len + decode_steps - probe_steps tokens per row (random codes and scales /
   fp16 values written directly: the bytes a real prefill would leave, without its compute);
3. the prefill's own working memory: a real forward of `micro_batch` rows x prompt_len random ids
   through the model with attention over those tokens only (storing nothing): prefill done in
   micro-batches of that many rows writes each micro-batch's K/V into the batch's caches, so its
   peak is the caches plus one micro-batch's activations, which this reproduces;
4. `probe_steps` real decode steps (eager), ending at prompt_len + decode_steps tokens per row.

Then throughput at the found batch: a CUDA-graph decode step at the middle of the decode
(prompt_len + decode_steps / 2 tokens), tokens/s = B / median step time (a step's cost is linear
in the context, so this is the average over the whole decode). If the step or its capture does not
fit at the found batch, the batch is lowered until both do, and that batch is reported: a step
timed uncaptured (`throughput_graph` 0) only where capture failed for a reason other than memory.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kvbench.method import KVMethod, LayerCache
from kvbench.params import check
from kvbench.task import Task, TaskContext, TaskResult

_F = dataclasses.field


def search_max(fits: Callable[[int], bool], start: int = 1, limit: int = 4096) -> tuple[int, list[tuple[int, bool]]]:
    """Largest b in [start, limit] with fits(b) (assumed monotone), by doubling then bisection.

    Returns (best, trials); best is 0 when even `start` does not fit, `limit` when it does.
    """
    trials: list[tuple[int, bool]] = []

    def test(b: int) -> bool:
        ok = fits(b)
        trials.append((b, ok))
        return ok

    lo, hi, b = 0, None, start
    while True:
        if test(b):
            lo = b
            if b >= limit:
                return lo, trials
            b = min(2 * b, limit)
        else:
            hi = b
            break
    if lo == 0:
        return 0, trials
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if test(mid):
            lo = mid
        else:
            hi = mid
    return lo, trials


def lower_until_fits(best: int, attempt: Callable[[int], object]) -> tuple[int, object] | None:
    """(b, attempt(b)) for the largest b <= best whose attempt raises no out-of-memory error,
    lowering b by 2% a try; None when not even b = 1 fits. Other errors propagate."""
    from kvbench.decode import is_oom

    b = best
    while b >= 1:
        try:
            return b, attempt(b)
        except Exception as e:
            if not is_oom(e):
                raise
            b -= max(1, b // 50)
    return None


class _NoStoreCache(LayerCache):
    """Attention over the forward's own tokens only, storing nothing (prefill working memory)."""

    def append(self, new) -> None:
        self.k, self.v = new.k, new.v

    def attend(self, q, q_positions, scaling):
        import torch.nn.functional as F

        out = F.scaled_dot_product_attention(q, self.k, self.v, is_causal=True, scale=scaling,
                                             enable_gqa=q.shape[1] != self.k.shape[1])
        self.k = self.v = None
        return out


@dataclass
class _NoStore(KVMethod):
    name = "no-store"

    def new_cache(self, layer_idx, geometry):
        return _NoStoreCache()

    def avg_bits(self, geometry, context_len):
        return 16.0


@dataclass
class MaxBatch(Task):
    name = "max_batch"
    description = "Largest batch fitting prompt + decode on the GPU (doubling, bisection), and tokens/s there."
    version = 1
    requires_cuda = True

    prompt_len: int = _F(default=4096, metadata={"help": "prompt tokens per row"})
    decode_steps: int = _F(default=256, metadata={"help": "decode steps after the prompt"})
    micro_batch: int = _F(default=1, metadata={"help": "rows per prefill micro-batch (working-memory probe)"})
    probe_steps: int = _F(default=4, metadata={"help": "real decode steps per try (the last ones)"})
    limit: int = _F(default=4096, metadata={"help": "largest batch tried"})
    throughput: bool = _F(default=True, metadata={"help": "time decode at the found batch"})
    reps: int = _F(default=30, metadata={"help": "timed steps for throughput"})

    def __post_init__(self) -> None:
        check(self.prompt_len >= 1, "prompt_len", f"{self.prompt_len} must be at least 1")
        check(self.decode_steps >= 1, "decode_steps", f"{self.decode_steps} must be at least 1")
        check(1 <= self.probe_steps <= self.decode_steps, "probe_steps", "must be in [1, decode_steps]")
        check(self.micro_batch >= 1, "micro_batch", "must be at least 1")
        check(self.limit >= 1, "limit", "must be at least 1")

    def context_len(self) -> int:
        return self.prompt_len + self.decode_steps

    def protocol(self) -> str:
        return (f"largest batch for {self.prompt_len} prompt + {self.decode_steps} decode tokens: doubling then "
                f"bisection, caches filled directly, prefill working memory of {self.micro_batch}-row micro-batches, "
                f"{self.probe_steps} real decode steps per try; tokens/s from a CUDA-graph step at mid-decode")

    def run(self, ctx: TaskContext) -> TaskResult:
        from kvbench import gpu_timing as gt
        from kvbench.decode import DecodeEngine, free_cuda, is_oom, require_cuda
        from kvbench.session import KVSession

        require_cuda(self.name)
        lm = ctx.lm
        total = self.prompt_len + self.decode_steps
        gen = torch.Generator(device="cuda")
        gen.manual_seed(ctx.seed)
        prompt = torch.randint(lm.model.config.vocab_size, (self.micro_batch, self.prompt_len), device="cuda",
                               generator=gen)
        prompt_pos = torch.arange(self.prompt_len, device="cuda").expand(self.micro_batch, -1)
        peaks: dict[int, float] = {}
        fill_how = ["", ""]  # how the cache was filled, which glue the steps took

        def fits(b: int) -> bool:
            engine = None
            try:
                torch.cuda.reset_peak_memory_stats()
                engine = DecodeEngine(lm, ctx.method, b, total, seed=ctx.seed)
                engine.fill(total - self.probe_steps, "random")
                fill_how[:] = [engine.fill_how, engine.glue]
                lm.forward(KVSession(_NoStore(), lm.geometry), prompt, prompt_pos, logits_to_keep=1)
                for _ in range(self.probe_steps):
                    engine.step(advance=True)
                torch.cuda.synchronize()
                peaks[b] = torch.cuda.max_memory_allocated() / 1e9
                return True
            except Exception as e:
                if not is_oom(e):
                    raise
                return False
            finally:
                if engine is not None:
                    engine.close()
                del engine
                free_cuda()

        best, trials = search_max(fits, 1, self.limit)
        m = {"max_batch": float(best), "tries": float(len(trials)), "peak_alloc_gb_at_max": peaks.get(best, 0.0),
             "device_total_gb": torch.cuda.get_device_properties(0).total_memory / 1e9}
        notes = ["tries: " + ", ".join(f"{b}{'+' if ok else '-'}" for b, ok in trials), f"fill: {fill_how[0]}",
                 f"glue: {fill_how[1]}", f"device: {gt.device_name()}"]
        if best == self.limit:
            notes.append(f"reached the search limit {self.limit}: the real maximum may be larger")
        if self.throughput and best > 0:
            m.update(self._throughput(ctx, best, notes))
        return TaskResult(metrics=m, notes=notes)

    def _throughput(self, ctx: TaskContext, best: int, notes: list[str]) -> dict:
        from kvbench import gpu_timing as gt
        from kvbench.decode import DecodeEngine, free_cuda

        total = self.prompt_len + self.decode_steps
        mid = self.prompt_len + self.decode_steps // 2

        def attempt(b: int):
            engine = None
            try:
                engine = DecodeEngine(ctx.lm, ctx.method, b, total + 16, seed=ctx.seed)
                engine.fill(mid, "random")
                engine.fix_length(mid + 1)
                engine.capture(advance=False)  # out of memory raises: the batch is lowered
                return gt.time_each(lambda: engine.step(advance=False), self.reps, 3), engine.graph_error
            finally:
                if engine is not None:
                    engine.close()
                engine = None  # drop the caches before the allocator is emptied
                free_cuda()

        found = lower_until_fits(best, attempt)
        if found is None:
            notes.append("throughput not measured: no batch fit its decode step and the step's capture")
            return {}
        b, (stats, graph_error) = found
        if graph_error:  # a capture that failed for another reason: timed eager, and said so
            notes.append(f"throughput step not captured: {graph_error}")
        if b != best:
            notes.append(f"throughput measured at batch {b}: the step or its capture at {best} ran out of memory")
        return {"throughput_batch": float(b), "throughput_step_ms_p50": stats.median_ms,
                "throughput_step_ms_p90": stats.p90_ms, "throughput_tok_s": b * 1e3 / stats.median_ms,
                "throughput_graph": float(graph_error is None)}
