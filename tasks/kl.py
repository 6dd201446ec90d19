"""kl: divergence of each method's next-token distribution from the uncompressed model's.

More sensitive than perplexity: a method can keep PPL and still move many predictions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvbench.task import TaskContext, TaskResult
from kvbench.windows import PROTOCOL, WindowedTask, reference_logprobs_path, wikitext_windows, window_logits, window_nll


@dataclass
class KL(WindowedTask):
    name = "kl"
    description = "KL(fp16 || method) of next-token distributions on WikiText-2 windows; top-1 agreement."
    version = 1

    def protocol(self) -> str:
        return PROTOCOL + "; KL(p_uncompressed || p_method) per position, natural log"

    def _reference(self, ctx: TaskContext, index: int, window: torch.Tensor) -> torch.Tensor:
        """Uncompressed log-probs [T, V], cached on disk in fp16 across cells and runs."""
        path = reference_logprobs_path(ctx.lm, self.seq_len, index, window)
        if path.is_file():
            return torch.load(path, weights_only=True).float()
        logprobs = torch.log_softmax(window_logits(ctx.lm, ctx.reference_method, window), dim=-1)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(logprobs.half().cpu(), tmp)
        tmp.replace(path)
        return logprobs.half().float()  # the same rounding as a cached read

    def run(self, ctx: TaskContext) -> TaskResult:
        windows, source = wikitext_windows(ctx.lm, self.seq_len, self.max_windows)
        ctx.progress.start("kl windows", len(windows))
        kls, agree = [], []
        for i, window in enumerate(windows):
            ref = self._reference(ctx, i, window).to(ctx.lm.device)
            logits = window_logits(ctx.lm, ctx.method, window)
            window_nll(ctx.lm, ctx.method, window, logits)  # leaves the NLL for a perplexity cell
            logprobs = torch.log_softmax(logits, dim=-1)
            kl = (ref.exp() * (ref - logprobs)).sum(-1).clamp_min(0)
            kls.append(kl.cpu())
            agree.append((ref.argmax(-1) == logprobs.argmax(-1)).cpu())
            ctx.progress.advance()
        kl_all, agree_all = torch.cat(kls).double(), torch.cat(agree)
        return TaskResult(
            metrics={
                "kl_mean": float(kl_all.mean()),
                "kl_p99": float(torch.quantile(kl_all, 0.99)),
                "top1_agreement": float(agree_all.float().mean()),
                "tokens": kl_all.numel(),
            },
            notes=[f"data: {source}", "reference: uncompressed model log-probs stored in fp16"],
        )
