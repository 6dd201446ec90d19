"""needle: needle in a haystack (Paul Graham essays), depths x context lengths, greedy answers."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from kvbench.data import essays_dir
from kvbench.generate import (
    agreement_metrics,
    axis_label,
    chat_overhead,
    encode_prompt,
    generate_with_reference,
    has_chat_template,
    per_item_agreement,
)
from kvbench.params import check
from kvbench.prompts import DEFAULT_NEEDLE, DEFAULT_QUESTION, NEEDLE_TASK_VERSION, build_needle_prompt
from kvbench.task import Task, TaskContext, TaskResult
from kvbench.textmetrics import needle_scores


def _answer_prefix(needle: str) -> str:
    """The start of the answer the needle gives: "The best thing to do in San Francisco is"."""
    head, sep, _ = needle.partition(" is ")
    return f"{head} is" if sep else ""


@dataclass
class Needle(Task):
    name = "needle"
    description = "Needle in a haystack: a sentence hidden in Paul Graham essays at depths x lengths."
    version = NEEDLE_TASK_VERSION

    contexts: list[int] = field(default_factory=lambda: [1024, 2048, 4096],
                                metadata={"help": "prompt lengths in tokens, chat template included"})
    depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0],
                                metadata={"help": "needle positions in the haystack (0 start, 1 end)"})
    max_new_tokens: int = dataclasses.field(default=32, metadata={"help": "answer budget"})
    batch_size: int = dataclasses.field(default=4, metadata={"help": "prompts decoded together (left padded)"})
    chat: bool = dataclasses.field(default=True, metadata={"help": "wrap in the tokenizer's chat template"})
    answer_prefix: bool = dataclasses.field(
        default=False, metadata={"help": "start the answer with the needle's 'X is' (for weaker models)"})

    def __post_init__(self) -> None:
        check(bool(self.contexts) and all(c >= 256 for c in self.contexts), "contexts", "need lengths >= 256")
        check(bool(self.depths) and all(0.0 <= d <= 1.0 for d in self.depths), "depths", "need depths in [0, 1]")
        check(self.max_new_tokens >= 1, "max_new_tokens", "must be at least 1")
        check(self.batch_size >= 1, "batch_size", "must be at least 1")

    def context_len(self) -> int:
        return max(self.contexts)

    def protocol(self) -> str:
        return ("Needle in a haystack (Kamradt): the default San Francisco needle at each depth of "
                f"a Paul Graham essay haystack, prompts of {', '.join(map(str, self.contexts))} "
                f"tokens{' in the chat template' if self.chat else ''}"
                f"{', answer started with the needle subject' if self.answer_prefix else ''}; greedy "
                f"up to {self.max_new_tokens} tokens; exact_match = the needle's answer phrase in "
                "the output, partial_match = share of its content words; fp16 agreement of tokens.")

    def run(self, ctx: TaskContext) -> TaskResult:
        tok = ctx.lm.tokenizer
        chat = self.chat and has_chat_template(tok)
        prefix = (" " if not chat else "") + _answer_prefix(DEFAULT_NEEDLE) if self.answer_prefix else ""
        overhead = chat_overhead(tok, chat, prefix)
        essays = essays_dir()
        cells, prompts, expected = [], [], []
        for c in self.contexts:
            for d in self.depths:
                text, answer = build_needle_prompt(tok, essays, c - overhead, d, DEFAULT_NEEDLE, DEFAULT_QUESTION)
                cells.append((c, d))
                prompts.append(encode_prompt(tok, text, chat, prefix))
                expected.append(answer)
        gens, reference = generate_with_reference(
            ctx, prompts, max_new_tokens=self.max_new_tokens, batch_size=self.batch_size,
            tag="needle", description="needle prompts",
        )
        agree = per_item_agreement(gens, reference)
        metrics: dict[str, float] = {}
        exact, partial = [], []
        for i, ((c, d), g, ans) in enumerate(zip(cells, gens, expected)):
            s = needle_scores(f"{prefix} {g.text}" if prefix else g.text, ans)  # words never glued
            key = f"depth{axis_label(d)}.ctx{c}"
            metrics[f"{key}.exact_match"] = float(s["exact"])
            metrics[f"{key}.partial_match"] = s["partial"]
            if agree is not None:
                metrics[f"{key}.first_divergence"] = float(agree[i]["first_divergence"])
            exact.append(s["exact"])
            partial.append(s["partial"])
        for c in self.contexts:
            idx = [i for i, cell in enumerate(cells) if cell[0] == c]
            metrics[f"ctx{c}.exact_match"] = sum(exact[i] for i in idx) / len(idx)
        summary = {
            "exact_match": sum(exact) / len(exact),
            "partial_match": sum(partial) / len(partial),
            **agreement_metrics(gens, reference),
            "samples": len(prompts),
            "prompt_tokens": sum(len(p) for p in prompts) / len(prompts),
        }
        example = gens[0].text.strip().replace("\n", " ")[:120]
        return TaskResult(metrics={**summary, **metrics},
                          notes=[f"data: {essays}", f"first answer ({cells[0][1]} depth, {cells[0][0]} tokens): {prefix}{example}"])
