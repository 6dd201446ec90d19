"""Generation tasks end to end on SmolLM2 at tiny settings: metric plumbing, fp16 agreement,
the benchmark config. The scorers themselves are tested in test_textmetrics.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvbench.config import load_config
from kvbench.registry import methods, tasks
from kvbench.task import TaskContext

REPO = Path(__file__).resolve().parents[1]
FP16 = methods.get("fp16")()


def _ctx(lm, method, cache_dir: Path) -> TaskContext:
    return TaskContext(lm=lm, method=method, method_label=method.name, seed=0, cache_dir=cache_dir,
                       reference_method=FP16)


def _in_unit(x: float) -> bool:
    return 0.0 <= x <= 1.0


def test_gsm8k_plumbing(smollm2, tmp_path):
    task = tasks.get("gsm8k")(limit=2, batch_size=2, max_new_tokens=16)
    r = task.run(_ctx(smollm2, FP16, tmp_path))
    m = r.metrics
    assert m["samples"] == 2 and _in_unit(m["accuracy"])
    # fp16 is its own reference: full agreement, divergence at the generation's end.
    assert m["fp16_agreement"] == 1.0 and m["first_divergence"] == m["generated_len"]
    assert 0 < m["generated_len"] <= 16
    assert 700 < m["prompt_tokens"] < 1100  # the 8-shot prompt
    assert task.context_len() > 800 and "8-shot" in task.protocol()


def test_needle_plumbing_with_reference(smollm2, tmp_path):
    task = tasks.get("needle")(contexts=[512], depths=[0.5], max_new_tokens=24)
    rtn = methods.get("rtn")(bits=4, group_size=64)
    m = task.run(_ctx(smollm2, rtn, tmp_path)).metrics
    assert abs(m["prompt_tokens"] - 512) <= 4  # the chat template counts toward the length
    for key in ("exact_match", "partial_match", "fp16_agreement", "depth0.5.ctx512.exact_match",
                "depth0.5.ctx512.partial_match", "ctx512.exact_match"):
        assert _in_unit(m[key]), key
    assert m["exact_match"] == m["depth0.5.ctx512.exact_match"]
    assert m["exact_match"] <= m["partial_match"] or m["exact_match"] == 0
    assert m["depth0.5.ctx512.first_divergence"] == m["first_divergence"] >= 0
    # The fp16 reference was cached on disk for the other cells (reuse: test_generate.py).
    assert len(list((tmp_path / "fp16_generations").glob("needle-*.json"))) == 1


def test_passkey_plumbing(smollm2, tmp_path):
    task = tasks.get("passkey")(lengths=[256], depths=[0.0, 1.0], max_new_tokens=8)
    r = task.run(_ctx(smollm2, FP16, tmp_path))
    m = r.metrics
    assert m["samples"] == 2 and m["fp16_agreement"] == 1.0
    assert set(m) >= {"accuracy", "depth0.ctx256.accuracy", "depth1.ctx256.accuracy", "ctx256.accuracy"}
    assert m["accuracy"] == (m["depth0.ctx256.accuracy"] + m["depth1.ctx256.accuracy"]) / 2
    assert abs(m["prompt_tokens"] - 256) <= 6
    assert m["accuracy"] == 1.0  # SmolLM2 finds the key in 256 tokens; a broken loop would not


def test_longbench_on_test_files(smollm2, tmp_path, monkeypatch):
    monkeypatch.setenv("KVBENCH_DATA_DIR", str(REPO / "tests" / "data"))
    names = ["hotpotqa", "gov_report", "trec", "passage_retrieval_en", "lcc", "passage_count"]
    task = tasks.get("longbench")(datasets=names, limit=1, max_new_tokens=8, max_length=300, batch_size=2)
    r = task.run(_ctx(smollm2, FP16, tmp_path))
    m = r.metrics
    assert m["samples"] == len(names)
    for name in names:
        assert 0.0 <= m[f"{name}.longbench_score"] <= 100.0
        assert m[f"{name}.fp16_agreement"] == 1.0
    assert m["longbench_score"] == pytest.approx(sum(m[f"{n}.longbench_score"] for n in names) / len(names))
    assert task.new_tokens("gov_report") == 8 and tasks.get("longbench")().new_tokens("gov_report") == 512


def test_longbench_rejects_unknown_dataset():
    from kvbench.params import ParamError

    with pytest.raises(ParamError):
        tasks.get("longbench")(datasets=["dureader"])


def test_generation_config_parses():
    cfg = load_config(REPO / "benchmarks" / "generation.yaml")
    assert [m.label for m in cfg.methods] == ["fp16", "kivi-2", "quarot-2", "rtn-4", "rotatekv-2"]
    assert {t.task.name for t in cfg.tasks} == {"passkey", "needle", "gsm8k"}
