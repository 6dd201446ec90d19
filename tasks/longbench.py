"""longbench: English LongBench v1 subsets with the official prompts, lengths and metrics."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from kvbench.generate import (
    agreement_metrics,
    encode_prompt,
    generate_with_reference,
    has_chat_template,
)
from kvbench.longbench_data import (
    LONGBENCH_NO_CHAT_TEMPLATE,
    LONGBENCH_TASK_VERSION,
    load_longbench,
    longbench_prompt,
    truncate_middle,
)
from kvbench.params import check
from kvbench.task import Task, TaskContext, TaskResult
from kvbench.textmetrics import LONGBENCH_DATASET2MAXLEN, LONGBENCH_METRICS, longbench_score

ENGLISH = tuple(LONGBENCH_METRICS)  # the 16 English datasets


@dataclass
class LongBench(Task):
    name = "longbench"
    description = "LongBench v1 English subsets: official prompts, middle truncation, official metrics."
    version = LONGBENCH_TASK_VERSION

    datasets: list[str] = field(default_factory=lambda: list(ENGLISH),
                                metadata={"help": "LongBench v1 English dataset names"})
    limit: int | None = dataclasses.field(default=None, metadata={"help": "first N samples per dataset (null: all)"})
    max_length: int = dataclasses.field(
        default=3500, metadata={"help": "prompt tokens kept (middle truncation, as the official pred.py)"})
    max_new_tokens: int | None = dataclasses.field(
        default=None, metadata={"help": "cap on the official generation lengths (null: official)"})
    batch_size: int = dataclasses.field(default=2, metadata={"help": "prompts decoded together (left padded)"})
    chat: bool = dataclasses.field(
        default=True, metadata={"help": "chat template except on trec/triviaqa/samsum/lsht/lcc/repobench-p"})
    data_dir: str | None = dataclasses.field(
        default=None, metadata={"help": "folder holding longbench/<dataset>.jsonl (null: the data folder)"})

    def __post_init__(self) -> None:
        check(bool(self.datasets), "datasets", "give at least one dataset")
        for name in self.datasets:
            check(name in LONGBENCH_METRICS, "datasets", f"{name!r} is not one of {', '.join(ENGLISH)}")
        check(self.limit is None or self.limit >= 1, "limit", "must be at least 1 or null")
        check(self.max_length >= 64, "max_length", f"{self.max_length} must be at least 64")
        check(self.batch_size >= 1, "batch_size", "must be at least 1")
        check(self.max_new_tokens is None or self.max_new_tokens >= 1, "max_new_tokens", "must be at least 1 or null")

    def new_tokens(self, dataset: str) -> int:
        official = LONGBENCH_DATASET2MAXLEN[dataset]
        return official if self.max_new_tokens is None else min(official, self.max_new_tokens)

    def context_len(self) -> int:
        return self.max_length

    def protocol(self) -> str:
        return ("LongBench v1 (English subsets): official prompt templates, prompts middle-truncated to "
                f"{self.max_length} tokens, official generation lengths"
                f"{'' if self.max_new_tokens is None else f' capped at {self.max_new_tokens}'}, greedy, official metrics "
                "(score x 100 per dataset; longbench_score is their mean); fp16 agreement of tokens.")

    def run(self, ctx: TaskContext) -> TaskResult:
        tok = ctx.lm.tokenizer
        metrics: dict[str, float] = {}
        scores, all_gens, all_refs, notes = [], [], [], []
        n_total = 0
        for name in self.datasets:
            samples = load_longbench(name, self.data_dir, self.limit)
            if not samples:
                raise ValueError(f"LongBench {name!r}: no samples")
            chat = self.chat and has_chat_template(tok) and name not in LONGBENCH_NO_CHAT_TEMPLATE
            # Truncate the text so that the prompt, chat template included, fits max_length.
            budget = self.max_length - len(encode_prompt(tok, "", chat))
            prompts = [encode_prompt(tok, truncate_middle(tok, longbench_prompt(s, name), budget), chat)
                       for s in samples]
            stop = ("\n",) if name == "samsum" else ()  # pred.py stops samsum at a newline
            gens, reference = generate_with_reference(
                ctx, prompts, max_new_tokens=self.new_tokens(name), stop=stop,
                batch_size=self.batch_size, tag=f"longbench-{name}", description=f"longbench {name}",
            )
            score = longbench_score(name, [g.text for g in gens], [s["answers"] for s in samples],
                                    samples[0].get("all_classes"))
            metrics[f"{name}.longbench_score"] = score
            metrics[f"{name}.samples"] = len(samples)
            for k, v in agreement_metrics(gens, reference).items():
                metrics[f"{name}.{k}"] = v
            scores.append(score)
            all_gens += gens
            if reference is not None:
                all_refs += reference
            n_total += len(samples)
            notes.append(f"{name}: {len(samples)} samples, {sum(len(p) for p in prompts) / len(prompts):.0f} prompt tokens on average")
        summary = {
            "longbench_score": sum(scores) / len(scores),
            **agreement_metrics(all_gens, all_refs if len(all_refs) == len(all_gens) else None),
            "samples": n_total,
        }
        return TaskResult(metrics={**summary, **metrics}, notes=notes)
