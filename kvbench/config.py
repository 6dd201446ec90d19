"""benchmark.yaml: loading and validation. Every error names its exact place in the file.

```yaml
output: results/default      # where results.jsonl and report.md go
seed: 0
device: cpu                  # cpu | cuda | auto
dtype: float32               # float32 | float16 | bfloat16
data_dir: null               # optional; else $KVBENCH_DATA_DIR or ../shared/data
models:
  - {name: smollm2-135m, path: smollm2}   # alias, hub id, local dir or .gguf file
methods:
  - {name: fp16}
  - {name: rtn, label: rtn-2, params: {bits: 2, group_size: 64}}
tasks:
  - {name: perplexity, params: {seq_len: 1024, max_windows: 8}}
```
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from kvbench import params as P
from kvbench import registry
from kvbench.errors import ConfigError, UserError, did_you_mean
from kvbench.method import KVMethod
from kvbench.model import resolve_source
from kvbench.task import Task

TOP_LEVEL_KEYS = ("output", "seed", "device", "dtype", "data_dir", "models", "methods", "tasks")
DEVICES = ("cpu", "cuda", "auto")
DTYPES = ("float32", "float16", "bfloat16")
MODEL_KEYS = ("name", "path")
PLUGIN_KEYS = ("name", "label", "params")


@dataclass
class ModelSpec:
    name: str
    path: str


@dataclass
class MethodSpec:
    label: str
    method: KVMethod


@dataclass
class TaskSpec:
    label: str
    task: Task


@dataclass
class BenchmarkConfig:
    path: str
    output: str
    seed: int
    device: str  # resolved: cpu or cuda
    dtype: str
    data_dir: str | None
    models: list[ModelSpec]
    methods: list[MethodSpec]
    tasks: list[TaskSpec]
    raw: dict[str, Any]


def _expect(value, types, where: str, what: str):
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in _as_tuple(types)):
        raise ConfigError(f"{where}: expected {what}, got {type(value).__name__} {value!r}")
    return value


def _as_tuple(t):
    return t if isinstance(t, tuple) else (t,)


def _check_keys(mapping: dict, allowed, where: str) -> None:
    for key in mapping:
        if key not in allowed:
            prefix = f"{where}." if where else ""
            raise ConfigError(
                f"{prefix}{key}: unknown key{did_you_mean(key, allowed)}; allowed: {', '.join(allowed)}"
            )


def _choice(value, choices, where: str) -> str:
    if value not in choices:
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(choices)}{did_you_mean(value, choices)}")
    return value


def _plugins(raw: dict, key: str, reg: registry.Registry) -> list[tuple[str, Any]]:
    entries = _expect(raw.get(key), list, key, f"a list of {key}")
    if not entries:
        raise ConfigError(f"{key}: the list is empty; give at least one")
    out, seen = [], {}
    for i, entry in enumerate(entries):
        where = f"{key}[{i}]"
        _expect(entry, dict, where, "a mapping with name, label, params")
        _check_keys(entry, PLUGIN_KEYS, where)
        name = _expect(entry.get("name"), str, f"{where}.name", f"a {reg.kind} name")
        try:
            cls = reg.get(name)
        except UserError as e:
            raise ConfigError(f"{where}.name: {e}") from None
        label = _expect(entry.get("label", name), str, f"{where}.label", "a string")
        if label in seen:
            raise ConfigError(
                f"{where}.label: {label!r} is already used by {key}[{seen[label]}]; give each entry its own label"
            )
        seen[label] = i
        params = _expect(entry.get("params", {}) or {}, dict, f"{where}.params", "a mapping")
        out.append((label, P.build(cls, params, f"{where}.params")))
    return out


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: 'cuda' is not available on this machine; allowed here: cpu, auto")
    return device


def load_config(path: str | Path, output_override: str | None = None) -> BenchmarkConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML: {getattr(e, 'problem', None) or e}") from None
    return parse_config(raw, str(path), output_override)


def parse_config(raw: Any, path: str = "<config>", output_override: str | None = None) -> BenchmarkConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping with keys {', '.join(TOP_LEVEL_KEYS)}")
    _check_keys(raw, TOP_LEVEL_KEYS, "")
    for required in ("models", "methods", "tasks"):
        if required not in raw:
            raise ConfigError(f"{required}: missing; a config needs models, methods and tasks")

    output = output_override or _expect(raw.get("output", "results/run"), str, "output", "a directory path")
    seed = _expect(raw.get("seed", 0), int, "seed", "an integer")
    device = resolve_device(_choice(raw.get("device", "cpu"), DEVICES, "device"))
    dtype = _choice(raw.get("dtype", "float32"), DTYPES, "dtype")
    data_dir = raw.get("data_dir")
    if data_dir is not None:
        _expect(data_dir, str, "data_dir", "a directory path")
        if not Path(data_dir).expanduser().is_dir():
            raise ConfigError(f"data_dir: {data_dir} is not a directory")

    models = []
    for i, entry in enumerate(_expect(raw["models"], list, "models", "a list of models")):
        where = f"models[{i}]"
        _expect(entry, dict, where, "a mapping with name and path")
        _check_keys(entry, MODEL_KEYS, where)
        path_value = _expect(entry.get("path"), str, f"{where}.path", "a model path, hub id or alias")
        name = _expect(entry.get("name", path_value), str, f"{where}.name", "a string")
        try:
            resolve_source(path_value)  # cheap: finds the files, loads nothing
        except UserError as e:
            raise ConfigError(f"{where}.path: {e}") from None
        models.append(ModelSpec(name=name, path=path_value))
    if not models:
        raise ConfigError("models: the list is empty; give at least one")

    methods = [MethodSpec(label, m) for label, m in _plugins(raw, "methods", registry.methods)]
    tasks = [TaskSpec(label, t) for label, t in _plugins(raw, "tasks", registry.tasks)]

    if device == "cpu":
        for i, spec in enumerate(methods):
            if spec.method.requires_cuda():
                raise ConfigError(
                    f"methods[{i}]: {spec.label!r} (mode {spec.method.mode}) needs CUDA and device is cpu; "
                    "use mode: simulated on CPU"
                )
        for i, spec in enumerate(tasks):
            if spec.task.requires_cuda:
                raise ConfigError(f"tasks[{i}]: {spec.label!r} measures GPU memory or speed and needs device: cuda")

    return BenchmarkConfig(
        path=path,
        output=output,
        seed=seed,
        device=device,
        dtype=dtype,
        data_dir=data_dir,
        models=models,
        methods=methods,
        tasks=tasks,
        raw=raw,
    )
