"""GPU timing in the manner of triton's do_bench: warm up, CUDA events, median and p90.

Every function that touches CUDA imports nothing at module level beyond torch, so this module
imports on CPU-only machines (the statistics are tested there).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Stats:
    """Milliseconds over `n` timed repetitions."""

    median_ms: float
    p90_ms: float
    mean_ms: float
    min_ms: float
    n: int

    def as_metrics(self, prefix: str) -> dict[str, float]:
        return {f"{prefix}_ms_p50": self.median_ms, f"{prefix}_ms_p90": self.p90_ms, f"{prefix}_ms_min": self.min_ms}


def quantile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile of already sorted values (numpy's default method)."""
    if not sorted_values:
        raise ValueError("no values")
    pos = (len(sorted_values) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summarize(times_ms: Sequence[float]) -> Stats:
    values = sorted(float(t) for t in times_ms)
    if not values:
        raise ValueError("no timings to summarize")
    return Stats(
        median_ms=quantile(values, 0.5),
        p90_ms=quantile(values, 0.9),
        mean_ms=sum(values) / len(values),
        min_ms=values[0],
        n=len(values),
    )


def time_each(fn: Callable[[], object], reps: int, warmup: int) -> Stats:
    """Time `fn` `reps` times, each between its own pair of CUDA events, after `warmup` calls.

    Events are recorded on the current stream without host syncs in between; one sync at the end.
    """
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for s, e in zip(starts, ends):
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return summarize([s.elapsed_time(e) for s, e in zip(starts, ends)])


def capture(fn: Callable[[], object], warmup: int = 2) -> torch.cuda.CUDAGraph:
    """Capture `fn` into a CUDA graph after warm-up calls on a side stream (torch's recipe)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    torch.cuda.synchronize()
    return graph


def amortized_ms(fn: Callable[[], object], calls: int = 20, reps: int = 15) -> float:
    """Median milliseconds a call of `fn` within one CUDA graph of `calls` calls (no graph launch a
    call, as inside a captured decode step): for kernels of tens of microseconds, whose own launch
    through Python costs more than they do."""
    graph = capture(lambda: [fn() for _ in range(calls)])
    return time_each(graph.replay, reps, warmup=1).median_ms / calls


def bench(fn: Callable[[], object], reps: int = 100, warmup: int = 10, graph: bool = True) -> tuple[Stats, bool]:
    """(timings of fn, whether a CUDA graph was used). Falls back to plain launches if capture fails."""
    if graph:
        try:
            g = capture(fn)
        except Exception:  # a host sync or an unsupported op inside fn
            torch.cuda.synchronize()
        else:
            return time_each(g.replay, reps, warmup), True
    return time_each(fn, reps, warmup), False


_COPY_BW: dict[int, float] = {}


def copy_bandwidth(nbytes: int = 2 << 30, reps: int = 20) -> float:
    """Device-to-device copy bandwidth in bytes/s, bytes read plus bytes written (median)."""
    dev = torch.cuda.current_device()
    if dev not in _COPY_BW:
        n = nbytes // 2
        src = torch.empty(n, dtype=torch.float16, device="cuda").normal_()
        dst = torch.empty_like(src)
        stats = time_each(lambda: dst.copy_(src), reps, 3)
        _COPY_BW[dev] = 2 * src.numel() * src.element_size() / (stats.median_ms / 1e3)
        del src, dst
        torch.cuda.empty_cache()
    return _COPY_BW[dev]


def nvml_used_bytes() -> int | None:
    """Device memory in use as NVML sees it (all processes), or None without nvidia-ml-py."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        index = torch.cuda.current_device()
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        return int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
    except Exception:
        return None


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
