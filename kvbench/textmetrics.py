"""Scoring of generated text: GSM8K answers, needle and passkey retrieval, token agreement, and
the LongBench v1 metrics.

Pure Python, no model and no third-party package. The LongBench metrics follow the official
`metrics.py` and `eval.py` of THUDM/LongBench line by line, quirks included (each one is noted
where it occurs), so scores are comparable with published LongBench numbers. The two places
where the official code calls a package (`rouge`, `fuzzywuzzy`) are reimplemented here; see
`rouge_score` and `fuzz_ratio` for how closely they match.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from decimal import Decimal, InvalidOperation
from difflib import SequenceMatcher
from typing import Callable, Sequence

# --------------------------------------------------------------------------------------------
# Numbers and GSM8K
# --------------------------------------------------------------------------------------------

# A number as written in GSM8K text: optional minus and "$", thousands commas only in groups of
# three (so "1,2,3" is three numbers, not 123), optional decimals. Not preceded by a letter,
# digit or "." so "x3", "5-3" (-> 5 and 3) and ".5" are not read as numbers or negatives.
_NUMBER = re.compile(r"(?<![\w.])-?\$?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?")
_ANSWER_IS = re.compile(r"the answer is", re.IGNORECASE)
# A base model keeps writing exemplars after its answer ("...The answer is 8.\n\nQ: ..."); a
# "Q:" that opens the text or a line, or follows a finished sentence, starts a new one.
_NEW_EXEMPLAR = re.compile(r"(?:^|(?<=\n)|(?<=[.!?] ))[ \t]*Q:")


def normalize_number(text: str) -> str | None:
    """Canonical form of a number string: "$1,000.00" -> "1000", "-3.50" -> "-3.5", "7." -> "7".

    None when `text` is not a number once "$", "," and a trailing "." are removed.
    """
    s = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        d = Decimal(s)
    except InvalidOperation:
        return None
    if not d.is_finite():
        return None
    if d == d.to_integral_value():
        return str(int(d))  # also turns "-0" into "0"
    return format(d.normalize(), "f")


def cut_at_new_exemplar(text: str) -> str:
    """`text` up to the first "Q:" that starts a new few-shot exemplar."""
    m = _NEW_EXEMPLAR.search(text)
    return text[: m.start()] if m else text


def extract_gsm8k_answer(text: str) -> str | None:
    """The model's final answer to a GSM8K question, normalised, or None if it gave no number.

    The generation is first cut at a new exemplar. Then: the first number on the rest of the
    line after the first "The answer is" that has one (the CoT format's answer; later ones
    are usually hallucinated continuations), else the last number in the text.
    """
    text = cut_at_new_exemplar(text)
    for m in _ANSWER_IS.finditer(text):
        rest_of_line = text[m.end():].split("\n", 1)[0]
        n = _NUMBER.search(rest_of_line)
        if n:
            return normalize_number(n.group())
    numbers = _NUMBER.findall(text)
    return normalize_number(numbers[-1]) if numbers else None


def gsm8k_exact_match(pred: str | None, target: str) -> bool:
    """Whether `pred` and `target` are the same number ("1,000" == "1000.0"); False for None."""
    if pred is None:
        return False
    a, b = normalize_number(pred), normalize_number(target)
    return a is not None and a == b


# --------------------------------------------------------------------------------------------
# Needle in a haystack and passkey retrieval
# --------------------------------------------------------------------------------------------

# Words that carry no answer content; left out of the needle's partial-recall score.
_STOPWORDS = frozenset(
    "a an the and or but of in on at to for with by from is are was were be been it its this "
    "that as do does did".split()
)


def _words(text: str) -> list[str]:
    """Lower-cased alphanumeric words; punctuation counts as a separator."""
    return re.findall(r"[a-z0-9]+", text.lower())


def needle_scores(generation: str, expected: str) -> dict:
    """{"exact": 1 if the expected phrase occurs in the generation (ignoring case and
    punctuation) else 0, "partial": the fraction of the phrase's content words it contains}."""
    gen_words = _words(generation)
    exp_words = _words(expected)
    exact = int(bool(exp_words) and f" {' '.join(exp_words)} " in f" {' '.join(gen_words)} ")
    content = list(dict.fromkeys(w for w in exp_words if w not in _STOPWORDS))
    if not content:
        return {"exact": exact, "partial": float(exact)}
    present = set(gen_words)
    return {"exact": exact, "partial": sum(w in present for w in content) / len(content)}


def passkey_correct(generation: str, passkey: int | str) -> bool:
    """Whether the first integer of five or more digits in the generation is the pass key."""
    m = re.search(r"\d{5,}", generation)
    return m is not None and int(m.group()) == int(passkey)


# --------------------------------------------------------------------------------------------
# Agreement with the uncompressed (fp16) generation
# --------------------------------------------------------------------------------------------


def agreement(tokens_a: Sequence[int], tokens_b: Sequence[int]) -> dict:
    """{"exact": the sequences are equal, "first_divergence": the first index where they differ}.

    first_divergence is the shorter length when one is a prefix of the other, and the common
    length when they are equal.
    """
    n = min(len(tokens_a), len(tokens_b))
    first = next((i for i in range(n) if tokens_a[i] != tokens_b[i]), n)
    return {"exact": list(tokens_a) == list(tokens_b), "first_divergence": first}


# --------------------------------------------------------------------------------------------
# LongBench v1 metrics (THUDM/LongBench metrics.py), English subsets
# --------------------------------------------------------------------------------------------


_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(s: str) -> str:
    """Lower text and remove punctuation, articles and extra whitespace (SQuAD style)."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCTUATION)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def f1_score(prediction: Sequence[str], ground_truth: Sequence[str]) -> float:
    """Token-multiset F1."""
    common = Counter(prediction) & Counter(ground_truth)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(prediction)
    recall = num_same / len(ground_truth)
    return (2 * precision * recall) / (precision + recall)


def qa_f1_score(prediction: str, ground_truth: str, **kwargs) -> float:
    """F1 over the words of the normalised prediction and answer."""
    return f1_score(normalize_answer(prediction).split(), normalize_answer(ground_truth).split())


def count_score(prediction: str, ground_truth: str, **kwargs) -> float:
    """Fraction of the numbers in the prediction that equal the true count."""
    numbers = re.findall(r"\d+", prediction)
    right = sum(1 for n in numbers if n == str(ground_truth))
    return 0.0 if not numbers else right / len(numbers)


def retrieval_score(prediction: str, ground_truth: str, **kwargs) -> float:
    """Fraction of the numbers in the prediction that equal N of the answer's "Paragraph N"."""
    ground_truth_id = re.findall(r"Paragraph (\d+)", ground_truth)[0]
    numbers = re.findall(r"\d+", prediction)
    right = sum(1 for n in numbers if n == ground_truth_id)
    return 0.0 if not numbers else right / len(numbers)


def fuzz_ratio(a: str, b: str) -> int:
    """fuzzywuzzy's `fuzz.ratio` on its pure-Python path: round(100 * difflib ratio).

    Same decorators as fuzzywuzzy: equal strings give 100 (even two empty ones), otherwise an
    empty one gives 0; `round` is Python's (half to even), as fuzzywuzzy's `intr`. With
    python-Levenshtein installed fuzzywuzzy swaps in the Indel ratio, which can differ from
    difflib by a point or two on some pairs; the official LongBench requirements do not pin
    either, so difflib (no extra package) is the one reproduced here.
    """
    if a == b:
        return 100
    if not a or not b:
        return 0
    return int(round(100 * SequenceMatcher(None, a, b).ratio()))


def code_sim_score(prediction: str, ground_truth: str, **kwargs) -> float:
    """fuzz.ratio / 100 of the answer line and the prediction's first code line.

    The first line (after leading newlines) that contains none of "`", "#", "//" anywhere,
    as the official code tests; "" if there is none.
    """
    line = next(
        (ln for ln in prediction.lstrip("\n").split("\n")
         if "`" not in ln and "#" not in ln and "//" not in ln),
        "",
    )
    return fuzz_ratio(line, ground_truth) / 100


def classification_score(prediction: str, ground_truth: str, **kwargs) -> float:
    """1/k when the true class is among the k class names found in the prediction, else 0.

    Class names are matched as substrings; a found name that is a strict substring of the
    true class is dropped. That drop loop removes items from the list it iterates, as the
    official code does, so it can skip a neighbour: kept as is for identical scores. (The
    official fallback to difflib similarity sits behind `if em_match_list != 0`, which is
    always true, so it never runs and is not reproduced.)
    """
    all_classes = kwargs["all_classes"]
    em_match_list = [c for c in all_classes if c in prediction]
    for match_term in em_match_list:  # mutated while iterated, on purpose (see docstring)
        if match_term in ground_truth and match_term != ground_truth:
            em_match_list.remove(match_term)
    if ground_truth in em_match_list:
        return 1.0 / len(em_match_list)
    return 0.0


def _rouge_sentences(text: str) -> list[str]:
    # The `rouge` package splits on "." only and squeezes whitespace inside each piece; a
    # whitespace-only piece survives as "" and later counts as one (empty) word.
    return [" ".join(piece.split()) for piece in text.split(".") if len(piece) > 0]


def _lcs_words(x: list[str], y: list[str]) -> list[str]:
    """One longest common subsequence of x and y, traced back as the `rouge` package does."""
    n, m = len(x), len(y)
    table = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(1, n + 1):
        xi, row, prev = x[i - 1], table[i], table[i - 1]
        for j in range(1, m + 1):
            row[j] = prev[j - 1] + 1 if xi == y[j - 1] else max(prev[j], row[j - 1])
    out: list[str] = []
    i, j = n, m
    # Which LCS is traced matters: the score counts distinct words of it. Same tie rule.
    while i > 0 and j > 0:
        if x[i - 1] == y[j - 1]:
            out.append(x[i - 1])
            i, j = i - 1, j - 1
        elif table[i - 1][j] > table[i][j - 1]:
            i -= 1
        else:
            j -= 1
    return out


def rouge_score(prediction: str, ground_truth: str, **kwargs) -> float:
    """Rouge-L F as `rouge.Rouge().get_scores([pred], [ref], avg=True)["rouge-l"]["f"]`.

    LongBench calls the `rouge` package (pltrdy, 1.0.1); this reproduces its summary-level
    Rouge-L, which differs from textbook Rouge-L (and from Google's `rouge-score`):
    - no lower-casing or punctuation stripping; sentences are split on "." only and words
      on single spaces;
    - "exclusive" counting: the word counts m and n are the numbers of *distinct* words of
      reference and prediction, and the hit count is the number of distinct words in the
      union of the LCSs of every (reference sentence, prediction sentence) pair;
    - F = 2PR / (P + R + 1e-8).
    An empty prediction or reference makes the package raise, which LongBench turns into 0.0;
    same here. One difference: the package traces the LCS recursively, so a sentence pair
    with more than ~1000 words in total hits Python's recursion limit and LongBench scores
    it 0.0; here it is scored normally.
    """
    hyp = _rouge_sentences(prediction)
    ref = _rouge_sentences(ground_truth)
    if not hyp or not ref:
        return 0.0
    ref_words = [s.split(" ") for s in ref]
    hyp_words = [s.split(" ") for s in hyp]
    m = len({w for ws in ref_words for w in ws})
    n = len({w for ws in hyp_words for w in ws})
    union: set[str] = set()
    for r in ref_words:
        for h in hyp_words:
            union.update(_lcs_words(r, h))
    llcs = len(union)
    r_lcs, p_lcs = llcs / m, llcs / n
    return 2.0 * ((p_lcs * r_lcs) / (p_lcs + r_lcs + 1e-8))


Metric = Callable[..., float]

# Official dataset -> metric table (eval.py), English subsets of LongBench v1.
LONGBENCH_METRICS: dict[str, Metric] = {
    "narrativeqa": qa_f1_score,
    "qasper": qa_f1_score,
    "multifieldqa_en": qa_f1_score,
    "hotpotqa": qa_f1_score,
    "2wikimqa": qa_f1_score,
    "musique": qa_f1_score,
    "gov_report": rouge_score,
    "qmsum": rouge_score,
    "multi_news": rouge_score,
    "trec": classification_score,
    "triviaqa": qa_f1_score,
    "samsum": rouge_score,
    "passage_count": count_score,
    "passage_retrieval_en": retrieval_score,
    "lcc": code_sim_score,
    "repobench-p": code_sim_score,
}

# Maximum new tokens per dataset (config/dataset2maxlen.json).
LONGBENCH_DATASET2MAXLEN: dict[str, int] = {
    "narrativeqa": 128,
    "qasper": 128,
    "multifieldqa_en": 64,
    "hotpotqa": 32,
    "2wikimqa": 32,
    "musique": 32,
    "gov_report": 512,
    "qmsum": 512,
    "multi_news": 512,
    "trec": 64,
    "triviaqa": 32,
    "samsum": 128,
    "passage_count": 32,
    "passage_retrieval_en": 32,
    "lcc": 64,
    "repobench-p": 64,
}

_QA_PASSAGES = (
    "Answer the question based on the given passages. Only give me the answer and do not "
    "output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the "
    "question based on the given passages. Only give me the answer and do not output any "
    "other words.\n\nQuestion: {input}\nAnswer:"
)

# Prompt templates (config/dataset2prompt.json), verbatim including odd spaces; fill with
# `template.format(**sample)` (fields context and input).
LONGBENCH_DATASET2PROMPT: dict[str, str] = {
    "narrativeqa": (
        "You are given a story, which can be either a novel or a movie script, and a question. "
        "Answer the question as concisely as you can, using a single phrase if possible. Do not "
        "provide any explanation.\n\nStory: {context}\n\nNow, answer the question based on the "
        "story as concisely as you can, using a single phrase if possible. Do not provide any "
        "explanation.\n\nQuestion: {input}\n\nAnswer:"
    ),
    "qasper": (
        "You are given a scientific article and a question. Answer the question as concisely as "
        "you can, using a single phrase or sentence if possible. If the question cannot be "
        "answered based on the information in the article, write \"unanswerable\". If the "
        "question is a yes/no question, answer \"yes\", \"no\", or \"unanswerable\". Do not "
        "provide any explanation.\n\nArticle: {context}\n\n Answer the question based on the "
        "above article as concisely as you can, using a single phrase or sentence if possible. "
        "If the question cannot be answered based on the information in the article, write "
        "\"unanswerable\". If the question is a yes/no question, answer \"yes\", \"no\", or "
        "\"unanswerable\". Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:"
    ),
    "multifieldqa_en": (
        "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following "
        "question based on the above text, only give me the answer and do not output any other "
        "words.\n\nQuestion: {input}\nAnswer:"
    ),
    "hotpotqa": _QA_PASSAGES,
    "2wikimqa": _QA_PASSAGES,
    "musique": _QA_PASSAGES,
    "gov_report": (
        "You are given a report by a government agency. Write a one-page summary of the "
        "report.\n\nReport:\n{context}\n\nNow, write a one-page summary of the report.\n\n"
        "Summary:"
    ),
    "qmsum": (
        "You are given a meeting transcript and a query containing a question or instruction. "
        "Answer the query in one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer "
        "the query based on the above meeting transcript in one or more sentences.\n\nQuery: "
        "{input}\nAnswer:"
    ),
    "multi_news": (
        "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n"
        "{context}\n\nNow, write a one-page summary of all the news.\n\nSummary:"
    ),
    "trec": (
        "Please determine the type of the question below. Here are some examples of "
        "questions.\n\n{context}\n{input}"
    ),
    "triviaqa": (
        "Answer the question based on the given passage. Only give me the answer and do not "
        "output any other words. The following are some examples.\n\n{context}\n\n{input}"
    ),
    "samsum": (
        "Summarize the dialogue into a few short sentences. The following are some examples."
        "\n\n{context}\n\n{input}"
    ),
    "passage_count": (
        "There are some paragraphs below sourced from Wikipedia. Some of them may be "
        "duplicates. Please carefully read these paragraphs and determine how many unique "
        "paragraphs there are after removing duplicates. In other words, how many "
        "non-repeating paragraphs are there in total?\n\n{context}\n\nPlease enter the final "
        "count of unique paragraphs after removing duplicates. The output format should only "
        "contain the number, such as 1, 2, 3, and so on.\n\nThe final answer is: "
    ),
    "passage_retrieval_en": (
        "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which "
        "paragraph the abstract is from.\n\n{context}\n\nThe following is an abstract.\n\n"
        "{input}\n\nPlease enter the number of the paragraph that the abstract is from. The "
        "answer format must be like \"Paragraph 1\", \"Paragraph 2\", etc.\n\nThe answer is: "
    ),
    "lcc": "Please complete the code given below. \n{context}Next line of code:\n",
    "repobench-p": "Please complete the code given below. \n{context}{input}Next line of code:\n",
}

# The official scorer keeps only the first line of the prediction on these few-shot datasets,
# where models go on to write the next example.
LONGBENCH_FIRST_LINE_ONLY = frozenset({"trec", "triviaqa", "samsum", "lsht"})


def longbench_score(
    dataset: str,
    predictions: Sequence[str],
    answers_list: Sequence[Sequence[str]],
    all_classes: Sequence[str] | None,
    ndigits: int | None = 2,
) -> float:
    """The official `scorer`: 100 x mean over samples of the best score over the answers.

    Rounded to `ndigits` like the official script (None keeps full precision).
    """
    if dataset not in LONGBENCH_METRICS:
        raise KeyError(f"no LongBench metric for {dataset!r}; known: {sorted(LONGBENCH_METRICS)}")
    if len(predictions) != len(answers_list):
        raise ValueError(f"{len(predictions)} predictions for {len(answers_list)} answer lists")
    if not predictions:
        raise ValueError("no predictions to score")
    metric = LONGBENCH_METRICS[dataset]
    total = 0.0
    for prediction, ground_truths in zip(predictions, answers_list):
        if dataset in LONGBENCH_FIRST_LINE_ONLY:
            prediction = prediction.lstrip("\n").split("\n")[0]
        score = 0.0
        for ground_truth in ground_truths:
            score = max(score, metric(prediction, ground_truth, all_classes=all_classes))
        total += score
    result = 100 * total / len(predictions)
    return round(result, ndigits) if ndigits is not None else result
