"""peak_memory: peak GPU memory at batch x context, split into weights, KV storage and the rest.

Protocol: after gc and empty_cache, the allocator's peak is reset; `weights` is the bytes of the
model's parameters; the method's caches are made for `batch` rows with room for context +
decode_steps tokens, filled to `context` tokens (`fill: random`: random codes and scales / fp16
written directly; `fill: prefill`: a real prefill of random ids in chunks of `prefill_chunk`
tokens per row), then `decode_steps` decode steps run (eager). `kv` is what the caches report
holding (`nbytes()`, at their allocated capacity), cross-checked against the allocator: the
growth of allocated memory from before the caches existed to after the fill (`kv_alloc_gb`,
and their ratio). `other` = peak allocated - memory allocated before the caches - kv (activations,
workspaces). NVML's device-wide figure (all of this process's memory, the CUDA context
included) is reported beside the allocator's peak reserved.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from kvbench.params import check
from kvbench.task import Task, TaskContext, TaskResult

_F = dataclasses.field
GB = 1e9


@dataclass
class PeakMemory(Task):
    name = "peak_memory"
    description = "Peak GPU memory at batch x context: weights, KV storage (cross-checked), the rest; NVML beside."
    version = 1
    requires_cuda = True

    batch: int = _F(default=8, metadata={"help": "rows"})
    context: int = _F(default=8192, metadata={"help": "tokens per row in the cache"})
    decode_steps: int = _F(default=16, metadata={"help": "decode steps after the fill"})
    fill: str = _F(default="random", metadata={"choices": ("random", "prefill"), "help": "how the cache is filled"})
    prefill_chunk: int = _F(default=1024, metadata={"help": "tokens per row per prefill forward (fill: prefill)"})

    def __post_init__(self) -> None:
        check(self.batch >= 1, "batch", f"{self.batch} must be at least 1")
        check(self.context >= 1, "context", f"{self.context} must be at least 1")
        check(self.decode_steps >= 0, "decode_steps", "must be >= 0")
        check(self.fill in ("random", "prefill"), "fill", f"{self.fill!r} is not one of random, prefill")

    def context_len(self) -> int:
        return self.context

    def protocol(self) -> str:
        return (f"batch {self.batch} x context {self.context} ({self.fill} fill) + {self.decode_steps} decode "
                "steps; torch allocator peaks, caches' nbytes() cross-checked with allocator growth, NVML used")

    def run(self, ctx: TaskContext) -> TaskResult:
        from kvbench import gpu_timing as gt
        from kvbench.decode import DecodeEngine, free_cuda, require_cuda
        from kvbench.speed_models import weight_bytes

        require_cuda(self.name)
        lm = ctx.lm
        free_cuda()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        weights = weight_bytes(lm.model)
        engine = DecodeEngine(lm, ctx.method, self.batch, self.context + self.decode_steps, seed=ctx.seed)
        try:
            engine.fill(self.context, self.fill, chunk=self.prefill_chunk)
            torch.cuda.synchronize()
            after_fill = torch.cuda.memory_allocated()
            for _ in range(self.decode_steps):
                engine.step(advance=True)
            torch.cuda.synchronize()
            kv = engine.kv_bytes()
            used_kv = sum(c.used_nbytes() for c in engine.caches if hasattr(c, "used_nbytes"))
            peak = torch.cuda.max_memory_allocated()
            reserved = torch.cuda.max_memory_reserved()
            nvml = gt.nvml_used_bytes()
            tokens = self.batch * (self.context + self.decode_steps)
            m = {
                "weights_gb": weights / GB,
                "kv_gb": kv / GB,
                "kv_alloc_gb": (after_fill - base) / GB,
                "kv_nbytes_over_alloc": kv / max(after_fill - base, 1),
                "other_gb": (peak - base - kv) / GB,
                "resident_before_gb": base / GB,
                "peak_alloc_gb": peak / GB,
                "peak_reserved_gb": reserved / GB,
                "kv_bytes_per_token": kv / tokens,
                "kv_bits_per_element": 8 * kv / (tokens * 2 * lm.geometry.num_layers * lm.geometry.kv_channels),
            }
            if used_kv:
                m["kv_used_gb"] = used_kv / GB
            if nvml is not None:
                m["nvml_used_gb"] = nvml / GB
            notes = [f"fill: {engine.fill_how}", f"glue: {engine.glue}", f"device: {gt.device_name()}",
                     "kv counts the caches' allocated capacity (context + decode_steps tokens per row)"]
            if nvml is None:
                notes.append("NVML figure missing: nvidia-ml-py not importable")
            return TaskResult(metrics=m, notes=notes)
        finally:
            engine.close()
            del engine
            free_cuda()
