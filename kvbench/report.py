"""`kvbench report DIR`: turn DIR/results.jsonl into report.md, report.html and plots.

One table per task (and model): methods as rows, fp16 first, each number followed by its delta
against fp16 of the same model and task. Metrics nested by sweep axes (``ctx4096.decode_ms_p50``,
``depth0.25.ctx2048.accuracy``) are pivoted into their own tables or drawn as heatmaps.

The HTML file is self-contained (inline CSS, plots as data URIs) so it can be attached to a CI
run or mailed. matplotlib is optional: without it the report says plots were skipped.
"""

from __future__ import annotations

import base64
import html
import math
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from kvbench.compare import InputError, OneLineParser, read_results
from kvbench.metric_directions import (
    COUNT,
    HIGHER,
    LOWER,
    NEUTRAL,
    MetricRule,
    base_name,
    finite,
    rule_for,
)

PLOTS_DIR = "plots"
SIMULATED_NOTE = "simulated: fake quantization, no memory saved"

# Column order for known metrics; unknown ones follow in order of appearance.
PRIORITY = [
    "ppl", "nll", "kl_mean", "kl_p99", "top1_agreement", "accuracy", "exact_match",
    "partial_match", "f1", "rouge_l", "edit_sim", "fp16_agreement", "first_divergence",
    "decode_ms_p50", "decode_ms_p90", "attention_ms", "tokens_per_s", "achieved_gbps",
    "bandwidth_fraction", "peak_allocated_bytes", "peak_reserved_bytes", "kv_bytes", "max_batch",
    "avg_bits", "tokens",
]
# Sweep axes encoded as metric-name prefixes: "depth0.25.ctx2048.accuracy".
AXIS_PREFIXES = {"depth": "depth", "ctx": "context", "context": "context", "batch": "batch", "bs": "batch"}
_AXIS_RE = re.compile(r"^(depth|ctx|context|batch|bs)(\d+(?:\.\d+)?)\.")
# Task params that place a whole cell on a sweep axis.
PARAM_AXES = {"context": "context", "ctx": "context", "batch": "batch", "batch_size": "batch"}

MEMORY_METRICS = ["peak_allocated_bytes", "peak_reserved_bytes", "kv_bytes"]
LATENCY_METRICS = ["decode_ms_p50", "decode_ms_p90", "attention_ms", "tokens_per_s"]
QUALITY_METRICS = ["ppl", "kl_mean"]


# --------------------------------------------------------------------------------------------
# Data helpers


def is_fp16(row: dict) -> bool:
    return row.get("method_name") == "fp16" or row.get("method") == "fp16"


def method_order(rows: list[dict]) -> list[str]:
    """fp16 first, then config order (= order of first appearance)."""
    return _ordered([r["method"] for r in rows if is_fp16(r)] + [r["method"] for r in rows])


def split_axes(metric: str) -> tuple[dict[str, float], str]:
    """``depth0.25.ctx2048.accuracy`` -> ({'depth': 0.25, 'context': 2048}, 'accuracy')."""
    axes: dict[str, float] = {}
    rest = metric
    while m := _AXIS_RE.match(rest):
        axes[AXIS_PREFIXES[m.group(1)]] = float(m.group(2))
        rest = rest[m.end():]
    return axes, rest


def row_axes(row: dict) -> dict[str, float]:
    """Sweep coordinates a cell has as a whole, from scalar task params."""
    params = row.get("task_params") or {}
    out = {}
    for key, axis in PARAM_AXES.items():
        value = params.get(key)
        if finite(value):
            out.setdefault(axis, float(value))
    return out


def points(rows: list[dict], base: str) -> list[tuple[dict, dict[str, float], float]]:
    """Every value of metric `base` in `rows`, with its sweep coordinates."""
    out = []
    for row in rows:
        for name, value in row["metrics"].items():
            axes, rest = split_axes(name)
            if rest == base and finite(value):
                out.append((row, {**row_axes(row), **axes}, value))
    return out


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "x"


def _ordered(seq: list) -> list:
    return list(dict.fromkeys(seq))


def _num_key(label: str) -> tuple:
    """Sort 'ctx512' before 'ctx4096': numbers compare as numbers."""
    return tuple(float(p) if p.replace(".", "", 1).isdigit() else p for p in re.split(r"(\d+(?:\.\d+)?)", label))


# --------------------------------------------------------------------------------------------
# Formatting


def fmt_value(metric: str, x: float) -> str:
    if not finite(x):
        return str(x)
    base = base_name(metric)
    if base.endswith("_bytes"):
        return fmt_bytes(x)
    if float(x).is_integer() and (rule_for(base).kind == COUNT or base == "max_batch" or abs(x) >= 1000):
        return f"{int(x):,}"
    a = abs(x)
    if a == 0:
        return "0"
    if a >= 100:
        return f"{x:.1f}"
    if a >= 1:
        return f"{x:.2f}"
    if a >= 1e-3:
        return f"{x:.4f}"
    return f"{x:.2e}"


def fmt_bytes(x: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(x) >= size:
            return f"{x / size:.2f} {unit}"
    return f"{int(x)} B"


@dataclass
class Cell:
    text: str
    delta: str = ""
    tone: str = ""  # "better", "worse", "same" or "": colours the delta in HTML


def value_cell(metric: str, value: float | None, ref: float | None, is_ref: bool) -> Cell:
    """A number with its delta against the fp16 reference value."""
    if value is None:
        return Cell("—")
    cell = Cell(fmt_value(metric, value))
    rule = rule_for(metric)
    if is_ref or ref is None or not (finite(value) and finite(ref)) or rule.direction == NEUTRAL:
        return cell
    delta = value - ref
    if rule.delta_style == "abs" or ref == 0:
        # Same precision as the value itself, so 0.0040 reads as +0.0040, not +4.00e-03.
        cell.delta = ("-" if delta < 0 else "+") + fmt_value(metric, abs(delta))
    else:
        pct = delta / abs(ref) * 100
        if value / ref >= 10:  # +1242% reads worse than x13.4
            cell.delta = f"×{value / ref:.1f}"
        else:
            cell.delta = f"{pct:+.0f}%" if abs(pct) >= 100 else f"{pct:+.1f}%"
    cell.tone = _tone(rule, ref, value)
    return cell


def _tone(rule: MetricRule, ref: float, value: float) -> str:
    if rule.direction not in (LOWER, HIGHER) or rule.informational:
        return ""
    if abs(value - ref) <= rule.threshold(ref):
        return "same"
    better = value < ref if rule.direction == LOWER else value > ref
    return "better" if better else "worse"


# --------------------------------------------------------------------------------------------
# Report model: sections of tables, independent of the output format


@dataclass
class Table:
    title: str
    header: list[str]
    rows: list[list[Cell]]


@dataclass
class Section:
    task: str
    model: str
    protocol: str
    description: str = ""
    tables: list[Table] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # failed / skipped cells


@dataclass
class Plot:
    path: Path
    title: str
    caption: str


def _metric_order(names: list[str]) -> list[str]:
    first = {n: i for i, n in enumerate(names)}
    rank = {n: i for i, n in enumerate(PRIORITY)}
    return sorted(names, key=lambda n: (rank.get(base_name(n), len(PRIORITY) - 2.5), first[n]))


def _protocol(rows: list[dict]) -> str:
    protos = _ordered(
        [repr(sorted((r.get("task_params") or {}).items())) + f"v{r.get('task_version')}" for r in rows]
    )
    def one(r: dict) -> str:
        params = ", ".join(f"{k}={v}" for k, v in (r.get("task_params") or {}).items()) or "defaults"
        version = r.get("task_version")
        return params + (f" (task v{version})" if version is not None else "")
    if len(protos) == 1:
        return one(rows[0])
    return "; ".join(f"{r['method']}: {one(r)}" for r in rows)


def build_sections(rows: list[dict]) -> list[Section]:
    sections = []
    for task in _ordered([r["task"] for r in rows]):
        task_rows = [r for r in rows if r["task"] == task]
        for model in _ordered([r["model"] for r in task_rows]):
            group = [r for r in task_rows if r["model"] == model]
            # fp16 first, then config order (= order of first appearance).
            group = [r for r in group if is_fp16(r)] + [r for r in group if not is_fp16(r)]
            sections.append(_section(task, model, group))
    return sections


def _section(task: str, model: str, group: list[dict]) -> Section:
    ok = [r for r in group if r["status"] == "ok"]
    section = Section(task, model, _protocol(group))
    # The runner also records the task's protocol in words; say it once per section.
    section.description = next((str(r["protocol"]) for r in group if r.get("protocol")), "")
    ref = next((r for r in ok if is_fp16(r)), None)
    simulated = any(r.get("mode") == "simulated" and not is_fp16(r) for r in ok)

    def label(r: dict) -> str:
        # fp16 compresses nothing, so "simulated" says nothing about it.
        marked = r.get("mode") == "simulated" and not is_fp16(r)
        return r["method"] + (" †" if marked else "")

    names = _ordered([m for r in ok for m in r["metrics"]])
    plain = [m for m in names if not split_axes(m)[0]]
    swept = [m for m in names if split_axes(m)[0]]

    def row_cells(r: dict, metric: str) -> Cell:
        refv = ref["metrics"].get(metric) if ref else None
        return value_cell(metric, r["metrics"].get(metric), refv, r is ref)

    if plain:
        cols = _metric_order(plain)
        section.tables.append(
            Table("", ["method", *cols], [[Cell(label(r)), *(row_cells(r, m) for m in cols)] for r in ok])
        )
    # Swept metrics without a depth axis: one pivot table per metric, sweep points as columns.
    # Depth grids (needle) are too wide for a table and are drawn as heatmaps instead.
    pivots: dict[str, list[str]] = {}
    for m in swept:
        axes, rest = split_axes(m)
        if "depth" not in axes:
            pivots.setdefault(rest, []).append(m)
    for rest in _metric_order(list(pivots)):
        cols = sorted(pivots[rest], key=_num_key)
        header = ["method", *(c[: -len(rest) - 1] for c in cols)]
        section.tables.append(
            Table(rest, header, [[Cell(label(r)), *(row_cells(r, m) for m in cols)] for r in ok])
        )
    if any("depth" in split_axes(m)[0] for m in swept):
        section.notes.append("depth × context grid: see the heatmap in the plots section.")
    if ok and ref is None:
        section.notes.append("no fp16 row for this model and task: no deltas shown.")
    if simulated:
        section.notes.append(f"† {SIMULATED_NOTE}.")
    # A note every row shares (the data file, the reference) is said once, others per method.
    notes = {r["method"]: [str(n) for n in r.get("notes") or [] if not str(n).startswith("simulated")] for r in ok}
    shared = [n for n in _ordered([n for ns in notes.values() for n in ns]) if all(n in ns for ns in notes.values())]
    section.notes += shared
    section.notes += [f"{m}: {n}" for m, ns in notes.items() for n in ns if n not in shared]
    for r in group:
        if r["status"] != "ok":
            section.problems.append(f"{r['method']}: {r['status']}: {r.get('error') or 'no error message'}")
    return section


def header_info(rows: list[dict], run_dir: Path) -> list[tuple[str, str]]:
    envs = [r.get("env") or {} for r in rows]

    def values(key: str) -> str:
        vals = _ordered([str(e.get(key)) for e in envs if e.get(key) is not None])
        return ", ".join(vals) or "unknown"

    devices = _ordered(
        [
            str(e.get("device"))
            + (f" (driver {e['driver']}, CUDA {e['cuda']})" if e.get("driver") else "")
            for e in envs
            if e.get("device")
        ]
    )
    commits = _ordered(
        [f"{e.get('git_commit')}{' (dirty)' if e.get('git_dirty') else ''}" for e in envs if e.get("git_commit")]
    )
    dates = sorted(str(r["finished_at"]) for r in rows if r.get("finished_at"))
    status = Counter(r["status"] for r in rows)
    return [
        ("Run", run_dir.name or str(run_dir)),
        ("Models", ", ".join(_ordered([r["model"] for r in rows]))),
        ("Device", ", ".join(devices) or "unknown"),
        (
            "Versions",
            f"kvbench {values('kvbench')}, torch {values('torch')}, "
            f"transformers {values('transformers')}, python {values('python')}",
        ),
        ("Git commit", ", ".join(commits) or "unknown"),
        ("Date", dates[-1] if dates else "unknown"),
        ("Cells", ", ".join(f"{n} {s}" for s, n in status.items())),
    ]


def environment(rows: list[dict]) -> list[tuple[str, str]]:
    keys = _ordered([k for r in rows for k in (r.get("env") or {})])
    out = []
    for k in keys:
        vals = _ordered([str((r.get("env") or {}).get(k)) for r in rows])
        out.append((k, ", ".join(vals)))
    out.append(("seed", ", ".join(_ordered([str(r.get("seed")) for r in rows]))))
    out.append(("dtype", ", ".join(_ordered([str(r.get("dtype")) for r in rows]))))
    return out


def exact_config(rows: list[dict]) -> str:
    import yaml

    config = next((r["config"] for r in reversed(rows) if r.get("config")), None)
    if config is None:
        return "(no config recorded)"
    return yaml.safe_dump(config, sort_keys=False, default_flow_style=False).rstrip()


# --------------------------------------------------------------------------------------------
# Plots


def _figure(ncols: int = 1, nrows: int = 1, w: float = 6.0, h: float = 4.2) -> tuple[Any, list]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # The object API with the Agg canvas: no pyplot global state, no GUI backend ever loaded.
    fig = Figure(figsize=(w * ncols, h * nrows), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, [ax for row in axes for ax in row]


_PALETTE = ["#4c4c4c", "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b",
            "#e377c2", "#bcbd22", "#17becf"]


def method_colors(rows: list[dict]) -> dict[str, str]:
    """One colour per method, the same in every plot; fp16 (first) is grey."""
    return {m: _PALETTE[i % len(_PALETTE)] for i, m in enumerate(method_order(rows))}


def _plain_log_axis(axis: Any, decades: bool = False, span: float = 1.0) -> None:
    """Log scale with plain numbers (1024, 300, 0.05) instead of 2^10 or 3x10^2.

    `decades` places the ticks (at 1, 2 and 5 of each decade when the data spans less than
    three decades, else at powers of ten) for axes whose ticks are not set by hand.
    """
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    if decades:
        axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0) if span < 1e3 else (1.0,)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def pareto_front(pts: list[tuple[float, float]], direction: str) -> list[tuple[float, float]]:
    """Points no other point beats on both fewer bits and a better metric, sorted by bits."""
    sign = 1.0 if direction == LOWER else -1.0
    front: list[tuple[float, float]] = []
    best = math.inf
    for bits, value in sorted(pts, key=lambda p: (p[0], sign * p[1])):
        if sign * value < best:
            front.append((bits, value))
            best = sign * value
    return front


def _avg_bits(rows: list[dict], model: str, method: str) -> float | None:
    for r in rows:
        if r["model"] == model and r["method"] == method and finite(r["metrics"].get("avg_bits")):
            return r["metrics"]["avg_bits"]
    return None


def plot_quality(rows: list[dict], model: str, out: Path) -> Plot | None:
    panels = []
    for metric in QUALITY_METRICS:
        pts = []
        for r in rows:
            if r["model"] == model and finite(r["metrics"].get(metric)):
                bits = _avg_bits([r], model, r["method"]) or _avg_bits(rows, model, r["method"])
                if bits is not None:
                    pts.append((r["method"], bits, r["metrics"][metric]))
        if len(pts) >= 2:
            panels.append((metric, pts))
    if not panels:
        return None
    fig, axes = _figure(ncols=len(panels), w=6.4, h=4.6)
    for ax, (metric, pts) in zip(axes, panels):
        colors = method_colors(rows)
        ax.scatter([p[1] for p in pts], [p[2] for p in pts], c=[colors[p[0]] for p in pts], s=40, zorder=3)
        front = pareto_front([(p[1], p[2]) for p in pts], rule_for(metric).direction)
        ax.step([f[0] for f in front], [f[1] for f in front], where="post", color="#cc0000",
                lw=1.5, alpha=0.8, label="Pareto front", zorder=2)
        for name, bits, value in pts:
            ax.annotate(name, (bits, value), textcoords="offset points", xytext=(5, 5), fontsize=9)
        values = [p[2] for p in pts]
        if min(values) > 0 and max(values) / min(values) > 10:
            ax.set_yscale("log")  # 2-bit ppl can be orders of magnitude above fp16
            _plain_log_axis(ax.yaxis, decades=True, span=max(values) / min(values))
        ax.margins(x=0.1, y=0.08)  # room for the labels of the extreme points
        ax.set_xlabel("average bits per KV element")
        ax.set_ylabel(f"{metric} ({rule_for(metric).direction} is better)")
        ax.set_title(f"{metric} vs avg_bits")
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    fig.suptitle(f"Quality vs compression — {model}")
    path = _save(fig, out / f"quality_{slug(model)}.png")
    return Plot(path, f"Quality vs avg_bits — {model}",
                "Each point is a method; the red step line is the Pareto front (fewer bits and better quality).")


def plot_sweep(rows: list[dict], model: str, task: str, metrics: list[str], axis: str, kind: str,
               out: Path) -> Plot | None:
    """Lines per method of each metric against one sweep axis (context or batch), for one task.

    One task at a time: two tasks measuring the same metric under different protocols would
    otherwise be joined into one zig-zag line.
    """
    other = "batch" if axis == "context" else "context"
    colors = method_colors(rows)
    order = {m: i for i, m in enumerate(method_order(rows))}
    panels = []
    for metric in metrics:
        cells = [r for r in rows if r["model"] == model and r["task"] == task]
        found = [p for p in points(cells, metric) if axis in p[1]]
        # When the other axis varies too, draw one slice of it (the most common value, the largest
        # on a tie): a line per method and batch size would be unreadable.
        fixed = None
        counts = Counter(p[1].get(other) for p in found)
        if len(counts) > 1:
            fixed = max(counts, key=lambda v: (counts[v], v if v is not None else -1))
            found = [p for p in found if p[1].get(other) == fixed]
        series: dict[str, list[tuple[float, float]]] = {}
        for row, axes, value in sorted(found, key=lambda p: order[p[0]["method"]]):
            series.setdefault(row["method"], []).append((axes[axis], value))
        if any(len({x for x, _ in s}) >= 2 for s in series.values()):
            panels.append((metric, series, fixed))
    if not panels:
        return None
    fig, axes_ = _figure(ncols=min(len(panels), 2), nrows=math.ceil(len(panels) / 2), w=6.2, h=4.2)
    for ax, (metric, series, fixed) in zip(axes_, panels):
        scale = 2**30 if metric.endswith("_bytes") else 1
        xs = sorted({p[0] for pts in series.values() for p in pts})
        for method, pts in series.items():
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] / scale for p in pts], marker="o", label=method,
                    color=colors.get(method))
        ax.set_xscale("log", base=2)  # contexts and batches grow in powers of two
        ax.set_xticks(xs)
        _plain_log_axis(ax.xaxis)
        ax.set_xlabel(axis)
        ax.set_ylabel(f"{metric} (GiB)" if scale > 1 else metric)
        ax.set_title(f"{metric} vs {axis}" + (f" ({other} {fixed:g})" if fixed is not None else ""))
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    for ax in axes_[len(panels):]:
        ax.set_visible(False)
    title = f"{kind.capitalize()} vs {axis} — {task}, {model}"
    fig.suptitle(title)
    path = _save(fig, out / f"{kind}_vs_{axis}_{slug(task)}_{slug(model)}.png")
    return Plot(path, title, "")


def plot_max_batch(rows: list[dict], model: str, task: str, out: Path) -> Plot | None:
    data: dict[str, dict[str, float]] = {}  # group (context or "") -> method -> max batch
    cells = [r for r in rows if r["model"] == model and r["task"] == task]
    for row, axes, value in points(cells, "max_batch"):
        group = f"ctx {axes['context']:g}" if "context" in axes else ""
        data.setdefault(group, {})[row["method"]] = value
    if not data:
        return None
    methods = [m for m in method_order(rows) if any(m in g for g in data.values())]
    colors = method_colors(rows)
    groups = sorted(data, key=_num_key)
    fig, (ax,) = _figure(w=max(6.0, 1.0 + 0.9 * len(methods) * len(groups) ** 0.5), h=4.2)
    width = 0.8 / len(groups)
    for i, group in enumerate(groups):
        xs = [j + (i - (len(groups) - 1) / 2) * width for j in range(len(methods))]
        ys = [data[group].get(m, 0) for m in methods]
        bars = ax.bar(xs, ys, width=width, label=group or None,
                      color=[colors[m] for m in methods] if len(groups) == 1 else None)
        ax.bar_label(bars, fmt="%g", fontsize=8)
    ax.set_xticks(range(len(methods)), methods, rotation=20, ha="right")
    ax.set_ylabel("max batch")
    title = f"Max batch — {task}, {model}"
    ax.set_title(title)
    ax.grid(True, axis="y", alpha=0.3)
    if len(groups) > 1:
        ax.legend(fontsize=8)
    path = _save(fig, out / f"max_batch_{slug(task)}_{slug(model)}.png")
    return Plot(path, title, "")


def plot_needles(rows: list[dict], model: str, task: str, out: Path) -> Plot | None:
    """Heatmaps of depth (rows) x context (columns) per method."""
    cells = [r for r in rows if r["model"] == model and r["task"] == task]
    found = []  # (method, depth, context, metric, value)
    for row in cells:
        for name, value in row["metrics"].items():
            axes, rest = split_axes(name)
            if "depth" in axes and "context" in axes and finite(value):
                found.append((row["method"], axes["depth"], axes["context"], rest, value))
    if not found:
        return None
    # One metric per heatmap: accuracy when the task reports it, else the first one seen.
    bases = _ordered([f[3] for f in found])
    metric = "accuracy" if "accuracy" in bases else bases[0]
    grids: dict[str, dict[tuple[float, float], float]] = {}
    for method, depth, ctx, rest, value in found:
        if rest == metric:
            grids.setdefault(method, {})[(depth, ctx)] = value
    if not grids:
        return None
    methods = [m for m in method_order(rows) if m in grids]
    ncols = min(3, len(methods))
    nrows = math.ceil(len(methods) / ncols)
    fig, axes_ = _figure(ncols=ncols, nrows=nrows, w=4.6, h=3.8)
    score = rule_for(metric).delta_style == "abs"  # bounded in [0, 1]
    image = None
    for ax, method in zip(axes_, methods):
        grid = grids[method]
        depths = sorted({d for d, _ in grid})
        ctxs = sorted({c for _, c in grid})
        values = [[grid.get((d, c), math.nan) for c in ctxs] for d in depths]
        image = ax.imshow(values, cmap="RdYlGn", vmin=0 if score else None, vmax=1 if score else None,
                          aspect="auto")
        for i, line in enumerate(values):
            for j, v in enumerate(line):
                if finite(v):
                    # White on the dark ends of the colour map, black in the light middle.
                    dark = score and (v > 0.85 or v < 0.15)
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=9,
                            color="white" if dark else "black")
        ax.set_xticks(range(len(ctxs)), [f"{c:g}" for c in ctxs])
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
        ax.set_xlabel("context")
        ax.set_ylabel("depth")
        ax.set_title(method)
    for ax in axes_[len(methods):]:
        ax.set_visible(False)
    if image is not None:
        fig.colorbar(image, ax=axes_[: len(methods)], shrink=0.8, label=metric)
    title = f"{task}: {metric} by needle depth and context — {model}"
    fig.suptitle(title)
    path = _save(fig, out / f"heatmap_{slug(task)}_{slug(model)}.png")
    return Plot(path, title, "Rows: depth of the needle in the context (0 = start); columns: context length.")


def make_plots(rows: list[dict], out: Path) -> tuple[list[Plot], str | None]:
    """All plots that the data supports, or the reason plots were skipped."""
    try:
        import matplotlib  # noqa: F401  (lazy: only reports need it)
    except ImportError:
        return [], "matplotlib is not installed (pip install 'kvbench[report]')"
    # plots/ belongs to the report: drop PNGs of an earlier report so none goes stale.
    for old in out.glob("*.png"):
        old.unlink()
    ok = [r for r in rows if r["status"] == "ok"]
    makers: list[Callable[[], Plot | None]] = []
    for model in _ordered([r["model"] for r in ok]):
        makers.append(lambda m=model: plot_quality(ok, m, out))
        for task in _ordered([r["task"] for r in ok if r["model"] == model]):
            for axis in ("context", "batch"):
                for kind, metrics in (("memory", MEMORY_METRICS), ("latency", LATENCY_METRICS)):
                    makers.append(
                        lambda m=model, t=task, a=axis, k=kind, ms=metrics: plot_sweep(ok, m, t, ms, a, k, out)
                    )
            makers.append(lambda m=model, t=task: plot_max_batch(ok, m, t, out))
            makers.append(lambda m=model, t=task: plot_needles(ok, m, t, out))
    plots = [p for p in (make() for make in makers) if p is not None]
    return plots, None


# --------------------------------------------------------------------------------------------
# Markdown


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


def _md_table(table: Table) -> str:
    def cell(c: Cell) -> str:
        return _md_escape(c.text + (f" ({c.delta})" if c.delta else ""))

    lines = ["| " + " | ".join(_md_escape(h) for h in table.header) + " |"]
    lines.append("|" + "|".join([":---"] + ["---:"] * (len(table.header) - 1)) + "|")
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in table.rows]
    return "\n".join(lines)


def render_markdown(rows: list[dict], run_dir: Path, sections: list[Section], plots: list[Plot],
                    skipped: str | None) -> str:
    out = ["# kvbench report", ""]
    out += [f"- **{k}:** {v}" for k, v in header_info(rows, run_dir)]
    out.append("")
    for s in sections:
        title = s.task if len({x.model for x in sections}) == 1 else f"{s.task} — {s.model}"
        out += [f"## {title}", "", f"Protocol: {s.protocol}", ""]
        if s.description:
            out += [f"_{s.description}_", ""]
        for t in s.tables:
            if t.title:
                out += [f"**{t.title}**", ""]
            out += [_md_table(t), ""]
        out += [f"_Note: {n}_  " for n in s.notes]
        if s.problems:
            out += ["", "Failed or skipped cells:", ""] + [f"- {p}" for p in s.problems]
        out.append("")
    out += ["## Plots", ""]
    if skipped:
        out += [f"Plots skipped: {skipped}.", ""]
    elif not plots:
        out += ["No plottable data.", ""]
    for p in plots:
        rel = p.path.relative_to(run_dir).as_posix()
        out += [f"### {p.title}", "", f"![{p.title}]({rel})", ""]
        if p.caption:
            out += [p.caption, ""]
    out += ["## Environment", "", "| key | value |", "|:---|:---|"]
    out += [f"| {k} | {_md_escape(v)} |" for k, v in environment(rows)]
    out += ["", "<details><summary>Exact config</summary>", "", "```yaml", exact_config(rows), "```", "",
            "</details>", ""]
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# HTML

CSS = """
body { font: 14px/1.45 -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; color: #1d2329;
       max-width: 1280px; margin: 0 auto; padding: 24px 32px; background: #fff; }
h1 { font-size: 26px; margin: 0 0 12px; }
h2 { font-size: 20px; margin: 32px 0 8px; padding-bottom: 4px; border-bottom: 1px solid #d8dee4; }
h3 { font-size: 15px; margin: 20px 0 6px; }
dl.meta { display: grid; grid-template-columns: max-content 1fr; gap: 2px 16px; margin: 0; }
dl.meta dt { font-weight: 600; color: #57606a; }
dl.meta dd { margin: 0; }
nav { margin: 16px 0; font-size: 13px; }
nav a { margin-right: 12px; }
.tables { display: flex; flex-wrap: wrap; gap: 0 28px; align-items: flex-start; }
table { border-collapse: collapse; margin: 8px 0 12px; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #d8dee4; padding: 4px 10px; }
th { background: #f3f5f7; text-align: center; font-weight: 600; }
td { text-align: right; white-space: nowrap; }
td:first-child, th:first-child { text-align: left; }
tr:nth-child(even) td { background: #fafbfc; }
.delta { font-size: 12px; margin-left: 4px; color: #6e7781; }
.delta.better { color: #1a7f37; }
.delta.worse { color: #cf222e; }
.protocol, .note { color: #57606a; font-size: 13px; margin: 4px 0; }
.problem { color: #cf222e; }
.caption { font-weight: 600; font-size: 13px; margin: 6px 0 2px; }
figure { margin: 16px 0 24px; }
figure img { max-width: 100%; height: auto; border: 1px solid #eaeef2; }
figcaption { color: #57606a; font-size: 13px; }
pre { background: #f6f8fa; padding: 12px; overflow-x: auto; font-size: 12px; }
details summary { cursor: pointer; font-weight: 600; margin: 12px 0; }
table.env td { text-align: left; white-space: normal; }
"""


def _html_table(table: Table, cls: str = "") -> str:
    e = html.escape
    head = "".join(f"<th>{e(h)}</th>" for h in table.header)
    body = []
    for row in table.rows:
        cells = []
        for c in row:
            delta = f'<span class="delta {c.tone}">({e(c.delta)})</span>' if c.delta else ""
            cells.append(f"<td>{e(c.text)}{delta}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    caption = f'<div class="caption">{e(table.title)}</div>' if table.title else ""
    return f'{caption}<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def render_html(rows: list[dict], run_dir: Path, sections: list[Section], plots: list[Plot],
                skipped: str | None) -> str:
    e = html.escape
    one_model = len({s.model for s in sections}) == 1
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>kvbench report — {e(run_dir.name or str(run_dir))}</title>",
        f"<style>{CSS}</style></head><body>",
        "<h1>kvbench report</h1>",
        '<dl class="meta">' + "".join(f"<dt>{e(k)}</dt><dd>{e(v)}</dd>" for k, v in header_info(rows, run_dir)) + "</dl>",
    ]
    links = [(f"sec-{i}", s.task if one_model else f"{s.task} — {s.model}") for i, s in enumerate(sections)]
    links += [("plots", "Plots"), ("env", "Environment"), ("config", "Config")]
    parts.append("<nav>" + "".join(f'<a href="#{a}">{e(t)}</a>' for a, t in links) + "</nav>")
    for (anchor, title), s in zip(links, sections):
        parts.append(f'<section id="{anchor}"><h2>{e(title)}</h2>')
        parts.append(f'<p class="protocol">Protocol: {e(s.protocol)}</p>')
        if s.description:
            parts.append(f'<p class="protocol description">{e(s.description)}</p>')
        # Tables side by side where they fit: a sweep yields several narrow pivot tables.
        parts.append('<div class="tables">' + "".join(f"<div>{_html_table(t)}</div>" for t in s.tables) + "</div>")
        parts += [f'<p class="note">{e(n)}</p>' for n in s.notes]
        if s.problems:
            parts.append('<p class="note">Failed or skipped cells:</p><ul class="problem">'
                         + "".join(f"<li>{e(p)}</li>" for p in s.problems) + "</ul>")
        parts.append("</section>")
    parts.append('<section id="plots"><h2>Plots</h2>')
    if skipped:
        parts.append(f'<p class="note">Plots skipped: {e(skipped)}.</p>')
    elif not plots:
        parts.append('<p class="note">No plottable data.</p>')
    for p in plots:
        data = base64.b64encode(p.path.read_bytes()).decode("ascii")
        parts.append(
            f'<figure><img src="data:image/png;base64,{data}" alt="{e(p.title)}">'
            f"<figcaption>{e(p.title)}{'. ' + e(p.caption) if p.caption else ''}</figcaption></figure>"
        )
    parts.append("</section>")
    env_table = Table("", ["key", "value"], [[Cell(k), Cell(v)] for k, v in environment(rows)])
    parts.append(f'<section id="env"><h2>Environment</h2>{_html_table(env_table, "env")}</section>')
    parts.append(
        '<section id="config"><h2>Config</h2><details open><summary>Exact config</summary>'
        f"<pre>{e(exact_config(rows))}</pre></details></section>"
    )
    parts.append("</body></html>\n")
    return "\n".join(parts)


# --------------------------------------------------------------------------------------------
# Entry points


def write_report(run_dir: Path, plots: bool = True) -> list[Path]:
    """Write report.md, report.html and plots/*.png into `run_dir`; return the paths written.

    Raises InputError when DIR/results.jsonl is missing or unreadable.
    """
    run_dir = Path(run_dir)
    rows = read_results(run_dir)
    sections = build_sections(rows)
    if plots:
        plot_list, skipped = make_plots(rows, run_dir / PLOTS_DIR)
    else:
        plot_list, skipped = [], "disabled with --no-plots"
    md = run_dir / "report.md"
    md.write_text(render_markdown(rows, run_dir, sections, plot_list, skipped), encoding="utf-8")
    page = run_dir / "report.html"
    page.write_text(render_html(rows, run_dir, sections, plot_list, skipped), encoding="utf-8")
    return [md, page, *(p.path for p in plot_list)]


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(
        prog="kvbench report", description="Write report.md, report.html and plots for a run directory."
    )
    parser.add_argument("run_dir", type=Path, metavar="DIR", help="run directory containing results.jsonl")
    parser.add_argument("--no-plots", action="store_true", help="tables only")
    args = parser.parse_args(argv)
    if not args.run_dir.is_dir():
        print(f"kvbench report: error: {args.run_dir}: not a directory; give a run directory "
              "containing results.jsonl", file=sys.stderr)
        return 2
    try:
        paths = write_report(args.run_dir, plots=not args.no_plots)
    except InputError as exc:
        print(f"kvbench report: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"kvbench report: error: cannot write in {args.run_dir}: {exc.strerror}", file=sys.stderr)
        return 2
    for p in paths[:2]:
        print(p)
    if len(paths) > 2:
        print(f"{len(paths) - 2} plot(s) in {args.run_dir / PLOTS_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
