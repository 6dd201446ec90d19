"""`kvbench report` on a synthetic run: tables, fp16 deltas, plots, and an HTML page that loads."""

from __future__ import annotations

import base64
import json
import math
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from kvbench.report import main, pareto_front, split_axes, write_report

MODEL = "smollm2-135m"
METHODS = [("fp16", "fp16", 16.0), ("rtn-4", "rtn", 4.5), ("kivi-2", "kivi", 2.5)]
CONFIG = {"output": "runs/x", "seed": 0, "methods": [{"name": "fp16"}, {"name": "rtn", "label": "rtn-4"}]}


def row(label: str, name: str, task: str, metrics: dict, task_params: dict, **extra) -> dict:
    r = {
        "cell_id": f"{MODEL}|{label}|{task}", "model": MODEL, "method": label, "method_name": name,
        "task": task, "status": "ok", "metrics": metrics, "method_params": {}, "task_params": task_params,
        "task_version": 1, "mode": "packed" if name == "fp16" else "simulated",
        "env": {"kvbench": "0.1.0", "git_commit": "abc123", "git_dirty": False, "python": "3.11.7",
                "torch": "2.13.0", "transformers": "5.17.0", "device": "cpu", "driver": None, "cuda": None},
        "config": CONFIG, "seed": 0, "dtype": "float32", "seconds": 1.0, "error": None,
        "finished_at": "2026-11-23T20:00:00Z", "notes": [],
    }
    r.update(extra)
    return r


def synthetic_rows() -> list[dict]:
    # rtn-4 comes first in the file: the report must still put fp16 first.
    order = [METHODS[1], METHODS[0], METHODS[2]]
    ppl = {"fp16": 23.1, "rtn-4": 23.4, "kivi-2": 24.1}
    kl = {"fp16": 0.0, "rtn-4": 0.004, "kivi-2": 0.03}
    rows = []
    for label, name, bits in order:
        rows.append(row(label, name, "perplexity",
                        {"ppl": ppl[label], "nll": math.log(ppl[label]), "tokens": 510, "avg_bits": bits},
                        {"seq_len": 256, "max_windows": 2}))
    for label, name, bits in order:
        rows.append(row(label, name, "kl", {"kl_mean": kl[label], "top1_agreement": 1 - kl[label], "avg_bits": bits},
                        {"seq_len": 256, "max_windows": 2}))
    for label, name, bits in order:
        grid = {f"depth{d:g}.ctx{c}.accuracy": (1.0 if label == "fp16" else 0.8)
                for d in (0.0, 0.5, 1.0) for c in (1024, 2048)}
        rows.append(row(label, name, "needle", {**grid, "accuracy": 1.0 if label == "fp16" else 0.8,
                                                "avg_bits": bits}, {"contexts": [1024, 2048]}))
    for label, name, bits in order:
        speed = 1.0 if label == "fp16" else 0.8
        metrics = {f"ctx{c}.decode_ms_p50": (8 + c / 1024) * speed for c in (1024, 4096, 16384)}
        metrics.update({f"ctx{c}.kv_bytes": c * 9216 * bits / 8 for c in (1024, 4096, 16384)})
        metrics.update({"max_batch": 48 if label == "fp16" else 150, "avg_bits": bits})
        rows.append(row(label, name, "decode_latency", metrics, {"contexts": [1024, 4096, 16384], "batch": 1},
                        mode="packed"))
    rows.append(row("rtn-2", "rtn", "perplexity", {}, {"seq_len": 256, "max_windows": 2},
                    status="failed", error="RuntimeError: CUDA out of memory"))
    return rows


def make_run(path: Path, rows: list[dict]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[Path, list[Path]]:
    pytest.importorskip("matplotlib", reason="plots need matplotlib (pip install 'kvbench[report]')")
    run = make_run(tmp_path_factory.mktemp("run"), synthetic_rows())
    return run, write_report(run)


def _table_rows(md: str, heading: str) -> list[str]:
    """The data rows of the first table under a '## heading'."""
    section = md.split(f"## {heading}\n", 1)[1]
    lines = [l for l in section.splitlines() if l.startswith("| ")]
    return lines[1:]  # drop the header


def test_markdown_tables_fp16_first_with_deltas(report):
    run, paths = report
    assert paths[0] == run / "report.md" and paths[1] == run / "report.html"
    md = (run / "report.md").read_text()
    ppl_rows = _table_rows(md, "perplexity")
    assert ppl_rows[0].startswith("| fp16 | 23.10 |")  # fp16 first, no delta on itself
    assert ppl_rows[1].startswith("| rtn-4 † | 23.40 (+1.3%) |")  # config order after fp16
    assert ppl_rows[2].startswith("| kivi-2 † | 24.10 (+4.3%) |")
    kl_rows = _table_rows(md, "kl")
    # fp16's KL is 0: the delta is absolute; agreement is a score: absolute points.
    assert "| 0.0300 (+0.0300) |" in kl_rows[2] and "0.9700 (-0.0300)" in kl_rows[2]
    # Failed cells are listed with their error; simulated rows carry the note.
    assert "- rtn-2: failed: RuntimeError: CUDA out of memory" in md
    assert "† simulated: fake quantization, no memory saved." in md
    assert "Protocol: seq_len=256, max_windows=2 (task v1)" in md
    # Sweeps pivot into a table per metric, contexts as columns in numeric order.
    assert "| method | ctx1024 | ctx4096 | ctx16384 |" in md
    assert "<details><summary>Exact config</summary>" in md and "output: runs/x" in md
    assert "abc123" in md and "torch 2.13.0" in md


def test_plots_are_written_and_linked(report):
    run, paths = report
    pngs = {p.name for p in paths if p.suffix == ".png"}
    assert f"quality_{MODEL}.png" in pngs
    assert f"heatmap_needle_{MODEL}.png" in pngs
    assert f"latency_vs_context_decode_latency_{MODEL}.png" in pngs
    assert f"memory_vs_context_decode_latency_{MODEL}.png" in pngs
    assert f"max_batch_decode_latency_{MODEL}.png" in pngs
    md = (run / "report.md").read_text()
    for name in pngs:
        assert f"](plots/{name})" in md
        assert (run / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


class _Images(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.srcs: list[str] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "img":
            self.srcs.append(dict(attrs)["src"])


def test_html_is_self_contained_and_images_decode(report):
    run, paths = report
    page = (run / "report.html").read_text()
    parser = _Images()
    parser.feed(page)
    parser.close()
    assert len(parser.srcs) == len([p for p in paths if p.suffix == ".png"]) >= 5
    for src in parser.srcs:
        assert src.startswith("data:image/png;base64,")
        data = base64.b64decode(src.split(",", 1)[1], validate=True)
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        width = int.from_bytes(data[16:20], "big")
        assert 200 < width < 3000  # a real image, not an empty one
    assert "<link" not in page and "<script" not in page  # nothing fetched from elsewhere
    assert "table" in parser.tags and "<style>" in page
    assert "24.10" in page and "(+4.3%)" in page


def test_html_loads_in_headless_chromium(report):
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("chromium not installed (apt-get install chromium) — HTML only checked by parsing")
    run, _ = report
    proc = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", (run / "report.html").as_uri()],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "kvbench report" in proc.stdout and "data:image/png;base64," in proc.stdout


def test_report_without_matplotlib_still_renders_tables(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    run = make_run(tmp_path / "run", synthetic_rows())
    paths = write_report(run)
    assert [p.name for p in paths] == ["report.md", "report.html"]
    md = (run / "report.md").read_text()
    assert "Plots skipped: matplotlib is not installed" in md
    assert "| fp16 | 23.10 |" in md
    assert "Plots skipped" in (run / "report.html").read_text()


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main([str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not a directory" in err
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty")]) == 2
    assert "results.jsonl: not found" in capsys.readouterr().err


def test_pareto_front_and_axes():
    pts = [(16.0, 23.1), (4.5, 23.4), (2.5, 24.1), (2.5, 300.0), (4.0, 30.0)]
    assert pareto_front(pts, "lower") == [(2.5, 24.1), (4.5, 23.4), (16.0, 23.1)]
    assert pareto_front([(2, 0.5), (4, 0.9), (3, 0.4)], "higher") == [(2, 0.5), (4, 0.9)]
    assert split_axes("depth0.25.ctx2048.accuracy") == ({"depth": 0.25, "context": 2048.0}, "accuracy")
    assert split_axes("batch8.ctx4096.peak_allocated_bytes") == ({"batch": 8.0, "context": 4096.0},
                                                                  "peak_allocated_bytes")
    assert split_axes("ppl") == ({}, "ppl")
