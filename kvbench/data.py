"""Where evaluation data comes from: a local data directory first, the Hugging Face hub second.

The directory is `$KVBENCH_DATA_DIR`, else the config's `data_dir`, else `../shared/data` next to
the working directory or the repository. Hub loading (through `datasets`) is the fallback for
users who are online.
"""

from __future__ import annotations

import os
from pathlib import Path

from kvbench.errors import UserError

_configured_dir: Path | None = None
_REPO_ROOT = Path(__file__).resolve().parent.parent


def set_data_dir(path: str | Path | None) -> None:
    global _configured_dir
    _configured_dir = Path(path).expanduser() if path else None


def data_dir() -> Path | None:
    candidates = []
    if os.environ.get("KVBENCH_DATA_DIR"):
        candidates.append(Path(os.environ["KVBENCH_DATA_DIR"]).expanduser())
    if _configured_dir is not None:
        candidates.append(_configured_dir)
    candidates += [Path.cwd() / ".." / "shared" / "data", _REPO_ROOT / ".." / "shared" / "data"]
    for c in candidates:
        if c.is_dir():
            return c.resolve()
    return None


def local_file(relative: str) -> Path | None:
    root = data_dir()
    if root is not None and (root / relative).is_file():
        return root / relative
    return None


def _from_hub(what: str, *args, **kwargs):
    try:
        import datasets
    except ImportError:
        raise UserError(
            f"{what}: no local copy found (set KVBENCH_DATA_DIR to a folder holding it) "
            "and the `datasets` package for hub loading is not installed"
        ) from None
    try:
        return datasets.load_dataset(*args, **kwargs)
    except Exception as e:  # offline, missing dataset: one line for the user
        raise UserError(f"{what}: no local copy found and the hub load failed: {str(e).splitlines()[0]}") from None


def wikitext2_test() -> tuple[str, str]:
    """(text, source) of WikiText-2 raw test, one non-empty row per line, '\\n' line endings."""
    path = local_file("wikitext-2-raw/wiki.test.raw")
    if path is not None:
        return path.read_text(encoding="utf-8").replace("\r\n", "\n"), str(path)
    rows = _from_hub("WikiText-2", "Salesforce/wikitext", "wikitext-2-raw-v1", split="test")
    # The local file keeps the non-empty rows, one per line: build the same text from the hub.
    return "\n".join(r for r in rows["text"] if r.strip()).replace("\r\n", "\n"), "hub:Salesforce/wikitext"


def gsm8k_rows(split: str) -> tuple[list[dict], str]:
    import json

    path = local_file(f"gsm8k/{split}.jsonl")
    if path is not None:
        with path.open(encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()], str(path)
    rows = _from_hub("GSM8K", "openai/gsm8k", "main", split=split)
    return [dict(r) for r in rows], "hub:openai/gsm8k"


def essays_dir() -> Path:
    root = data_dir()
    if root is None or not (root / "pg-essays").is_dir():
        raise UserError("Paul Graham essays not found: set KVBENCH_DATA_DIR to a folder holding pg-essays/")
    return root / "pg-essays"
