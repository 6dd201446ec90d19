"""perplexity: WikiText-2 test perplexity through the compressed cache."""

from __future__ import annotations

import math
from dataclasses import dataclass

from kvbench.task import TaskContext, TaskResult
from kvbench.windows import WindowedTask, wikitext_windows, window_nll


@dataclass
class Perplexity(WindowedTask):
    name = "perplexity"
    description = "WikiText-2 test perplexity, non-overlapping windows, K/V compressed before attention."
    version = 1

    def run(self, ctx: TaskContext) -> TaskResult:
        windows, source = wikitext_windows(ctx.lm, self.seq_len, self.max_windows)
        ctx.progress.start("perplexity windows", len(windows))
        nll_sum, count, reused = 0.0, 0, 0
        for window in windows:
            nll, was_reused = window_nll(ctx.lm, ctx.method, window)
            nll_sum += nll
            reused += was_reused
            count += window.numel() - 1
            ctx.progress.advance()
        mean = nll_sum / count
        notes = [f"data: {source}"]
        if reused:
            notes.append(f"NLL of {reused} windows reused from this run's kl pass of the same method")
        return TaskResult(
            metrics={"ppl": math.exp(mean), "nll": mean, "tokens": count, "windows": len(windows)},
            notes=notes,
        )
