"""Text metrics against hand-computed examples (the arithmetic is in the comments)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvbench.longbench_data import load_longbench, longbench_prompt, truncate_middle
from kvbench.textmetrics import (
    LONGBENCH_DATASET2MAXLEN,
    LONGBENCH_DATASET2PROMPT,
    LONGBENCH_METRICS,
    agreement,
    classification_score,
    code_sim_score,
    count_score,
    cut_at_new_exemplar,
    extract_gsm8k_answer,
    fuzz_ratio,
    gsm8k_exact_match,
    longbench_score,
    needle_scores,
    normalize_answer,
    normalize_number,
    passkey_correct,
    qa_f1_score,
    retrieval_score,
    rouge_score,
)

DATA = Path(__file__).parent / "data"

# --------------------------------------------------------------------------------------------
# GSM8K
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("1,000", "1000"), ("$1,000", "1000"), ("-3.50", "-3.5"), ("7.", "7"), ("7.0", "7"),
    ("12.00", "12"), ("0.25", "0.25"), ("-0", "0"), ("007", "7"), ("abc", None), ("", None),
])
def test_normalize_number(text, expected):
    assert normalize_number(text) == expected


@pytest.mark.parametrize("generation, expected", [
    (" 21 - 15 = 6. The answer is 6.", "6"),
    ("She pays $1,000 in rent. The answer is $1,000.", "1000"),
    ("Total: 1,234,567 apples. The answer is 1,234,567.", "1234567"),
    ("The temperature fell to 3 - 8 = -5. The answer is -5.", "-5"),
    ("Each costs 2.5 dollars, so 4 x 2.5 = 10.0. The answer is 10.0.", "10"),
    ("Half of 7 is 3.5. The answer is 3.5.", "3.5"),
    ("So 0.50 of it is left. The answer is 0.50", "0.5"),
    # No "The answer is": the last number.
    ("He had 5 and bought 3 more, so he has 8 now.", "8"),
    ("The price went up to $12.", "12"),
    # No number at all.
    ("I do not know.", None),
    ("", None),
    # Several "The answer is": the first one with a number wins.
    ("The answer is 4. The answer is 5.", "4"),
    ("The answer is unclear.\nThe answer is 9.", "9"),
    ("the answer is: 42", "42"),
    # A number that is not the first thing after "The answer is".
    ("The answer is that she has 12 apples.", "12"),
    # The model keeps writing exemplars: cut at the new "Q:".
    ("3 + 2 = 5. The answer is 5.\n\nQ: Tom has 7 pens. How many?\nA: The answer is 7.", "5"),
    ("So 9 in total\n\nQ: A new question with 100 cats\nA: 100", "9"),
    ("5 * 4 = 20. Q: another one with 77", "20"),
    # "5-3" is two numbers, not a negative; "x3" is not a number.
    ("It went from 5-3 and then 3x2", "3"),
])
def test_extract_gsm8k_answer(generation, expected):
    assert extract_gsm8k_answer(generation) == expected


def test_cut_at_new_exemplar():
    assert cut_at_new_exemplar("a\n\nQ: b") == "a\n\n"
    assert cut_at_new_exemplar("Q: b") == ""
    assert cut_at_new_exemplar("FAQ: not a new one") == "FAQ: not a new one"
    assert cut_at_new_exemplar("x. Q: y") == "x. "  # after a finished sentence
    assert cut_at_new_exemplar("x.Q: y") == "x.Q: y"


@pytest.mark.parametrize("pred, target, ok", [
    ("1000", "1,000", True), ("1000.0", "1000", True), ("$18", "18", True), ("18", "18.5", False),
    ("-5", "5", False), (None, "5", False), ("abc", "5", False), ("0.50", "0.5", True),
])
def test_gsm8k_exact_match(pred, target, ok):
    assert gsm8k_exact_match(pred, target) is ok


# --------------------------------------------------------------------------------------------
# Needle, passkey, agreement
# --------------------------------------------------------------------------------------------

ANSWER = "eat a sandwich and sit in Dolores Park on a sunny day"


def test_needle_scores():
    # Content words of ANSWER: eat sandwich sit dolores park sunny day (7; a/and/in/on dropped).
    full = needle_scores(
        "The best thing is to EAT a sandwich, and sit in Dolores Park on a sunny day!", ANSWER)
    assert full == {"exact": 1, "partial": 1.0}
    # Recalled: sandwich, dolores, park = 3 of 7.
    part = needle_scores("Have a sandwich in Dolores Park.", ANSWER)
    assert part["exact"] == 0 and part["partial"] == pytest.approx(3 / 7)
    assert needle_scores("No idea.", ANSWER) == {"exact": 0, "partial": 0.0}
    # Whole words only: "eat a sandwich" is not in "beat a sandwich".
    assert needle_scores("beat a sandwich", "eat a sandwich")["exact"] == 0
    assert needle_scores("mango", "mango") == {"exact": 1, "partial": 1.0}


def test_passkey_correct():
    assert passkey_correct(" 40213. Remember it.", 40213)
    assert passkey_correct("The pass key is 40213", "40213")
    assert passkey_correct("1234 then 40213", 40213)  # 1234 has 4 digits: skipped
    assert not passkey_correct("402130", 40213)  # six digits: a different integer
    assert not passkey_correct("12345 or 40213", 40213)  # the first 5-digit integer counts
    assert not passkey_correct("no digits", 40213)


def test_agreement():
    assert agreement([1, 2, 3], [1, 2, 3]) == {"exact": True, "first_divergence": 3}
    assert agreement([1, 2, 3], [1, 9, 3]) == {"exact": False, "first_divergence": 1}
    assert agreement([1, 2], [1, 2, 3]) == {"exact": False, "first_divergence": 2}
    assert agreement([], [5]) == {"exact": False, "first_divergence": 0}
    assert agreement([], []) == {"exact": True, "first_divergence": 0}


# --------------------------------------------------------------------------------------------
# LongBench metrics
# --------------------------------------------------------------------------------------------


def test_normalize_answer():
    assert normalize_answer("The  Cat, an apple & A dog!") == "cat apple dog"
    assert normalize_answer("Theatre") == "theatre"  # "the" only as a whole word


def test_qa_f1_score():
    # pred words [city, of, port, ellery], answer [port, ellery]: common 2,
    # P = 2/4, R = 2/2, F1 = 2 * 0.5 * 1 / 1.5 = 2/3.
    assert qa_f1_score("The city of Port Ellery.", "Port Ellery") == pytest.approx(2 / 3)
    # Multiset: pred [a b b] vs [b c]... with words: pred [red, red, car], gt [red, bus]:
    # common = min(2,1) red = 1; P = 1/3, R = 1/2, F1 = 2*(1/6)/(5/6) = 0.4.
    assert qa_f1_score("red red car", "red bus") == pytest.approx(0.4)
    assert qa_f1_score("Yes.", "yes") == 1.0
    assert qa_f1_score("", "yes") == 0.0


def test_rouge_score_hand_computed():
    # ref sentences ["The agency spent 5 million dollars", "Audits found waste"]:
    #   m = 9 distinct words. pred ["The agency spent money", "Auditors found waste"]: n = 7.
    # LCS(ref1, pred1) = The agency spent; LCS(ref2, pred2) = found waste; cross pairs none.
    # Union 5 words: R = 5/9, P = 5/7, F = 2PR/(P+R) = (50/63) / (80/63) = 0.625.
    f = rouge_score("The agency spent money. Auditors found waste.",
                    "The agency spent 5 million dollars. Audits found waste.")
    assert f == pytest.approx(0.625, abs=1e-7)
    # The `rouge` package counts distinct words: ref "the cat saw the dog" has m = 4,
    # pred "the the the" has n = 1, LCS "the the" gives 1 distinct word:
    # R = 1/4, P = 1, F = 2 * 0.25 / 1.25 = 0.4 (textbook Rouge-L would give 2*(2/5)(2/3)/(16/15) = 0.5).
    assert rouge_score("the the the", "the cat saw the dog") == pytest.approx(0.4, abs=1e-7)
    # Case and punctuation matter (no normalisation): "Cat" != "cat", "dog," != "dog".
    # pred {Cat, saw, dog,} n=3; ref {cat, saw, dog} m=3; LCS = saw: R = P = 1/3, F = 1/3.
    assert rouge_score("Cat saw dog,", "cat saw dog") == pytest.approx(1 / 3, abs=1e-7)
    assert rouge_score("same words here.", "same words here.") == pytest.approx(1.0, abs=1e-7)
    # Nothing but periods: the package raises, LongBench scores 0.
    assert rouge_score("...", "a b c") == 0.0
    assert rouge_score("", "a b c") == 0.0


def test_rouge_score_matches_rouge_package():
    rouge = pytest.importorskip(
        "rouge", reason="the `rouge` package (official LongBench dependency) is not installed")
    pairs = [
        ("The agency spent money. Auditors found waste.",
         "The agency spent 5 million dollars. Audits found waste."),
        ("a b c a b. c d. ", "b a c. d c a b"),
        ("Inspections were late in 3 states. Fixes are planned.", "Inspections were completed on time."),
    ]
    for pred, ref in pairs:
        expected = rouge.Rouge().get_scores([pred], [ref], avg=True)["rouge-l"]["f"]
        assert rouge_score(pred, ref) == pytest.approx(expected, abs=1e-12)


def test_fuzz_ratio_and_code_sim():
    # difflib: "total = price * quantity" (24 chars) vs "total = price * qty" (19):
    # blocks "total = price * q" (17) + "ty" (2) = 19; ratio = 2*19/43 = 0.8837 -> 88.
    assert fuzz_ratio("total = price * quantity", "total = price * qty") == 88
    # "x += 2" vs "x += 1": 5 of 6 chars match: 2*5/12 = 0.8333 -> 83.
    assert fuzz_ratio("x += 2", "x += 1") == 83
    assert fuzz_ratio("", "") == 100 and fuzz_ratio("", "a") == 0
    # "ab" vs "ac": 2*1/4 = 0.5 -> 50.
    assert fuzz_ratio("ab", "ac") == 50
    # First line with no "`", "#" or "//" anywhere in it.
    assert code_sim_score("```python\ntotal = price * quantity\n```", "total = price * qty") == 0.88
    assert code_sim_score("\n\nx += 2  # bump\nx += 2\n", "x += 1") == 0.83
    assert code_sim_score("# only comments\n// here", "x += 1") == 0.0  # "" vs answer


def test_count_and_retrieval():
    # Numbers in prediction [4, 6]; one equals 4: 1/2.
    assert count_score("There are 4 unique paragraphs out of 6.", "4") == 0.5
    assert count_score("none", "4") == 0.0
    # Numbers [3, 1]; "Paragraph 3" -> 3: 1/2.
    assert retrieval_score("Paragraph 3, or maybe Paragraph 1", "Paragraph 3") == 0.5
    assert retrieval_score("Paragraph 13", "Paragraph 3") == 0.0  # whole numbers only
    assert retrieval_score("I cannot tell.", "Paragraph 3") == 0.0


def test_classification_score():
    classes = ["Date", "Date of birth", "City", "Country"]
    # Found [Date, Date of birth]; "Date" is a strict substring of the truth: dropped -> 1/1.
    assert classification_score("Date of birth", "Date of birth", all_classes=classes) == 1.0
    # Found [City, Country], truth among them: 1/2.
    assert classification_score("City or Country", "City", all_classes=classes) == 0.5
    assert classification_score("Nothing", "City", all_classes=classes) == 0.0
    # The official drop loop removes from the list it iterates: with found [a, ab, abc] and
    # truth "abc", "a" is dropped, the loop then skips "ab", so 2 remain -> 1/2, not 1.
    assert classification_score("abc", "abc", all_classes=["a", "ab", "abc"]) == 0.5


def test_longbench_tables():
    english = {"narrativeqa", "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "musique",
               "gov_report", "qmsum", "multi_news", "trec", "triviaqa", "samsum",
               "passage_count", "passage_retrieval_en", "lcc", "repobench-p"}
    assert set(LONGBENCH_METRICS) == set(LONGBENCH_DATASET2MAXLEN) == set(LONGBENCH_DATASET2PROMPT) == english
    assert LONGBENCH_METRICS["gov_report"] is rouge_score
    assert LONGBENCH_METRICS["trec"] is classification_score
    assert LONGBENCH_DATASET2MAXLEN["gov_report"] == 512 and LONGBENCH_DATASET2MAXLEN["hotpotqa"] == 32
    for name, template in LONGBENCH_DATASET2PROMPT.items():
        assert "{context}" in template, name
        template.format(context="C", input="I")  # no stray braces


def test_longbench_score_max_over_answers_and_first_line():
    # Sample 1: best of [0, 1] = 1; sample 2: 0. Mean 0.5 -> 50.0.
    assert longbench_score("hotpotqa", ["Paris", "Rome"], [["London", "Paris"], ["Oslo"]], None) == 50.0
    # trec keeps the first line only: "City" (1.0) instead of "City ... Country" (0.5).
    classes = ["City", "Country"]
    assert longbench_score("trec", ["\nCity\nType: Country"], [["City"]], classes) == 100.0
    # lcc does not: its first code line is found by code_sim_score itself.
    assert longbench_score("passage_count", ["2 or 3"], [["3"]], None) == 50.0
    # Rounded to 2 digits like the official scorer: 1/3 -> 33.33.
    assert longbench_score("passage_count", ["3", "1", "1"], [["3"], ["3"], ["3"]], None) == 33.33
    unrounded = longbench_score("passage_count", ["3", "1", "1"], [["3"]] * 3, None, ndigits=None)
    assert unrounded == pytest.approx(100 / 3)
    with pytest.raises(KeyError):
        longbench_score("dureader", ["x"], [["x"]], None)


# --------------------------------------------------------------------------------------------
# LongBench sample files in tests/data/longbench
# --------------------------------------------------------------------------------------------


def _score_file(dataset: str, predictions: list[str]) -> float:
    samples = load_longbench(dataset, data_dir=DATA)
    assert len(samples) == len(predictions)
    return longbench_score(dataset, predictions, [s["answers"] for s in samples],
                           samples[0]["all_classes"])


def test_load_longbench_format():
    samples = load_longbench("hotpotqa", data_dir=DATA)
    assert len(samples) == 3
    s = samples[0]
    assert set(s) == {"input", "context", "answers", "length", "dataset", "language", "all_classes", "_id"}
    assert s["answers"] == ["Port Ellery"] and s["dataset"] == "hotpotqa"
    assert len(load_longbench("hotpotqa", data_dir=DATA, limit=2)) == 2
    prompt = longbench_prompt(s)
    assert prompt.startswith("Answer the question based on the given passages.")
    assert prompt.endswith(f"Question: {s['input']}\nAnswer:") and s["context"] in prompt


def test_load_longbench_missing(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_datasets(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError("no datasets")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "longbench" / "qasper.jsonl")):
        load_longbench("qasper", data_dir=tmp_path)
    with pytest.raises(KeyError):
        load_longbench("not_a_dataset", data_dir=tmp_path)


def test_hotpotqa_file():
    # [city, of, port, ellery] vs [port, ellery]: F1 2/3; "Yes" vs "yes": 1; wrong year: 0.
    # (2/3 + 1 + 0) / 3 = 0.5556 -> 55.56.
    assert _score_file("hotpotqa", ["The city of Port Ellery.", "Yes", "It was completed in 1888."]) == 55.56


def test_gov_report_file():
    # 0.625 (see test_rouge_score_hand_computed), 1.0 (identical), 0.4 (distinct-word quirk):
    # (0.625 + 1 + 0.4) / 3 = 0.675 -> 67.5.
    preds = ["The agency spent money. Auditors found waste.",
             "Inspections were completed on time.",
             "the the the"]
    assert _score_file("gov_report", preds) == 67.5


def test_trec_file():
    # "Individual": 1. "City" + next example cut at the newline: 1. "Other number" (truth
    # "Number of something" not found): 0. Two classes found, truth among them: 1/2.
    # (1 + 1 + 0 + 0.5) / 4 = 0.625 -> 62.5.
    preds = ["Individual",
             "City\nQuestion: Which country is the largest?\nType: Country",
             "Other number",
             "Definition of something or Description of something"]
    assert _score_file("trec", preds) == 62.5


def test_passage_retrieval_file():
    # [1] -> 1; [3, 1] vs 3 -> 1/2; no number -> 0. (1 + 0.5 + 0) / 3 = 0.5 -> 50.0.
    assert _score_file("passage_retrieval_en", ["Paragraph 1", "Paragraph 3, or maybe Paragraph 1",
                                                "I cannot tell."]) == 50.0


def test_lcc_file():
    # Same line: 1.0; "total = price * quantity": 0.88; "x += 2" after two comment lines: 0.83.
    # (1 + 0.88 + 0.83) / 3 = 0.90333 -> 90.33.
    preds = ["    return a + b\n", "```python\ntotal = price * quantity\n```",
             "# increment x\n// comment\nx += 2"]
    assert _score_file("lcc", preds) == 90.33


def test_passage_count_file():
    # "3" vs 3: 1; [4, 6] vs 4: 1/2; "5" vs 2: 0. (1 + 0.5 + 0) / 3 = 0.5 -> 50.0.
    assert _score_file("passage_count", ["3", "There are 4 unique paragraphs out of 6.", "5"]) == 50.0


def test_truncate_middle():
    class Chars:  # one token per character
        def encode(self, text, add_special_tokens=False):
            return [ord(c) for c in text]

        def decode(self, ids):
            return "".join(chr(i) for i in ids)

    assert truncate_middle(Chars(), "abcdefghij", 20) == "abcdefghij"
    assert truncate_middle(Chars(), "abcdefghij", 4) == "abij"  # first 2 + last 2
