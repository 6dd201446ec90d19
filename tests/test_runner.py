"""The runner on the real model: results contract, resume, failed cells, exit codes, --only."""

import json
from dataclasses import dataclass

import pytest

from kvbench import registry
from kvbench.cli import main
from kvbench.method import LayerCache
from kvbench.simulated import SimulatedCache

CONFIG = """\
output: {out}
seed: 3
models:
  - {{name: smollm2-135m, path: smollm2}}
methods:
  - name: fp16
  - {{name: rtn, label: rtn-2, params: {{bits: 2}}}}
  - {{name: broken, label: broken}}
tasks:
  - {{name: perplexity, params: {{seq_len: 64, max_windows: 1}}}}
  - {{name: kl, params: {{seq_len: 64, max_windows: 1}}}}
"""


class _Exploding(SimulatedCache):
    def attend(self, q, q_positions, scaling):
        raise RuntimeError("kernel exploded\nsecond line")


@dataclass
class Broken(registry.methods.base):
    name = "broken"
    description = "fails on purpose"

    def new_cache(self, layer_idx, geometry) -> LayerCache:
        return _Exploding()

    def avg_bits(self, geometry, context_len):
        return 16.0


@pytest.fixture
def config(tmp_path, monkeypatch):
    registry.methods.register(Broken)
    path = tmp_path / "bench.yaml"
    path.write_text(CONFIG.format(out=tmp_path / "out"))
    return path


def _rows(tmp_path):
    return [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]


def test_run_resume_force_and_failures(tmp_path, config, smollm2, capsys):
    assert main(["run", str(config)]) == 1  # one method fails: exit 1, the others still run
    rows = _rows(tmp_path)
    assert [(r["method"], r["task"], r["status"]) for r in rows] == [
        ("fp16", "perplexity", "ok"), ("fp16", "kl", "ok"),
        ("rtn-2", "perplexity", "ok"), ("rtn-2", "kl", "ok"),
        ("broken", "perplexity", "failed"), ("broken", "kl", "failed"),
    ]
    ok = rows[2]
    for key in ("model", "method", "task", "status", "metrics", "method_params", "task_params", "env", "seconds", "error"):
        assert key in ok
    assert ok["metrics"]["avg_bits"] == 2.5 and ok["metrics"]["ppl"] > rows[0]["metrics"]["ppl"]
    assert ok["method_params"]["bits"] == 2 and ok["task_params"]["seq_len"] == 64
    for key in ("kvbench", "git_commit", "python", "torch", "transformers", "device"):
        assert key in ok["env"]
    assert ok["seed"] == 3 and "simulated" in ok["notes"][0]
    assert rows[4]["error"] == "RuntimeError: kernel exploded"
    assert (tmp_path / "out" / "report.md").is_file()

    # a re-run skips finished cells and retries the failed ones
    assert main(["run", str(config)]) == 1
    rerun = _rows(tmp_path)[6:]
    assert [r["method"] for r in rerun] == ["broken", "broken"]

    # --only with --force re-runs exactly what it names
    assert main(["run", str(config), "--force", "--only", "rtn-2", "kl"]) == 0
    assert [(r["method"], r["task"]) for r in _rows(tmp_path)[8:]] == [("rtn-2", "kl")]


def test_environment_prefers_the_commit_passed_in(monkeypatch):
    # A copy of the tree on a GPU machine may carry a stale .git; the caller's commit wins.
    from kvbench.results import environment

    environment.cache_clear()  # computed once per process
    monkeypatch.setenv("KVBENCH_GIT_COMMIT", "0123abcd")
    env = environment("cpu")
    assert env["git_commit"] == "0123abcd" and env["git_dirty"] is None
    environment.cache_clear()
    monkeypatch.delenv("KVBENCH_GIT_COMMIT")
    assert environment("cpu")["git_commit"] != "0123abcd"
    environment.cache_clear()
