"""Prompt builders for the generation tasks: GSM8K 8-shot CoT, needle in a haystack, passkey.

Everything here is pure text work: no model is loaded. Token budgets are met with any tokenizer
object that has `encode(text, add_special_tokens=False) -> list[int]` and `decode(ids) -> str`
(a Hugging Face tokenizer, or a stub in tests).

Bump a task's `*_TASK_VERSION` whenever a change here would change the prompt text, so results
recorded under the old prompts are never compared with new ones.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Protocol

from kvbench.textmetrics import normalize_number

GSM8K_TASK_VERSION = 1
NEEDLE_TASK_VERSION = 1
PASSKEY_TASK_VERSION = 1


class Tokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


def _n_tokens(tokenizer: Tokenizer, text: str) -> int:
    return len(tokenizer.encode(text, add_special_tokens=False))


# --------------------------------------------------------------------------------------------
# GSM8K, 8-shot chain of thought
# --------------------------------------------------------------------------------------------

# The eight exemplars of Wei et al. 2022 ("Chain-of-Thought Prompting Elicits Reasoning in Large
# Language Models", Table 20), word for word as lm-evaluation-harness `gsm8k-cot` ships them.
GSM8K_COT_EXEMPLARS: tuple[tuple[str, str], ...] = (
    (
        "There are 15 trees in the grove. Grove workers will plant trees in the grove today. "
        "After they are done, there will be 21 trees. How many trees did the grove workers "
        "plant today?",
        "There are 15 trees originally. Then there were 21 trees after some more were planted. "
        "So there must have been 21 - 15 = 6. The answer is 6.",
    ),
    (
        "If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in "
        "the parking lot?",
        "There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5. The answer is 5.",
    ),
    (
        "Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they "
        "have left in total?",
        "Originally, Leah had 32 chocolates. Her sister had 42. So in total they had 32 + 42 = "
        "74. After eating 35, they had 74 - 35 = 39. The answer is 39.",
    ),
    (
        "Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. How "
        "many lollipops did Jason give to Denny?",
        "Jason started with 20 lollipops. Then he had 12 after giving some to Denny. So he gave "
        "Denny 20 - 12 = 8. The answer is 8.",
    ),
    (
        "Shawn has five toys. For Christmas, he got two toys each from his mom and dad. How "
        "many toys does he have now?",
        "Shawn started with 5 toys. If he got 2 toys each from his mom and dad, then that is 4 "
        "more toys. 5 + 4 = 9. The answer is 9.",
    ),
    (
        "There were nine computers in the server room. Five more computers were installed each "
        "day, from monday to thursday. How many computers are now in the server room?",
        "There were originally 9 computers. For each of 4 days, 5 more computers were added. So "
        "5 * 4 = 20 computers were added. 9 + 20 is 29. The answer is 29.",
    ),
    (
        "Michael had 58 golf balls. On tuesday, he lost 23 golf balls. On wednesday, he lost 2 "
        "more. How many golf balls did he have at the end of wednesday?",
        "Michael started with 58 golf balls. After losing 23 on tuesday, he had 58 - 23 = 35. "
        "After losing 2 more, he had 35 - 2 = 33 golf balls. The answer is 33.",
    ),
    (
        "Olivia has $23. She bought five bagels for $3 each. How much money does she have left?",
        "Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. So she "
        "has 23 - 15 dollars left. 23 - 15 is 8. The answer is 8.",
    ),
)

# The few-shot block is fixed, so build it once.
_GSM8K_FEWSHOT = "".join(f"Q: {q}\nA: {a}\n\n" for q, a in GSM8K_COT_EXEMPLARS)


def gsm8k_prompt(question: str) -> str:
    """The 8-shot CoT prompt: eight "Q: ...\\nA: ...\\n\\n" blocks, then "Q: {question}\\nA:"."""
    return f"{_GSM8K_FEWSHOT}Q: {question.strip()}\nA:"


def load_gsm8k(data_dir: str | Path, split: str = "test", limit: int | None = None) -> list[dict]:
    """GSM8K rows from `<data_dir>/gsm8k/<split>.jsonl` as dicts with question, answer_text, target.

    `target` is the number after "####" in normalised form (`textmetrics.normalize_number`).
    """
    path = Path(data_dir) / "gsm8k" / f"{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"GSM8K split {split!r} not found at {path}")
    rows: list[dict] = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            if limit is not None and len(rows) >= limit:
                break
            obj = json.loads(line)
            answer = obj["answer"]
            target = normalize_number(answer.split("####")[-1])
            if target is None:
                raise ValueError(f"{path}: no number after '####' in {answer[-80:]!r}")
            rows.append({"question": obj["question"], "answer_text": answer, "target": target})
    return rows


# --------------------------------------------------------------------------------------------
# Needle in a haystack (Kamradt 2023, Paul Graham essays as the haystack)
# --------------------------------------------------------------------------------------------

DEFAULT_NEEDLE = (
    "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a "
    "sunny day."
)
DEFAULT_QUESTION = "What is the best thing to do in San Francisco?"

NEEDLE_PREFIX = (
    "You are a helpful AI bot that answers questions for a user. Keep your response short and "
    "direct.\n\n<document>\n"
)
NEEDLE_SUFFIX = (
    "\n</document>\n\nAnswer the question using only the document above. Don't give "
    "information outside the document or repeat your findings.\n"
    "Question: {question}\nAnswer:"
)

# A sentence ends at . ! or ? (plus closing quotes/brackets and a footnote mark like "[2]");
# the next one starts after the whitespace, or right away: the essay files lose some paragraph
# breaks ("accelerating.We").
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*(?:\[\d+\])?(?:\s+|(?=[A-Z]))")
_ENDS_WITH_SENTENCE = re.compile(r"[.!?][\"')\]]*(?:\[\d+\])?\s*$")


def needle_answer(needle: str) -> str:
    """The part of a "X is Y." needle that answers "What is X?": "eat a sandwich ... day"."""
    _, sep, rest = needle.partition(" is ")
    return (rest if sep else needle).strip().rstrip(".!?").strip()


def _read_essays(essays_dir: str | Path) -> list[str]:
    files = sorted(Path(essays_dir).glob("*.txt"))  # sorted: the haystack must be deterministic
    if not files:
        raise FileNotFoundError(f"no essay .txt files in {essays_dir}")
    return [f.read_text(encoding="utf-8").replace("\r\n", "\n").strip() for f in files]


def _haystack_ids(tokenizer: Tokenizer, essays: list[str], n_tokens: int) -> list[int]:
    """The first `n_tokens` tokens of the essays laid end to end (cycled if they run out)."""
    ids: list[int] = []
    i = 0
    while len(ids) < n_tokens:
        ids += tokenizer.encode(essays[i % len(essays)] + "\n\n", add_special_tokens=False)
        i += 1
    return ids[:n_tokens]


def insert_at_sentence_boundary(text: str, insert: str, depth: float) -> str:
    """`insert` as its own sentence at the sentence boundary nearest `depth` (0 start, 1 end).

    Depth is measured in characters of `text`, which tracks token position closely for prose.
    The end of `text` is a boundary only if a sentence ends there: a haystack cut to a token
    budget usually ends mid-sentence, and the needle must not finish that sentence.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    boundaries = [0] + [m.end() for m in _SENTENCE_END.finditer(text)]
    if _ENDS_WITH_SENTENCE.search(text):
        boundaries.append(len(text))
    target = depth * len(text)
    # Ties go to the earlier boundary, so the result never depends on set or dict order.
    b = min(boundaries, key=lambda pos: (abs(pos - target), pos))
    left, right = text[:b].rstrip(), text[b:].lstrip()
    return " ".join(part for part in (left, insert, right) if part)


def build_needle_prompt(
    tokenizer: Tokenizer,
    essays_dir: str | Path,
    context_tokens: int,
    depth: float,
    needle: str = DEFAULT_NEEDLE,
    question: str = DEFAULT_QUESTION,
    answer: str | None = None,
) -> tuple[str, str]:
    """(prompt, expected answer) for a needle-in-a-haystack probe of about `context_tokens` tokens.

    The haystack is the essays in file-name order, cut to fit; `needle` goes in as its own
    sentence at the boundary nearest `depth`. The expected answer is `answer`, or for a
    "X is Y." needle the Y part (`needle_answer`). Deterministic for a given tokenizer.
    """
    essays = _read_essays(essays_dir)
    suffix = NEEDLE_SUFFIX.format(question=question)
    overhead = _n_tokens(tokenizer, NEEDLE_PREFIX + suffix) + _n_tokens(tokenizer, needle)
    if context_tokens <= overhead:
        raise ValueError(f"context_tokens={context_tokens} leaves no room for a haystack "
                         f"(instructions and needle take {overhead} tokens)")

    def build(budget: int) -> tuple[str, int]:
        ids = _haystack_ids(tokenizer, essays, budget)
        # A cut inside a multi-byte character decodes to U+FFFD; drop it.
        haystack = tokenizer.decode(ids).strip().rstrip("\ufffd")
        prompt = NEEDLE_PREFIX + insert_at_sentence_boundary(haystack, needle, depth) + suffix
        return prompt, _n_tokens(tokenizer, prompt)

    # Tokens do not add up exactly across the joins, so correct the budget by the measured
    # error a few times; this lands within a couple of tokens of the target.
    budget = context_tokens - overhead
    best = build(budget)
    for _ in range(4):
        error = context_tokens - best[1]
        if error == 0:
            break
        budget = max(1, budget + error)
        candidate = build(budget)
        if abs(context_tokens - candidate[1]) < abs(error):
            best = candidate
        else:
            break
    return best[0], answer if answer is not None else needle_answer(needle)


# --------------------------------------------------------------------------------------------
# Passkey retrieval (Mohtashami & Jaggi 2023, "Landmark Attention")
# --------------------------------------------------------------------------------------------

PASSKEY_TASK_DESCRIPTION = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
    "them. I will quiz you about the important information there."
)
PASSKEY_FILLER = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
)
PASSKEY_LINE = "The pass key is {k}. Remember it. {k} is the pass key."
PASSKEY_QUESTION = "What is the pass key? The pass key is"

_FILLER_SENTENCES = [s + "." for s in PASSKEY_FILLER.rstrip(".").split(". ")]


def random_passkey(seed: int, index: int) -> int:
    """A 5-digit pass key, the same for a (seed, index) on every machine and Python version."""
    digest = hashlib.sha256(f"kvbench-passkey:{seed}:{index}".encode()).digest()
    return 10_000 + int.from_bytes(digest[:8], "big") % 90_000


def _filler(n_sentences: int) -> str:
    """The filler repeated, cut after `n_sentences` sentences (the original cuts at characters)."""
    k = len(_FILLER_SENTENCES)
    return " ".join(_FILLER_SENTENCES[i % k] for i in range(n_sentences))


def _passkey_text(n_prefix: int, n_suffix: int, passkey: int) -> str:
    # Same five lines, joined by "\n", as the Landmark Attention script; the filler after the
    # key restarts at "The grass is green." there too.
    lines = [
        PASSKEY_TASK_DESCRIPTION,
        _filler(n_prefix),
        PASSKEY_LINE.format(k=passkey),
        _filler(n_suffix),
        PASSKEY_QUESTION,
    ]
    return "\n".join(lines)


def build_passkey_prompt(
    tokenizer: Tokenizer, context_tokens: int, depth: float, passkey: int
) -> tuple[str, str]:
    """(prompt, str(passkey)): about `context_tokens` tokens with the key line at `depth`."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    overhead = _n_tokens(tokenizer, _passkey_text(0, 0, passkey))
    per_sentence = _n_tokens(tokenizer, _filler(100)) / 100
    if context_tokens <= overhead:
        raise ValueError(f"context_tokens={context_tokens} leaves no room for filler "
                         f"(the fixed lines take {overhead} tokens)")

    def build(n: int) -> tuple[str, int]:
        n_prefix = round(depth * n)
        text = _passkey_text(n_prefix, n - n_prefix, passkey)
        return text, _n_tokens(tokenizer, text)

    n = max(0, round((context_tokens - overhead) / per_sentence))
    best = build(n)
    for _ in range(4):  # correct for tokens that merge across sentence joins
        error = context_tokens - best[1]
        step = round(error / per_sentence)
        if step == 0:
            break
        n = max(0, n + step)
        candidate = build(n)
        if abs(context_tokens - candidate[1]) < abs(error):
            best = candidate
        else:
            break
    return best[0], str(passkey)
