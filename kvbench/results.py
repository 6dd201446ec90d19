"""The results contract: one JSON object per finished cell in DIR/results.jsonl.

Each line: cell_id, model, method (label), method_name, task, task_name, status (ok | failed),
metrics (numbers; always avg_bits), method_params, task_params, task_version, mode, env, config,
seed, dtype, seconds, error, finished_at, notes. A later line for the same cell_id supersedes
an earlier one. Lines are flushed and synced as each cell finishes, so an interrupted run loses
nothing it finished.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

import kvbench

RESULTS_FILE = "results.jsonl"


def cell_id(model: str, method_label: str, task_label: str) -> str:
    return f"{model}|{method_label}|{task_label}"


def read_results(run_dir: Path) -> dict[str, dict[str, Any]]:
    """Latest row per cell_id, in order of first appearance."""
    path = Path(run_dir) / RESULTS_FILE
    rows: dict[str, dict[str, Any]] = {}
    if path.is_file():
        with path.open(encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    row = json.loads(line)
                    rows[row["cell_id"]] = row
    return rows


def append_result(run_dir: Path, row: dict[str, Any]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    with (run_dir / RESULTS_FILE).open("a", encoding="utf-8") as f:
        f.write(json.dumps(row, sort_keys=False, default=_json_default) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _json_default(obj):
    if isinstance(obj, (tuple, set)):
        return list(obj)
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.dtype):
        return str(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _git(*args: str) -> str | None:
    repo = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


@lru_cache(maxsize=None)
def environment(device: str) -> dict[str, Any]:
    """Versions, commit and hardware: enough to reproduce or to refuse a comparison."""
    import transformers

    env: dict[str, Any] = {
        "kvbench": kvbench.__version__,
        # A copy of the tree on a remote GPU machine passes the commit in the env; it wins over
        # git there, whose .git may be a stale copy (seen: an older HEAD, reported dirty).
        "git_commit": os.environ.get("KVBENCH_GIT_COMMIT") or _git("rev-parse", "HEAD"),
        "git_dirty": (None if os.environ.get("KVBENCH_GIT_COMMIT")
                      else bool(_git("status", "--porcelain", "--untracked-files=no"))),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "cpu_threads": torch.get_num_threads(),
        "device": "cpu",
        "driver": None,
        "cuda": None,
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device == "cuda" and torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
        env["driver"] = _nvidia_driver()
    return env


def _nvidia_driver() -> str | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        version = pynvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else version
    except Exception:  # nvidia-ml-py missing or NVML unavailable: the record says null
        return None
