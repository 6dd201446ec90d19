"""Skip, with a reason, the micro-benchmarks whose code is not there yet or cannot run here.

A benchmark declares what it needs with markers instead of importing at module level, so one
missing module (kvbench.packing is being written while these benchmarks exist) skips its own
benchmarks and not the whole session:

    pytestmark = pytest.mark.requires("kvbench.packing", "pack", "unpack")
    @pytest.mark.cuda
"""

from __future__ import annotations

import importlib
import os
from functools import lru_cache

import pytest

# One CPU thread by default: timings then measure the work, not how many idle cores the machine
# (or a busy CI runner) has, and the baseline transfers better between machines.
THREADS = int(os.environ.get("KVBENCH_BENCH_THREADS", "1"))


def pytest_configure(config: pytest.Config) -> None:
    try:
        import torch
    except ImportError:
        return
    torch.set_num_threads(THREADS)


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    """Saved with each run, so a comparison shows what the baseline ran on."""
    import torch

    machine_info["torch"] = torch.__version__
    machine_info["torch_threads"] = torch.get_num_threads()
    machine_info["cuda_device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None


@lru_cache(maxsize=None)
def missing(module: str, names: tuple[str, ...] = ()) -> str | None:
    """Why `module` (with `names`) cannot be used, or None when it can."""
    try:
        mod = importlib.import_module(module)
    except Exception as exc:  # ImportError, or a half-written module that fails on import
        return f"{module} is not importable yet ({type(exc).__name__}: {exc})"
    absent = [n for n in names if not hasattr(mod, n)]
    if absent:
        return f"{module} has no {', '.join(absent)} yet"
    return None


@lru_cache(maxsize=None)
def cuda_missing() -> str | None:
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    return None if torch.cuda.is_available() else "no CUDA GPU here"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    no_plugin = missing("pytest_benchmark")
    for item in items:
        reasons = []
        if no_plugin:
            reasons.append("pytest-benchmark is not installed (pip install 'kvbench[dev]')")
        for mark in item.iter_markers("requires"):
            module, *names = mark.args
            if why := missing(module, tuple(names)):
                reasons.append(why)
        if item.get_closest_marker("cuda") and (why := cuda_missing()):
            reasons.append(why)
        if reasons:
            item.add_marker(pytest.mark.skip(reason="; ".join(reasons)))
