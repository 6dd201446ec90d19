"""`kvbench compare`: the regression gate on synthetic result rows (no model, runs in well under a second)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from kvbench.compare import compare, load_tolerances, main, read_results
from kvbench.metric_directions import HIGHER, LOWER, NEUTRAL, rule_for

MODEL = "smollm2-135m"


def make_row(method: str, task: str, metrics: dict, status: str = "ok", **extra) -> dict:
    row = {
        "cell_id": f"{MODEL}|{method}|{task}",
        "model": MODEL,
        "method": method,
        "method_name": method.split("-")[0],
        "task": task,
        "status": status,
        "metrics": metrics,
        "method_params": {"bits": 2, "clip_ratio": 1.0} if method != "fp16" else {},
        "task_params": {"seq_len": 256, "max_windows": 2},
        "task_version": 1,
        "mode": "simulated",
        "env": {"kvbench": "0.1.0", "git_commit": "abc123", "device": "cpu", "torch": "2.13.0"},
        "config": {},
        "seed": 0,
        "dtype": "float32",
        "seconds": 1.0,
        "error": None,
        "finished_at": "2026-11-23T20:00:00Z",
    }
    row.update(extra)
    return row


def baseline_rows() -> list[dict]:
    return [
        make_row("fp16", "perplexity", {"ppl": 23.1, "nll": 3.14, "tokens": 510, "avg_bits": 16.0}),
        make_row("kivi-2", "perplexity", {"ppl": 25.0, "nll": 3.219, "tokens": 510, "avg_bits": 2.5}),
        make_row("fp16", "kl", {"kl_mean": 0.0, "kl_p99": 0.0, "top1_agreement": 1.0, "avg_bits": 16.0}),
        make_row("kivi-2", "kl", {"kl_mean": 0.05, "kl_p99": 0.4, "top1_agreement": 0.93, "avg_bits": 2.5}),
        make_row("fp16", "decode_latency", {"ctx4096.decode_ms_p50": 10.0, "ctx4096.tokens_per_s": 100.0,
                                            "avg_bits": 16.0}),
    ]


def write_run(tmp_path: Path, name: str, rows: list[dict]) -> Path:
    run = tmp_path / name
    run.mkdir()
    (run / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def set_metric(rows: list[dict], method: str, task: str, **metrics: float) -> list[dict]:
    rows = copy.deepcopy(rows)
    for r in rows:
        if r["method"] == method and r["task"] == task:
            r["metrics"].update(metrics)
    return rows


def run_cli(tmp_path: Path, baseline: list[dict], current: list[dict], capsys, *extra: str) -> tuple[int, str]:
    b = write_run(tmp_path, "baseline", baseline)
    c = write_run(tmp_path, "current", current)
    code = main([str(b), str(c), *extra])
    out = capsys.readouterr()
    return code, out.out + out.err


# --- directions ---------------------------------------------------------------------------------


def test_directions_table_and_suffix_rules():
    assert rule_for("ppl").direction == LOWER
    assert rule_for("top1_agreement").direction == HIGHER
    assert rule_for("tokens").direction == NEUTRAL
    # Nested-flattened names follow their last component.
    assert rule_for("ctx4096.accuracy") == rule_for("accuracy")
    assert rule_for("depth0.25.ctx2048.accuracy").direction == HIGHER
    # Suffix rules for names not in the table.
    assert rule_for("prefill_ms").direction == LOWER and rule_for("prefill_ms").kind == "speed"
    assert rule_for("weights_bytes").kind == "memory"
    assert rule_for("needle_accuracy").direction == HIGHER
    assert rule_for("something_else").direction == "info"


def test_docs_list_every_metric_with_its_tolerance():
    from kvbench.metric_directions import METRICS

    docs = (Path(__file__).resolve().parent.parent / "docs" / "regression-gate.md").read_text()
    for name, rule in METRICS.items():
        line = next((l for l in docs.splitlines() if l.startswith(f"| `{name}` |")), None)
        assert line is not None, f"docs/regression-gate.md lacks {name}"
        assert f"| {rule.describe_tolerance()} |" in line, (name, line)


# --- the gate -----------------------------------------------------------------------------------


def test_unchanged_rerun_passes(tmp_path, capsys):
    code, out = run_cli(tmp_path, baseline_rows(), baseline_rows(), capsys)
    assert code == 0, out
    assert "PASS" in out and "REGRESSION" not in out


def test_degraded_method_fails_and_names_metric_and_size(tmp_path, capsys):
    # What a wrong clip ratio does: ppl up 30%, kl_mean doubled.
    current = set_metric(baseline_rows(), "kivi-2", "perplexity", ppl=32.5)
    current = set_metric(current, "kivi-2", "kl", kl_mean=0.10)
    code, out = run_cli(tmp_path, baseline_rows(), current, capsys)
    assert code == 1
    lines = [l for l in out.splitlines() if l.startswith("REGRESSION")]
    ppl = next(l for l in lines if l.startswith("REGRESSION ppl "))
    assert f"{MODEL}|kivi-2|perplexity" in ppl and "+30.0%" in ppl
    kl = next(l for l in lines if l.startswith("REGRESSION kl_mean "))
    assert f"{MODEL}|kivi-2|kl" in kl and "+100.0%" in kl
    assert out.rstrip().splitlines()[-1].startswith("FAIL")


def test_improvement_and_within_tolerance_pass():
    current = set_metric(baseline_rows(), "kivi-2", "perplexity", ppl=24.0)  # better
    current = set_metric(current, "kivi-2", "kl", kl_mean=0.052)  # +4%, within 10%
    result = compare(baseline_rows(), current)
    assert result.exit_code() == 0
    verdicts = {(c.cell.split("|")[1], c.metric): c.verdict for c in result.changes}
    assert verdicts[("kivi-2", "ppl")] == "improved"
    assert verdicts[("kivi-2", "kl_mean")] == "ok"


@pytest.mark.parametrize(
    "metrics, expected",
    [
        ({"ctx4096.decode_ms_p50": 10.8}, 0),  # 8% slower: noise
        ({"ctx4096.decode_ms_p50": 11.5}, 1),  # 15% slower: regression
        ({"ctx4096.tokens_per_s": 93.0}, 0),  # 7% less throughput: noise
        ({"ctx4096.tokens_per_s": 80.0}, 1),  # 20% less: regression
    ],
)
def test_speed_within_noise_passes_beyond_fails(metrics, expected):
    current = set_metric(baseline_rows(), "fp16", "decode_latency", **metrics)
    assert compare(baseline_rows(), current).exit_code() == expected


def test_speed_on_another_device_is_a_warning_not_a_failure():
    current = set_metric(baseline_rows(), "fp16", "decode_latency", **{"ctx4096.decode_ms_p50": 20.0})
    for r in current:
        r["env"] = {**r["env"], "device": "NVIDIA H100 80GB HBM3"}
    result = compare(baseline_rows(), current)
    assert result.exit_code() == 0
    assert any(w.metric == "ctx4096.decode_ms_p50" for w in result.warnings)
    assert result.exit_code(strict=True) == 1


def test_missing_cells_reported_on_both_sides(tmp_path, capsys):
    baseline = baseline_rows()
    current = baseline_rows()[:-1] + [make_row("rtn-4", "perplexity", {"ppl": 23.5, "avg_bits": 4.5})]
    code, out = run_cli(tmp_path, baseline, current, capsys)
    assert code == 0  # a missing cell warns; --strict makes it fail
    assert f"{MODEL}|fp16|decode_latency: missing in current run" in out
    assert f"{MODEL}|rtn-4|perplexity: new cell" in out
    assert main([str(tmp_path / "baseline"), str(tmp_path / "current"), "--strict"]) == 1


def test_failed_now_is_a_regression(tmp_path, capsys):
    current = baseline_rows()
    current[1] = make_row("kivi-2", "perplexity", {}, status="failed", error="RuntimeError: shape mismatch")
    code, out = run_cli(tmp_path, baseline_rows(), current, capsys)
    assert code == 1
    assert f"REGRESSION {MODEL}|kivi-2|perplexity: failed (was ok): RuntimeError: shape mismatch" in out


def test_nan_is_a_regression_and_count_change_a_warning():
    current = set_metric(baseline_rows(), "kivi-2", "perplexity", ppl=float("nan"), tokens=500)
    result = compare(baseline_rows(), current)
    assert [r.metric for r in result.regressions] == ["ppl"]
    assert [w.metric for w in result.warnings] == ["tokens"]


def test_later_rows_supersede_earlier_ones(tmp_path):
    rows = baseline_rows() + set_metric(baseline_rows()[1:2], "kivi-2", "perplexity", ppl=99.0)
    run = write_run(tmp_path, "run", rows)
    latest = read_results(run)
    assert len(latest) == len(baseline_rows())
    assert latest[1]["metrics"]["ppl"] == 99.0  # latest values, first-appearance position


def test_json_verdict(tmp_path, capsys):
    current = set_metric(baseline_rows(), "kivi-2", "perplexity", ppl=32.5)
    out_json = tmp_path / "verdict.json"
    code, _ = run_cli(tmp_path, baseline_rows(), current, capsys, "--json", str(out_json))
    verdict = json.loads(out_json.read_text())
    assert code == 1 and verdict["verdict"] == "fail" and verdict["exit_code"] == 1
    assert verdict["regressions"][0]["metric"] == "ppl"
    assert verdict["regressions"][0]["rel"] == pytest.approx(0.3)


# --- tolerances file ----------------------------------------------------------------------------


def test_tolerances_file_overrides_and_per_cell(tmp_path, capsys):
    tol = tmp_path / "tol.yaml"
    tol.write_text(
        "ppl: {rel: 0.5}\n"
        "cells:\n"
        "  '*|kivi-2|kl':\n"
        "    kl_mean: {rel: 1.5}\n"
    )
    current = set_metric(baseline_rows(), "kivi-2", "perplexity", ppl=32.5)
    current = set_metric(current, "kivi-2", "kl", kl_mean=0.10)
    code, out = run_cli(tmp_path, baseline_rows(), current, capsys, "--tolerances", str(tol))
    assert code == 0, out
    rules = load_tolerances(tol)
    assert rules.rule(f"{MODEL}|kivi-2|kl", "kl_mean").rel_tol == 1.5
    assert rules.rule(f"{MODEL}|fp16|kl", "kl_mean").rel_tol == rule_for("kl_mean").rel_tol


@pytest.mark.parametrize(
    "text, expected",
    [
        ("ppl: {rell: 0.1}\n", "tol.yaml:1: unknown key 'rell' under 'ppl'; did you mean 'rel'?"),
        ("nll: {abs: 0.1}\npll: {rel: 0.1}\n", "tol.yaml:2: unknown key 'pll'; did you mean 'ppl'?"),
        ("ppl: {rel: -1}\n", "tol.yaml:1: rel under 'ppl' must be a number >= 0"),
        ("ppl: [1, 2\n", "tol.yaml:2: not valid YAML"),
        ("cells:\n  kivi-2:\n    ppl: {rel: 0.1}\n", "tol.yaml:2: cell 'kivi-2' must be 'model|method|task'"),
    ],
)
def test_bad_tolerances_file_is_exit_2_one_line(tmp_path, capsys, text, expected):
    tol = tmp_path / "tol.yaml"
    tol.write_text(text)
    code, out = run_cli(tmp_path, baseline_rows(), baseline_rows(), capsys, "--tolerances", str(tol))
    assert code == 2
    lines = out.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out
    assert expected in lines[0], lines[0]


def test_custom_metric_needs_a_direction(tmp_path):
    tol = tmp_path / "tol.yaml"
    tol.write_text("my_score: {direction: higher, abs: 0.02}\n")
    assert load_tolerances(tol).rule("a|b|c", "my_score").direction == HIGHER


# --- unusable input -----------------------------------------------------------------------------


def test_missing_and_bad_input_is_exit_2(tmp_path, capsys):
    assert main([str(tmp_path / "nope"), str(tmp_path / "nope")]) == 2
    assert "no such file or directory" in capsys.readouterr().err
    run = write_run(tmp_path, "bad", [])
    (run / "results.jsonl").write_text(json.dumps(baseline_rows()[0]) + "\n{not json\n")
    assert main([str(run), str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "results.jsonl:2: not valid JSON" in err


# --- end to end (slow: loads SmolLM2-135M twice) -------------------------------------------------

E2E_CONFIG = """\
seed: 0
device: cpu
dtype: float32
models:
  - {name: smollm2-135m, path: smollm2}
methods:
  - {name: fp16}
  - {name: kivi, label: kivi-2, params: {bits: 2, residual: 16, clip_ratio: CLIP}}
tasks:
  - {name: perplexity, params: {seq_len: 128, max_windows: 1}}
  - {name: kl, params: {seq_len: 128, max_windows: 1}}
"""


@pytest.mark.slow
def test_e2e_degraded_clip_ratio_fails_the_gate(tmp_path, capsys):
    """A real run against itself passes; the same method with a wrong clip ratio fails."""
    cli = pytest.importorskip("kvbench.cli")
    runs = {}
    for name, clip in (("baseline", "1.0"), ("degraded", "0.3")):
        config = tmp_path / f"{name}.yaml"
        config.write_text(E2E_CONFIG.replace("CLIP", clip))
        runs[name] = tmp_path / name
        if cli.main(["run", str(config), "--output", str(runs[name])]) != 0:
            pytest.skip(f"kvbench run could not run here: {capsys.readouterr().err.strip()[-300:]}")
    capsys.readouterr()
    assert main([str(runs["baseline"]), str(runs["baseline"])]) == 0
    assert main([str(runs["baseline"]), str(runs["degraded"])]) == 1
    out = capsys.readouterr().out
    assert "REGRESSION kl_mean in smollm2-135m|kivi-2|kl" in out
    assert "clip_ratio 1.0 -> 0.3" in out
