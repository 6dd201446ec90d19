"""Runs a benchmark config cell by cell (model x method x task) into DIR/results.jsonl.

Each finished cell is on disk before the next starts; a re-run skips cells already `ok` unless
forced. A cell that raises (or runs out of memory) is recorded `failed` with a one-line error
and the traceback in DIR/logs/, and the others still run.
"""

from __future__ import annotations

import fnmatch
import gc
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from kvbench import data, results
from kvbench.calibration import calibrate
from kvbench.config import BenchmarkConfig, MethodSpec, TaskSpec
from kvbench.errors import ConfigError, UserError
from kvbench.model import load_model
from kvbench.params import ParamError
from kvbench.registry import methods as method_registry
from kvbench.task import Progress as StepProgress
from kvbench.task import TaskContext

EXIT_OK, EXIT_FAILED_CELLS, EXIT_USAGE = 0, 1, 2


@dataclass
class Cell:
    model_index: int
    method_index: int
    method: MethodSpec
    task: TaskSpec


def select_cells(cfg: BenchmarkConfig, only: list[str] | None) -> list[tuple[int, list[Cell]]]:
    """Cells per model, filtered by --only patterns.

    Each pattern (a glob) must match a model name, method label or task label; a cell runs when,
    for every kind of name that some pattern matched, one of those patterns matches it.
    """
    filters: dict[str, list[str]] = {}
    names = {
        "model": [m.name for m in cfg.models],
        "method": [m.label for m in cfg.methods],
        "task": [t.label for t in cfg.tasks],
    }
    for pattern in only or []:
        kinds = [k for k, vals in names.items() if fnmatch.filter(vals, pattern)]
        if not kinds:
            everything = sorted(set(sum(names.values(), [])))
            raise ConfigError(f"--only {pattern}: matches no model, method or task; names: {', '.join(everything)}")
        for kind in kinds:
            filters.setdefault(kind, []).append(pattern)

    def keep(kind: str, name: str) -> bool:
        return kind not in filters or any(fnmatch.fnmatch(name, p) for p in filters[kind])

    plan = []
    for mi, model in enumerate(cfg.models):
        if not keep("model", model.name):
            continue
        cells = [
            Cell(mi, i, m, t)
            for i, m in enumerate(cfg.methods)
            if keep("method", m.label)
            for t in cfg.tasks
            if keep("task", t.label)
        ]
        if cells:
            plan.append((mi, cells))
    return plan


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


def run_benchmark(
    cfg: BenchmarkConfig,
    force: bool = False,
    only: list[str] | None = None,
    console: Console | None = None,
) -> int:
    console = console or Console(stderr=True)
    out = Path(cfg.output)
    data.set_data_dir(cfg.data_dir)
    torch.manual_seed(cfg.seed)
    plan = select_cells(cfg, only)
    done = {cid for cid, row in results.read_results(out).items() if row.get("status") == "ok"}
    env = results.environment(cfg.device)
    total = sum(len(cells) for _, cells in plan)
    failed = 0

    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns, console=console, transient=False) as bar:
        cells_bar = bar.add_task("cells", total=total)
        steps_bar = bar.add_task("", total=1, visible=False)

        def on_step(description: str, n_done: int, n_total: int) -> None:
            bar.update(steps_bar, description=f"  {description}", completed=n_done, total=max(n_total, 1), visible=True)

        for model_index, cells in plan:
            model_spec = cfg.models[model_index]
            todo = [c for c in cells if force or results.cell_id(model_spec.name, c.method.label, c.task.label) not in done]
            bar.advance(cells_bar, len(cells) - len(todo))
            if not todo:
                continue
            bar.update(cells_bar, description=f"loading {model_spec.name}")
            try:
                lm = load_model(model_spec.name, model_spec.path, cfg.device, cfg.dtype)
            except UserError as e:
                raise ConfigError(f"models[{model_index}].path: {e}") from None
            for spec_index, spec in enumerate(cfg.methods):
                try:
                    spec.method.check_geometry(lm.geometry)
                except ParamError as e:
                    raise ConfigError(
                        f"methods[{spec_index}].params.{e.field}: {e.message} (model {model_spec.name})"
                    ) from None
            reference = method_registry.get("fp16")()
            calibrated: dict[str, dict] = {}

            for cell in todo:
                cid = results.cell_id(model_spec.name, cell.method.label, cell.task.label)
                bar.update(cells_bar, description=cid)
                method, task = cell.method.method, cell.task.task
                row = {
                    "cell_id": cid,
                    "model": model_spec.name,
                    "model_source": lm.source,
                    "method": cell.method.label,
                    "method_name": method.name,
                    "task": cell.task.label,
                    "task_name": task.name,
                    "task_version": task.version,
                    "mode": method.mode,
                    "method_params": method.params(),
                    "task_params": task.params(),
                    "protocol": task.protocol(),
                    "seed": cfg.seed,
                    "dtype": cfg.dtype,
                    "env": env,
                    "config": cfg.raw,
                }
                notes = []
                if method.simulated and method.name != "fp16":
                    notes.append("simulated: fake quantization (quantize then dequantize); no memory saved")
                start = time.perf_counter()
                try:
                    if method.needs_calibration:
                        if cell.method.label not in calibrated:
                            bar.update(steps_bar, description="  calibrating", visible=True)
                            calibrated[cell.method.label] = calibrate(lm, method)
                        row["calibration"] = calibrated[cell.method.label]
                    torch.manual_seed(cfg.seed)
                    ctx = TaskContext(
                        lm=lm,
                        method=method,
                        method_label=cell.method.label,
                        seed=cfg.seed,
                        cache_dir=out / ".cache",
                        progress=StepProgress(on_step),
                        reference_method=reference,
                    )
                    result = task.run(ctx)
                    metrics = dict(result.metrics)
                    metrics.setdefault("avg_bits", method.avg_bits(lm.geometry, task.context_len()))
                    row.update(status="ok", metrics=metrics, error=None)
                    notes += result.notes
                except KeyboardInterrupt:
                    raise
                except Exception as e:  # recorded, and the run goes on with the next cell
                    failed += 1
                    if isinstance(e, torch.OutOfMemoryError):
                        message = f"out of memory: {_one_line(e)}"
                    elif isinstance(e, UserError):
                        message = str(e)
                    else:
                        message = _one_line(e)
                    log = out / "logs" / f"{cid.replace('|', '__').replace('/', '_')}.log"
                    log.parent.mkdir(parents=True, exist_ok=True)
                    log.write_text(traceback.format_exc())
                    row.update(status="failed", metrics={}, error=message)
                    console.print(f"[red]failed[/] {cid}: {message} (traceback in {log})")
                finally:
                    gc.collect()
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
                row["seconds"] = round(time.perf_counter() - start, 3)
                row["notes"] = notes
                row["finished_at"] = results.now_iso()
                results.append_result(out, row)
                if row["status"] == "ok":
                    shown = ", ".join(f"{k}={v:.4g}" for k, v in list(row["metrics"].items())[:4])
                    console.print(f"[green]ok[/] {cid}: {shown} ({row['seconds']:.1f} s)")
                bar.update(steps_bar, visible=False)
                bar.advance(cells_bar)
            del lm
            gc.collect()

    _write_report(out, console)
    return EXIT_FAILED_CELLS if failed else EXIT_OK


def _write_report(out: Path, console: Console) -> None:
    try:
        from kvbench.report import write_report
    except ImportError:
        return
    try:
        paths = write_report(out)
        console.print(f"report: {', '.join(str(p) for p in paths)}")
    except Exception as e:  # a report problem must not lose or fail finished results
        console.print(f"[yellow]report not written[/]: {_one_line(e)}")
