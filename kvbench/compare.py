"""`kvbench compare BASELINE CURRENT`: the regression gate.

Cells are matched by (model, method label, task). Every metric is judged by its rule
(`kvbench.metric_directions`, overridable with ``--tolerances FILE``): a move the wrong way beyond
tolerance is a regression, and so is a cell that was ok in the baseline and failed now.

Exit status: 0 pass, 1 regression (or a warning under ``--strict``), 2 unusable input.
User errors print one line naming the file (and line) and what is allowed; never a traceback.
"""

from __future__ import annotations

import argparse
import difflib
import fnmatch
import json
import math
import os
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable

from kvbench.errors import UserError
from kvbench.metric_directions import (
    DIRECTIONS,
    HARDWARE_KINDS,
    INFO,
    METRICS,
    NEUTRAL,
    SPEED,
    MetricRule,
    base_name,
    finite,
    is_better,
    known_rule,
    rule_for,
)

RESULTS_FILE = "results.jsonl"
STATUSES = ("ok", "failed", "skipped")
REQUIRED_FIELDS = ("model", "method", "task", "status")

# Metric verdicts, worst first. Only REGRESSED fails the gate; WARN fails it under --strict.
REGRESSED = "regressed"
WARN = "warn"
IMPROVED = "improved"
OK = "ok"
INFO_V = "info"
NEW = "new"
IGNORED = "ignored"


class InputError(UserError):
    """Unusable input: the message is one line, shown as-is, and the exit status is 2."""


# --------------------------------------------------------------------------------------------
# Reading results.jsonl


def results_path(path: Path) -> Path:
    """A run directory or a results.jsonl file -> the results file."""
    if path.is_dir():
        path = path / RESULTS_FILE
        if not path.is_file():
            raise InputError(f"{path}: not found; a run directory must contain {RESULTS_FILE}")
    elif not path.is_file():
        raise InputError(
            f"{path}: no such file or directory; give a run directory or its {RESULTS_FILE}"
        )
    return path


def flatten_metrics(metrics: Any, prefix: str = "") -> dict[str, float]:
    """Numbers only, nested dicts flattened with dots; anything else is dropped.

    The contract says metrics are numbers, but a nested dict costs nothing to accept and a stray
    string must not crash the gate.
    """
    out: dict[str, float] = {}
    if not isinstance(metrics, dict):
        return out
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten_metrics(value, name + "."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = value
    return out


def read_results(path: Path | str) -> list[dict]:
    """Rows of a results file, the latest per cell, in order of each cell's first appearance.

    Each row gets `cell_id` (derived from model|method|task when absent) and flattened metrics.
    """
    file = results_path(Path(path))
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{file}: cannot read: {exc}") from None
    rows: dict[tuple[str, str, str], dict] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{file}:{lineno}: not valid JSON ({exc.msg}, column {exc.colno})") from None
        if not isinstance(row, dict):
            raise InputError(f"{file}:{lineno}: expected one JSON object per line")
        for key in REQUIRED_FIELDS:
            if not isinstance(row.get(key), str):
                raise InputError(
                    f"{file}:{lineno}: missing or non-string {key!r}; "
                    f"every row needs {', '.join(REQUIRED_FIELDS)}"
                )
        if row["status"] not in STATUSES:
            raise InputError(
                f"{file}:{lineno}: status {row['status']!r} is not one of {', '.join(STATUSES)}"
            )
        row = dict(row)
        row["metrics"] = flatten_metrics(row.get("metrics"))
        row.setdefault("cell_id", f"{row['model']}|{row['method']}|{row['task']}")
        key = (row["model"], row["method"], row["task"])
        # Dicts keep first-insertion order, so a superseding row keeps its cell's position.
        rows[key] = row
    if not rows:
        raise InputError(f"{file}: no result rows")
    return list(rows.values())


def cell_key(row: dict) -> tuple[str, str, str]:
    return (row["model"], row["method"], row["task"])


def cell_name(key: tuple[str, str, str]) -> str:
    return "|".join(key)


# --------------------------------------------------------------------------------------------
# Tolerances file

METRIC_KEYS = ("abs", "rel", "direction", "ignore")
CELLS_KEY = "cells"


@dataclass
class Tolerances:
    """Overrides of the default rules. `None` as a rule means: ignore this metric."""

    metrics: dict[str, MetricRule | None] = field(default_factory=dict)
    # (cell pattern, {metric: rule}); patterns are fnmatch globs on "model|method|task".
    cells: list[tuple[str, dict[str, MetricRule | None]]] = field(default_factory=list)

    def rule(self, cell: str, metric: str) -> MetricRule | None:
        """Most specific wins: cell+full name, cell+base name, full name, base name, default."""
        base = base_name(metric)
        for pattern, overrides in self.cells:
            if fnmatch.fnmatchcase(cell, pattern):
                for name in (metric, base):
                    if name in overrides:
                        return overrides[name]
        for name in (metric, base):
            if name in self.metrics:
                return self.metrics[name]
        return rule_for(metric)


def _yaml_lines(text: str) -> dict[tuple[str, ...], int]:
    """Line number (1-based) of every mapping key, by key path, for error messages."""
    import yaml

    lines: dict[tuple[str, ...], int] = {}

    def walk(node: Any, path: tuple[str, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                sub = path + (str(key_node.value),)
                lines[sub] = key_node.start_mark.line + 1
                walk(value_node, sub)

    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return lines
    if root is not None:
        walk(root, ())
    return lines


def _did_you_mean(word: str, choices: Iterable[str]) -> str:
    """'did you mean 'x'? ' or an empty string."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}? " if close else ""


def _parse_metric_entry(
    name: str, entry: Any, where: str, path: tuple[str, ...], lines: dict
) -> MetricRule | None:
    def fail(msg: str, sub: tuple[str, ...] = ()) -> InputError:
        line = lines.get(path + sub, lines.get(path, 0))
        return InputError(f"{where}:{line}: {msg}")

    if not isinstance(entry, dict) or not entry:
        raise fail(f"{name!r} must map to {{abs: x}} and/or {{rel: y}} (optional: direction, ignore)")
    for key in entry:
        if key not in METRIC_KEYS:
            raise fail(
                f"unknown key {key!r} under {name!r}; {_did_you_mean(str(key), METRIC_KEYS)}"
                f"allowed: {', '.join(METRIC_KEYS)}",
                (str(key),),
            )
    if entry.get("ignore") is True:
        return None
    if "ignore" in entry and entry["ignore"] is not False:
        raise fail(f"'ignore' under {name!r} must be true or false", ("ignore",))

    base = known_rule(name)
    direction = entry.get("direction")
    if direction is not None and direction not in DIRECTIONS:
        raise fail(
            f"direction {direction!r} under {name!r} is not one of {', '.join(DIRECTIONS)}",
            ("direction",),
        )
    if base is None and direction is None:
        hint = _did_you_mean(base_name(name), METRICS)
        raise fail(
            f"unknown metric {name!r}; {hint}a metric not in the directions table "
            f"(docs/regression-gate.md) needs 'direction: {'|'.join(DIRECTIONS)}'"
        )
    tol: dict[str, float] = {}
    for key in ("abs", "rel"):
        if key in entry:
            value = entry[key]
            if not finite(value) or value < 0:
                raise fail(f"{key} under {name!r} must be a number >= 0, got {value!r}", (key,))
            tol[key] = float(value)
    if not tol and direction is None:
        raise fail(f"{name!r} needs abs and/or rel (or ignore: true)")
    rule = base or rule_for(name)
    # What the file says is the whole tolerance: a key left out counts as 0, not as the default.
    if tol:
        rule = replace(rule, abs_tol=tol.get("abs", 0.0), rel_tol=tol.get("rel", 0.0))
    if direction is not None:
        rule = replace(rule, direction=direction, informational=False)
    return replace(rule, source="tolerances")


def load_tolerances(path: Path | str | None) -> Tolerances:
    """Parse a tolerances YAML file; raise InputError naming the line of any mistake."""
    tolerances = Tolerances()
    if path is None:
        return tolerances
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read tolerances file: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark else 0
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise InputError(f"{path}:{line}: not valid YAML ({problem})") from None
    if data is None:
        return tolerances
    if not isinstance(data, dict):
        raise InputError(
            f"{path}:1: expected a mapping of metric name -> {{abs: x}} | {{rel: y}} "
            f"(plus optional '{CELLS_KEY}:')"
        )
    lines = _yaml_lines(text)
    where = str(path)
    for name, entry in data.items():
        name = str(name)
        if name == CELLS_KEY:
            if not isinstance(entry, dict):
                raise InputError(
                    f"{where}:{lines.get((name,), 0)}: '{CELLS_KEY}' must map "
                    f"'model|method|task' patterns to metric tolerances"
                )
            for pattern, overrides in entry.items():
                pattern = str(pattern)
                cpath = (CELLS_KEY, pattern)
                if pattern.count("|") != 2:
                    raise InputError(
                        f"{where}:{lines.get(cpath, 0)}: cell {pattern!r} must be "
                        f"'model|method|task' (globs allowed, e.g. '*|kivi-2|*')"
                    )
                if not isinstance(overrides, dict):
                    raise InputError(
                        f"{where}:{lines.get(cpath, 0)}: cell {pattern!r} must map metric names "
                        f"to tolerances"
                    )
                parsed = {
                    str(m): _parse_metric_entry(str(m), e, where, cpath + (str(m),), lines)
                    for m, e in overrides.items()
                }
                tolerances.cells.append((pattern, parsed))
            continue
        custom = isinstance(entry, dict) and "direction" in entry
        if known_rule(name) is None and not custom:
            hint = _did_you_mean(name, list(METRICS) + [CELLS_KEY])
            raise InputError(
                f"{where}:{lines.get((name,), 0)}: unknown key {name!r}; {hint}top-level keys are "
                f"metric names from the directions table (docs/regression-gate.md) and "
                f"'{CELLS_KEY}'; a custom metric needs 'direction: {'|'.join(DIRECTIONS)}'"
            )
        tolerances.metrics[name] = _parse_metric_entry(name, entry, where, (name,), lines)
    return tolerances


# --------------------------------------------------------------------------------------------
# Comparison


@dataclass
class MetricChange:
    cell: str
    metric: str
    baseline: float | None
    current: float | None
    verdict: str
    tolerance: str
    kind: str
    note: str = ""

    @property
    def delta(self) -> float | None:
        if self.baseline is None or self.current is None:
            return None
        if not (finite(self.baseline) and finite(self.current)):
            return None
        return self.current - self.baseline

    @property
    def rel(self) -> float | None:
        d = self.delta
        if d is None or self.baseline == 0:
            return None
        return d / abs(self.baseline)

    def size(self) -> str:
        """The change in words: '23.1 -> 30.03 (+30.0%)'."""
        text = f"{fmt(self.baseline)} -> {fmt(self.current)}"
        if self.kind == SPEED and self.rel is not None:
            return f"{text} ({self.current / self.baseline:.2f}x)"
        parts = [f"{self.delta:+.4g}"] if self.delta is not None else []
        if self.rel is not None:
            parts.append(f"{self.rel * 100:+.1f}%")
        return f"{text} ({', '.join(parts)})" if parts else text


@dataclass
class CellIssue:
    cell: str
    verdict: str  # REGRESSED, WARN or INFO_V
    message: str


@dataclass
class CompareResult:
    changes: list[MetricChange] = field(default_factory=list)
    cells: list[CellIssue] = field(default_factory=list)
    compared_cells: int = 0
    # Per cell: protocol, parameter and device differences, quoted next to its regressions.
    context: dict[str, list[str]] = field(default_factory=dict)

    @property
    def regressions(self) -> list[MetricChange | CellIssue]:
        return [x for x in [*self.cells, *self.changes] if x.verdict == REGRESSED]

    @property
    def warnings(self) -> list[MetricChange | CellIssue]:
        return [x for x in [*self.cells, *self.changes] if x.verdict == WARN]

    @property
    def improvements(self) -> list[MetricChange]:
        return [c for c in self.changes if c.verdict == IMPROVED]

    def exit_code(self, strict: bool = False) -> int:
        if self.regressions or (strict and self.warnings):
            return 1
        return 0

    def to_json(self, strict: bool = False) -> dict:
        def clean(item: Any) -> dict:
            d = asdict(item)
            for k, v in d.items():
                if isinstance(v, float) and not math.isfinite(v):
                    d[k] = str(v)  # JSON has no NaN/inf
            if isinstance(item, MetricChange):
                d["delta"], d["rel"] = item.delta, item.rel
            return d

        code = self.exit_code(strict)
        return {
            "verdict": "fail" if code else "pass",
            "exit_code": code,
            "compared_cells": self.compared_cells,
            "regressions": [clean(x) for x in self.regressions],
            "warnings": [clean(x) for x in self.warnings],
            "improvements": [clean(x) for x in self.improvements],
            "cells": [clean(x) for x in self.cells],
            "metrics": [clean(x) for x in self.changes],
        }


def _judge(rule: MetricRule, base: float, cur: float, same_device: bool) -> tuple[str, str]:
    """Verdict and note for one metric present on both sides."""
    if not (finite(base) and finite(cur)):
        if repr(base) == repr(cur):
            return OK, ""
        if finite(base):  # a number became nan/inf: the method broke
            verdict = INFO_V if rule.direction == INFO or rule.informational else REGRESSED
            return verdict, f"became {cur}"
        if finite(cur):
            return IMPROVED, f"was {base}"
        return WARN, "non-finite on both sides"
    delta = cur - base
    if rule.direction == NEUTRAL:
        return (OK, "") if delta == 0 else (WARN, "must not change: protocol changed?")
    # A hair of slack so that float noise never fails an exact (0) tolerance.
    if abs(delta) <= rule.threshold(base) + 1e-12 * max(1.0, abs(base)):
        return OK, ""
    if rule.direction == INFO or rule.informational:
        return INFO_V, "informational"
    better = is_better(rule, base, cur)
    if rule.kind in HARDWARE_KINDS and not same_device:
        return WARN, "different device: not gated"
    return (IMPROVED, "") if better else (REGRESSED, "")


def _env(row: dict, key: str) -> Any:
    env = row.get("env")
    return env.get(key) if isinstance(env, dict) else None


def _protocol_notes(b: dict, c: dict) -> list[str]:
    """Differences that explain a change without being one: shown next to the cell."""
    notes = []
    for key in ("task_version", "mode", "dtype", "seed"):
        if b.get(key) != c.get(key):
            notes.append(f"{key} {b.get(key)} -> {c.get(key)}")
    for key in ("task_params", "method_params"):
        bp, cp = b.get(key) or {}, c.get(key) or {}
        if bp != cp and isinstance(bp, dict) and isinstance(cp, dict):
            diffs = [
                f"{k} {bp.get(k, '-')} -> {cp.get(k, '-')}"
                for k in sorted(set(bp) | set(cp), key=str)
                if bp.get(k) != cp.get(k)
            ]
            notes.append(f"{key}: " + ", ".join(diffs))
    return notes


def compare(
    baseline_rows: list[dict], current_rows: list[dict], tolerances: Tolerances | None = None
) -> CompareResult:
    """Judge every cell and metric of `current_rows` against `baseline_rows`. Pure."""
    tolerances = tolerances or Tolerances()
    result = CompareResult()
    base = {cell_key(r): r for r in baseline_rows}
    cur = {cell_key(r): r for r in current_rows}
    order = list(base) + [k for k in cur if k not in base]

    for key in order:
        cell = cell_name(key)
        b, c = base.get(key), cur.get(key)
        if c is None:
            result.cells.append(CellIssue(cell, WARN, "missing in current run"))
            continue
        if b is None:
            result.cells.append(CellIssue(cell, INFO_V, f"new cell (status {c['status']})"))
            continue
        bs, cs = b["status"], c["status"]
        if cs == "failed":
            error = c.get("error") or "no error message"
            verdict = REGRESSED if bs == "ok" else WARN
            result.cells.append(CellIssue(cell, verdict, f"failed (was {bs}): {error}"))
            continue
        if cs == "skipped":
            verdict = WARN if bs == "ok" else INFO_V
            reason = c.get("error") or "; ".join(c.get("notes") or []) or "no reason given"
            result.cells.append(CellIssue(cell, verdict, f"skipped (was {bs}): {reason}"))
            continue
        if bs != "ok":
            result.cells.append(CellIssue(cell, INFO_V, f"now ok (was {bs}): nothing to compare"))
            continue

        result.compared_cells += 1
        notes = _protocol_notes(b, c)
        bdev, cdev = _env(b, "device"), _env(c, "device")
        same_device = bdev == cdev
        if not same_device:
            notes.append(f"device {bdev} -> {cdev}: speed and memory not gated")
        for note in notes:
            result.cells.append(CellIssue(cell, INFO_V, note))
        if notes:
            result.context[cell] = notes

        bm, cm = b["metrics"], c["metrics"]
        for metric in list(bm) + [m for m in cm if m not in bm]:
            rule = tolerances.rule(cell, metric)
            bv, cv = bm.get(metric), cm.get(metric)
            if rule is None:
                tol, kind, verdict, note = "ignored", "", IGNORED, ""
            else:
                tol, kind = rule.describe_tolerance(), rule.kind
                if cv is None:
                    verdict, note = WARN, "missing in current run"
                elif bv is None:
                    verdict, note = NEW, ""
                else:
                    verdict, note = _judge(rule, bv, cv, same_device)
            result.changes.append(MetricChange(cell, metric, bv, cv, verdict, tol, kind, note))
    return result


# --------------------------------------------------------------------------------------------
# Output


def fmt(x: float | None) -> str:
    if x is None:
        return "-"
    if not finite(x):
        return str(x)
    if float(x).is_integer() and abs(x) >= 1000:
        return f"{int(x):,}"
    if x != 0 and (abs(x) < 1e-3 or abs(x) >= 1e6):
        return f"{x:.3e}"
    return f"{x:.4g}"


_STYLE = {REGRESSED: "bold red", WARN: "yellow", IMPROVED: "green", INFO_V: "cyan", NEW: "cyan"}


def _make_console(file: Any = None) -> Any:
    from rich.console import Console

    file = file or sys.stdout
    # CI logs are not terminals and rich would wrap at 80 columns: give the table room.
    width = None if file.isatty() or "COLUMNS" in os.environ else 160
    return Console(file=file, width=width, highlight=False, soft_wrap=False)


def render(result: CompareResult, show_all: bool = False, strict: bool = False, file: Any = None) -> None:
    """Print the change table, cell notes and the verdict with one line per regression."""
    from rich.table import Table

    console = _make_console(file)
    shown = [
        c
        for c in result.changes
        if show_all or c.verdict not in (OK, IGNORED) or (c.delta not in (None, 0))
    ]
    unchanged = len(result.changes) - len(shown)
    if shown:
        table = Table(title="Metric changes", title_justify="left", show_lines=False)
        for col, justify in [
            ("cell", "left"), ("metric", "left"), ("baseline", "right"), ("current", "right"),
            ("delta", "right"), ("rel / ratio", "right"), ("tolerance", "left"),
            ("verdict", "left"),
        ]:
            table.add_column(col, justify=justify, overflow="fold")
        last_cell = None
        for c in shown:
            if c.kind == SPEED and c.rel is not None:
                rel = f"{c.current / c.baseline:.3f}x"
            else:
                rel = f"{c.rel * 100:+.2f}%" if c.rel is not None else "-"
            delta = f"{c.delta:+.4g}" if c.delta is not None else "-"
            verdict = c.verdict + (f" ({c.note})" if c.note else "")
            style = _STYLE.get(c.verdict, "")
            table.add_row(
                c.cell if c.cell != last_cell else "", c.metric, fmt(c.baseline), fmt(c.current),
                delta, rel, c.tolerance, f"[{style}]{verdict}[/]" if style else verdict,
            )
            last_cell = c.cell
        console.print(table)
    if unchanged:
        console.print(f"{unchanged} metric(s) unchanged (use --all to list them)")
    if result.cells:
        console.print("\nCells:")
        for issue in result.cells:
            style = _STYLE.get(issue.verdict, "")
            console.print(f"  [{style or 'default'}]{issue.verdict:9}[/] {issue.cell}: {issue.message}", markup=True)

    # The verdict lines are plain text so they read the same in any log and grep well.
    out = file or sys.stdout
    regressions, warnings = result.regressions, result.warnings
    print(file=out)
    for item in regressions:
        if isinstance(item, MetricChange):
            note = f", {item.note}" if item.note else ""
            if item.cell in result.context:  # e.g. "method_params: clip_ratio 1.0 -> 0.3"
                note += f" [{'; '.join(result.context[item.cell])}]"
            print(
                f"REGRESSION {item.metric} in {item.cell}: {item.size()}; "
                f"tolerance {item.tolerance}{note}",
                file=out,
            )
        else:
            print(f"REGRESSION {item.cell}: {item.message}", file=out)
    if strict:
        for item in warnings:
            what = f"{item.metric}: {item.size()} ({item.note})" if isinstance(item, MetricChange) else item.message
            print(f"WARNING (strict) {item.cell}: {what}", file=out)
    n_metrics = sum(1 for c in result.changes if c.verdict != IGNORED)
    summary = (
        f"{result.compared_cells} cell(s), {n_metrics} metric(s) compared; "
        f"{len(regressions)} regression(s), {len(warnings)} warning(s), "
        f"{len(result.improvements)} improvement(s) beyond tolerance"
    )
    if result.exit_code(strict):
        print(f"FAIL: {summary}", file=out)
    else:
        print(f"PASS: {summary}", file=out)
        if result.improvements:
            print("Improvements beyond tolerance: consider refreshing the baseline.", file=out)


class OneLineParser(argparse.ArgumentParser):
    """argparse with usage errors on one line (exit 2), like the rest of the CLI."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(
        prog="kvbench compare",
        description="Compare two kvbench runs and fail when a metric regresses beyond tolerance.",
    )
    parser.add_argument("baseline", type=Path, help="baseline run directory or results.jsonl")
    parser.add_argument("current", type=Path, help="current run directory or results.jsonl")
    parser.add_argument("--tolerances", type=Path, metavar="FILE", help="YAML tolerance overrides")
    parser.add_argument("--json", type=Path, metavar="OUT", help="write a machine-readable verdict")
    parser.add_argument("--all", action="store_true", help="also list unchanged metrics")
    parser.add_argument(
        "--strict", action="store_true",
        help="fail on warnings too (missing cells or metrics, changed counts, skipped cells)",
    )
    args = parser.parse_args(argv)
    try:
        tolerances = load_tolerances(args.tolerances)
        baseline = read_results(args.baseline)
        current = read_results(args.current)
    except InputError as exc:
        print(f"kvbench compare: error: {exc}", file=sys.stderr)
        return 2
    result = compare(baseline, current, tolerances)
    render(result, show_all=args.all, strict=args.strict)
    if args.json:
        try:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result.to_json(args.strict), indent=2) + "\n")
        except OSError as exc:
            print(f"kvbench compare: error: cannot write {args.json}: {exc.strerror}", file=sys.stderr)
            return 2
    return result.exit_code(args.strict)


if __name__ == "__main__":
    sys.exit(main())
