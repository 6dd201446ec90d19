"""The README's promises: the plugin example runs as printed, and CI runs the README's test command."""

import re
import sys
import types
from pathlib import Path

from kvbench.cli import main
from kvbench.registry import methods

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _plugin_example() -> str:
    block = README.split("<!-- plugin-example:start -->")[1].split("<!-- plugin-example:end -->")[0]
    return re.search(r"```python\n(.*?)```", block, re.S).group(1)


def test_plugin_example_is_about_30_lines():
    code = [line for line in _plugin_example().splitlines() if line.strip()]
    assert len(code) <= 35


def test_plugin_example_runs_through_the_harness(tmp_path, smollm2, capsys):
    module = types.ModuleType("readme_plugin")
    sys.modules["readme_plugin"] = module
    exec(compile(_plugin_example(), "README.md", "exec"), module.__dict__)
    assert methods.get("absmax") is module.AbsMax
    config = tmp_path / "bench.yaml"
    config.write_text(
        f"output: {tmp_path / 'out'}\n"
        "models: [{name: smollm2-135m, path: smollm2}]\n"
        "methods: [{name: fp16}, {name: absmax, label: absmax-8, params: {bits: 8}}]\n"
        "tasks: [{name: perplexity, params: {seq_len: 64, max_windows: 1}}]\n"
    )
    assert main(["run", str(config)]) == 0
    assert "absmax-8" in (tmp_path / "out" / "report.md").read_text()
    assert main(["list", "methods"]) == 0 and "absmax" in capsys.readouterr().out


def test_ci_runs_the_readme_test_command():
    commands = re.search(r"```bash\n(.*?)```", README, re.S).group(1).strip().splitlines()
    assert len(commands) == 2 and commands[0].endswith("kvbench run benchmark.yaml")
    ci = (ROOT / ".ci" / "run").read_text()
    assert "grep -m1 -F 'python -m pytest' README.md" in ci
    assert commands[1].endswith("python -m pytest -q")
