"""perplexity: WikiText-2 test perplexity through the compressed cache."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch.nn.functional as F

from kvbench.task import TaskContext, TaskResult
from kvbench.windows import WindowedTask, wikitext_windows, window_logits


@dataclass
class Perplexity(WindowedTask):
    name = "perplexity"
    description = "WikiText-2 test perplexity, non-overlapping windows, K/V compressed before attention."
    version = 1

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
