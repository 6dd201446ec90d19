"""Bad configs and bad usage: one line naming the place and what is allowed, exit 2, no traceback."""

import pytest

from kvbench.cli import main

GOOD = """\
output: {out}
models:
  - {{name: smollm2-135m, path: smollm2}}
methods:
  - name: fp16
  - {{name: rtn, label: rtn-2, params: {{bits: 2}}}}
tasks:
  - {{name: perplexity, params: {{seq_len: 64, max_windows: 1}}}}
"""

# (what to replace in GOOD -> with what, the text the one-line error must contain)
BAD = [
    ("output: {out}", "outptu: {out}", "outptu: unknown key (did you mean 'output'?); allowed: output, seed"),
    ("name: rtn,", "name: rtm,", "methods[1].name: unknown method 'rtm' (did you mean 'rtn'?); available:"),
    ("bits: 2", "bits: 5", "methods[1].params.bits: 5 is not one of 2, 3, 4, 8"),
    ("bits: 2", "bits: two", "methods[1].params.bits: 'two' is not a int"),
    ("bits: 2", "bitz: 2", "methods[1].params.bitz: unknown parameter of 'rtn' (did you mean 'bits'?)"),
    ("bits: 2", "bits: 2, clip_ratio: 1.5", "methods[1].params.clip_ratio: 1.5 must be in (0, 1]"),
    ("name: perplexity", "name: perplexty", "tasks[0].name: unknown task 'perplexty' (did you mean 'perplexity'?)"),
    ("seq_len: 64", "seq_len: long", "tasks[0].params.seq_len: 'long' is not a int"),
    ("seq_len: 64", "seq_len: 1", "tasks[0].params.seq_len: 1 must be at least 2"),
    ("max_windows: 1", "max_windows: 0", "tasks[0].params.max_windows: must be at least 1 or null"),
    ("label: rtn-2", "label: fp16", "methods[1].label: 'fp16' is already used by methods[0]"),
    ("  - name: fp16\n", "  - fp16\n", "methods[0]: expected a mapping with name, label, params"),
    ("path: smollm2", "path: /no/such/model.gguf", "models[0].path: model file /no/such/model.gguf does not exist"),
    ("path: smollm2", "path: ./no-such-dir", "models[0].path: model './no-such-dir' is neither an existing path"),
    ("models:", "seed: abc\nmodels:", "seed: expected an integer"),
    ("models:", "device: cuda\nmodels:", "device: 'cuda' is not available on this machine; allowed here: cpu, auto"),
    ("models:", "device: tpu\nmodels:", "device: 'tpu' is not one of cpu, cuda, auto"),
    ("models:", "dtype: float8\nmodels:", "dtype: 'float8' is not one of float32, float16, bfloat16"),
    ("tasks:\n  - {name: perplexity, params: {seq_len: 64, max_windows: 1}}\n", "tasks: []\n", "tasks: the list is empty"),
    ("models:\n  - {name: smollm2-135m, path: smollm2}\n", "", "models: missing; a config needs models, methods and tasks"),
    ("params: {bits: 2}", "params: [2]", "methods[1].params: expected a mapping"),
    ("models:", "models: [\nfoo:", "invalid YAML"),
]


def _run(tmp_path, text, capsys, *extra):
    path = tmp_path / "bench.yaml"
    path.write_text(text.format(out=tmp_path / "out") if "{out}" in text else text)
    rc = main(["run", str(path), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    return rc, err


@pytest.mark.parametrize("old,new,expected", BAD, ids=[b[2][:40] for b in BAD])
def test_bad_config_is_one_line_naming_the_place(tmp_path, capsys, old, new, expected):
    text = GOOD.format(out=tmp_path / "out")
    old, new = (s.replace("{out}", str(tmp_path / "out")) for s in (old, new))
    assert old in text, old
    rc, err = _run(tmp_path, text.replace(old, new, 1), capsys)
    assert rc == 2
    assert len(err) == 1, err
    assert expected in err[0], err[0]
    assert "Traceback" not in err[0]


def test_missing_config_file(tmp_path, capsys):
    assert main(["run", str(tmp_path / "nope.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no such config file" in err[0]


def test_only_pattern_that_matches_nothing(tmp_path, capsys):
    rc, err = _run(tmp_path, GOOD, capsys, "--only", "kivi*")
    assert rc == 2 and len(err) == 1 and "--only kivi*: matches no model, method or task" in err[0]


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["frobnicate"])
    assert e.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_group_size_that_does_not_fit_the_model(tmp_path, capsys, smollm2):
    """Checked against the model's geometry once it is loaded; still one line, exit 2."""
    text = GOOD.format(out=tmp_path / "out").replace("bits: 2", "bits: 2, group_size: 48")
    rc, err = _run(tmp_path, text, capsys)
    assert rc == 2
    assert err[-1] == "kvbench: methods[1].params.group_size: 48 does not divide head_dim 64 (model smollm2-135m)"


def test_list_shows_parameters(capsys):
    assert main(["list", "methods"]) == 0
    out = capsys.readouterr().out
    for text in ("rotatekv", "kivi", "residual", "clip_ratio", "2, 3, 4, 8"):
        assert text in out


def test_entry_point_plugins_are_discovered(monkeypatch):
    """A separate package adds a method through the `kvbench.methods` entry-point group."""
    import importlib.metadata

    from kvbench import registry

    ep = importlib.metadata.EntryPoint(name="ep-rtn", value="kvbench.methods.rtn:RTN", group="kvbench.methods")
    real = importlib.metadata.entry_points
    monkeypatch.setattr(
        importlib.metadata, "entry_points", lambda group=None: [ep] if group == "kvbench.methods" else real(group=group)
    )
    reg = registry.Registry("method", "kvbench.methods", "kvbench.methods", registry.methods.base)
    assert "ep-rtn" in reg.names()
    assert reg.get("ep-rtn").name == "rtn"
