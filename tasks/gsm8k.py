"""gsm8k: 8-shot chain-of-thought GSM8K, greedy decoding through the compressed cache."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from kvbench.data import gsm8k_rows
from kvbench.generate import agreement_metrics, encode_prompt, generate_with_reference
from kvbench.params import check
from kvbench.prompts import GSM8K_TASK_VERSION, gsm8k_prompt
from kvbench.task import Task, TaskContext, TaskResult
from kvbench.textmetrics import extract_gsm8k_answer, gsm8k_exact_match, normalize_number

# Generation ends where a base model would start the next exemplar.
GSM8K_STOP = ("\n\nQ:", "\nQ:")
# SmolLM2 tokens of the 8-shot prompt of an average test question (796 on the first 10).
GSM8K_PROMPT_TOKENS = 800


@dataclass
class GSM8K(Task):
    name = "gsm8k"
    description = "GSM8K test, 8-shot chain of thought (Wei et al.), greedy, exact match of the final number."
    version = GSM8K_TASK_VERSION

    limit: int | None = dataclasses.field(default=100, metadata={"help": "first N test problems (null: all 1319)"})
    batch_size: int = dataclasses.field(default=8, metadata={"help": "prompts decoded together (left padded)"})
    max_new_tokens: int = dataclasses.field(default=256, metadata={"help": "generation budget per problem"})

    def __post_init__(self) -> None:
        check(self.limit is None or self.limit >= 1, "limit", "must be at least 1 or null")
        check(self.batch_size >= 1, "batch_size", f"{self.batch_size} must be at least 1")
        check(self.max_new_tokens >= 1, "max_new_tokens", f"{self.max_new_tokens} must be at least 1")

    def context_len(self) -> int:
        # The 8-shot prompt plus half the generation budget: where the KV cache sits on average.
        return GSM8K_PROMPT_TOKENS + self.max_new_tokens // 2

    def protocol(self) -> str:
        limit = "all" if self.limit is None else f"the first {self.limit}"
        return (f"GSM8K test ({limit} problems), 8-shot CoT prompt of Wei et al. (lm-eval gsm8k-cot "
                f"layout), greedy decoding up to {self.max_new_tokens} new tokens stopped at a new "
                "'Q:', answer = first number after 'The answer is' else the last number, exact "
                f"match of the number; batch {self.batch_size} with left padding; fp16 agreement = "
                "share of generations token-identical to the fp16 cache's.")

    def run(self, ctx: TaskContext) -> TaskResult:
        rows, source = gsm8k_rows("test")
        rows = rows[: self.limit] if self.limit is not None else rows
        targets = [normalize_number(r["answer"].split("####")[-1]) for r in rows]
        tok = ctx.lm.tokenizer
        prompts = [encode_prompt(tok, gsm8k_prompt(r["question"])) for r in rows]
        gens, reference = generate_with_reference(
            ctx, prompts, max_new_tokens=self.max_new_tokens, stop=GSM8K_STOP,
            batch_size=self.batch_size, tag="gsm8k", description="gsm8k problems",
        )
        correct = [gsm8k_exact_match(extract_gsm8k_answer(g.text), t) for g, t in zip(gens, targets)]
        metrics = {
            "accuracy": sum(correct) / len(correct),
            **agreement_metrics(gens, reference),
            "samples": len(rows),
            "prompt_tokens": sum(len(p) for p in prompts) / len(prompts),
            "generated_len": sum(len(g.tokens) for g in gens) / len(gens),
            "hit_length_limit": sum(g.stop_reason == "length" for g in gens) / len(gens),
        }
        return TaskResult(metrics=metrics, notes=[f"data: {source}"])
