"""perplexity: WikiText-2 test perplexity through the compressed cache."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvbench.params import check
from kvbench.task import Task, TaskContext, TaskResult
from kvbench.windows import PROTOCOL, wikitext_windows, window_logits


@dataclass
class Perplexity(Task):
    name = "perplexity"
    description = "WikiText-2 test perplexity, non-overlapping windows, K/V compressed before attention."
    version = 1

    seq_len: int = dataclasses.field(default=1024, metadata={"help": "tokens per window"})
    max_windows: int | None = dataclasses.field(default=None, metadata={"help": "windows to evaluate (null: all)"})

    def __post_init__(self) -> None:
        check(self.seq_len >= 2, "seq_len", f"{self.seq_len} must be at least 2")
        check(self.max_windows is None or self.max_windows >= 1, "max_windows", "must be at least 1 or null")

    def context_len(self) -> int:
        return self.seq_len

    def protocol(self) -> str:
        return PROTOCOL

    def run(self, ctx: TaskContext) -> TaskResult:
        windows, source = wikitext_windows(ctx.lm, self.seq_len, self.max_windows)
        ctx.progress.start("perplexity windows", len(windows))
        nll_sum, count = 0.0, 0
        for window in windows:
            logits = window_logits(ctx.lm, ctx.method, window)
            nll = F.cross_entropy(logits[:-1], window[1:].to(logits.device), reduction="sum")
            nll_sum += float(nll)
            count += window.numel() - 1
            ctx.progress.advance()
        mean = nll_sum / count
        return TaskResult(
            metrics={"ppl": math.exp(mean), "nll": mean, "tokens": count, "windows": len(windows)},
            notes=[f"data: {source}"],
        )
