"""LongBench v1 samples and prompts.

Samples come from `<data_dir>/longbench/<dataset>.jsonl` in the official format, one JSON
object a line with the fields input, context, answers (list), length, dataset, language,
all_classes, _id. Without that file, and with the `datasets` package installed, they come from
the Hugging Face hub instead. Prompts, generation lengths and metrics are the official ones
(see `kvbench.textmetrics`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from kvbench.prompts import Tokenizer
from kvbench.textmetrics import LONGBENCH_DATASET2PROMPT, LONGBENCH_METRICS

LONGBENCH_TASK_VERSION = 1

# The official repo's hub dataset is built by a loading script, which `datasets` 4.0 and later
# refuse to run; lm-evaluation-harness moved to this Parquet copy of the same data.
HUB_REPO_SCRIPT = "THUDM/LongBench"
HUB_REPO_PARQUET = "Xnhyacinth/LongBench"

# The official pred.py wraps prompts in the model's chat template except on these few-shot and
# code datasets, where chat models do better on the raw text.
LONGBENCH_NO_CHAT_TEMPLATE = frozenset({"trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"})


def _default_data_dir() -> Path:
    try:
        from kvbench.data import data_dir  # the project's resolver

        found = data_dir()
        if found is not None:
            return Path(found)
    except ImportError:
        pass
    # Nothing found: name the place the data would be looked for in the error message.
    env = os.environ.get("KVBENCH_DATA_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _hub_repo() -> str:
    import datasets

    major = int(datasets.__version__.split(".")[0])
    return HUB_REPO_SCRIPT if major < 4 else HUB_REPO_PARQUET


def _read_jsonl(path: Path, limit: int | None) -> list[dict]:
    rows: list[dict] = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            if limit is not None and len(rows) >= limit:
                break
            if line.strip():
                rows.append(json.loads(line))
    return rows


def load_longbench(
    dataset: str, data_dir: str | Path | None = None, limit: int | None = None
) -> list[dict]:
    """The first `limit` (all if None) test samples of a LongBench v1 dataset, as dicts."""
    if dataset not in LONGBENCH_METRICS:
        raise KeyError(f"unknown LongBench dataset {dataset!r}; known: {sorted(LONGBENCH_METRICS)}")
    root = Path(data_dir) if data_dir is not None else _default_data_dir()
    path = root / "longbench" / f"{dataset}.jsonl"
    if path.is_file():
        return _read_jsonl(path, limit)

    how = (f"put the official JSONL (data.zip of THUDM/LongBench on the Hugging Face hub, one "
           f"file per dataset) at {path}, or set KVBENCH_DATA_DIR to a folder with longbench/")
    try:
        import datasets
    except ImportError:
        raise FileNotFoundError(
            f"LongBench {dataset!r} not found at {path}; {how}, or install `datasets` "
            f"(pip install 'kvbench[hub]') to load it from the hub when online"
        ) from None
    repo = _hub_repo()
    try:
        split = "test" if limit is None else f"test[:{limit}]"
        ds = datasets.load_dataset(repo, dataset, split=split)
    except Exception as e:  # offline, missing config, ...: say where we looked
        raise FileNotFoundError(
            f"LongBench {dataset!r} not found at {path}, and loading {repo!r} from the hub "
            f"failed ({type(e).__name__}: {e}); {how}"
        ) from e
    return [dict(row) for row in ds]


def longbench_prompt(sample: dict, dataset: str | None = None) -> str:
    """The official prompt for a sample (dataset taken from the sample when not given)."""
    name = dataset or sample["dataset"]
    return LONGBENCH_DATASET2PROMPT[name].format(context=sample["context"], input=sample["input"])


def truncate_middle(tokenizer: Tokenizer, prompt: str, max_tokens: int) -> str:
    """The official truncation: keep the first and last max_tokens/2 tokens of a long prompt.

    The middle goes because the instructions sit at both ends. As in pred.py, the two halves
    are decoded separately and joined (so the result can re-tokenize a token or so longer).
    """
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    if len(ids) <= max_tokens:
        return prompt
    half = max_tokens // 2
    return tokenizer.decode(ids[:half]) + tokenizer.decode(ids[-half:])
