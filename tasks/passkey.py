"""passkey: a random 5-digit pass key hidden in repeated filler text (Mohtashami & Jaggi 2023)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from kvbench.generate import (
    agreement_metrics,
    axis_label,
    encode_prompt,
    generate_with_reference,
    per_item_agreement,
)
from kvbench.params import check
from kvbench.prompts import PASSKEY_TASK_VERSION, build_passkey_prompt, random_passkey
from kvbench.task import Task, TaskContext, TaskResult
from kvbench.textmetrics import passkey_correct


@dataclass
class Passkey(Task):
    name = "passkey"
    description = "Passkey retrieval: a 5-digit key in filler text at depths x lengths."
    version = PASSKEY_TASK_VERSION

    lengths: list[int] = field(default_factory=lambda: [1024, 2048, 4096],
                               metadata={"help": "prompt lengths in tokens"})
    depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0],
                                metadata={"help": "key positions in the filler (0 start, 1 end)"})
    samples: int = dataclasses.field(default=1, metadata={"help": "keys per (length, depth) cell"})
    max_new_tokens: int = dataclasses.field(default=8, metadata={"help": "answer budget"})
    batch_size: int = dataclasses.field(default=4, metadata={"help": "prompts decoded together (left padded)"})

    def __post_init__(self) -> None:
        check(bool(self.lengths) and all(n >= 128 for n in self.lengths), "lengths", "need lengths >= 128")
        check(bool(self.depths) and all(0.0 <= d <= 1.0 for d in self.depths), "depths", "need depths in [0, 1]")
        check(self.samples >= 1, "samples", "must be at least 1")
        check(self.max_new_tokens >= 1, "max_new_tokens", "must be at least 1")
        check(self.batch_size >= 1, "batch_size", "must be at least 1")

    def context_len(self) -> int:
        return max(self.lengths)

    def protocol(self) -> str:
        return ("Passkey retrieval (Landmark Attention prompt, raw completion after 'The pass key "
                f"is'): {self.samples} random 5-digit key(s) per cell (keys from the run seed), "
                f"lengths {', '.join(map(str, self.lengths))} tokens; greedy up to "
                f"{self.max_new_tokens} tokens; correct = first 5+-digit number is the key; fp16 "
                "agreement of tokens.")

    def run(self, ctx: TaskContext) -> TaskResult:
        tok = ctx.lm.tokenizer
        cells, prompts, keys = [], [], []
        index = 0
        for n in self.lengths:
            for d in self.depths:
                for _ in range(self.samples):
                    key = random_passkey(ctx.seed, index)
                    index += 1
                    text, _ = build_passkey_prompt(tok, n, d, key)
                    cells.append((n, d))
                    prompts.append(encode_prompt(tok, text))
                    keys.append(key)
        gens, reference = generate_with_reference(
            ctx, prompts, max_new_tokens=self.max_new_tokens, batch_size=self.batch_size,
            tag="passkey", description="passkey prompts",
        )
        agree = per_item_agreement(gens, reference)
        correct = [float(passkey_correct(g.text, k)) for g, k in zip(gens, keys)]
        metrics: dict[str, float] = {}
        for n in self.lengths:
            for d in self.depths:
                idx = [i for i, cell in enumerate(cells) if cell == (n, d)]
                key = f"depth{axis_label(d)}.ctx{n}"
                metrics[f"{key}.accuracy"] = sum(correct[i] for i in idx) / len(idx)
                if agree is not None:
                    metrics[f"{key}.first_divergence"] = sum(agree[i]["first_divergence"] for i in idx) / len(idx)
            idx = [i for i, cell in enumerate(cells) if cell[0] == n]
            metrics[f"ctx{n}.accuracy"] = sum(correct[i] for i in idx) / len(idx)
        summary = {
            "accuracy": sum(correct) / len(correct),
            **agreement_metrics(gens, reference),
            "samples": len(prompts),
            "prompt_tokens": sum(len(p) for p in prompts) / len(prompts),
        }
        example = gens[0].text.strip().replace("\n", " ")[:80]
        return TaskResult(metrics={**summary, **metrics},
                          notes=[f"first answer (key {keys[0]}): {example!r}"])
