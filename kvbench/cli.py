"""`kvbench` command line. Exit codes: 0 all ok, 1 some cells failed (or a regression), 2 bad
config or usage. User errors print one line, never a traceback."""

from __future__ import annotations

import argparse
import sys

from rich.console import Console
from rich.table import Table

from kvbench import params as P
from kvbench import registry
from kvbench.errors import UserError
from kvbench.runner import EXIT_USAGE


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own usage errors: one line, exit 2
        self.exit(EXIT_USAGE, f"kvbench: {message} (see kvbench --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kvbench", description="Benchmark KV-cache compression methods.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="run a benchmark config")
    run.add_argument("config", help="benchmark YAML file")
    run.add_argument("--output", help="output directory (overrides the config's)")
    run.add_argument("--force", action="store_true", help="re-run cells already finished")
    run.add_argument("--only", nargs="+", metavar="PATTERN", help="glob patterns over model, method and task names")

    lst = sub.add_parser("list", help="list methods and tasks with their parameters")
    lst.add_argument("what", nargs="?", choices=("methods", "tasks"), help="methods or tasks (default both)")

    rep = sub.add_parser("report", help="write report.md and report.html for a results directory")
    rep.add_argument("dir")

    sub.add_parser("compare", help="regression gate: kvbench compare BASELINE CURRENT", add_help=False)

    cal = sub.add_parser("calibrate", help="run (or load) the calibration of every method in a config")
    cal.add_argument("config")
    return parser


def _list(what: str | None, console: Console) -> int:
    for kind, reg in (("methods", registry.methods), ("tasks", registry.tasks)):
        if what not in (None, kind):
            continue
        for name in reg.names():
            cls = reg.get(name)
            table = Table(title=f"{reg.kind} [bold]{name}[/]: {cls.description}", title_justify="left")
            for col in ("parameter", "type", "default", "allowed", "help"):
                table.add_column(col)
            for p in P.describe(cls):
                allowed = ", ".join(map(str, p.choices)) if p.choices else ""
                table.add_row(p.name, p.type_name, repr(p.default), allowed, p.help)
            console.print(table)
    return 0


def _calibrate(config_path: str, console: Console) -> int:
    from kvbench.calibration import calibrate
    from kvbench.config import load_config
    from kvbench.model import load_model

    cfg = load_config(config_path)
    for model in cfg.models:
        lm = None
        for spec in cfg.methods:
            if spec.method.needs_calibration:
                lm = lm or load_model(model.name, model.path, cfg.device, cfg.dtype)
                info = calibrate(lm, spec.method)
                state = "loaded from cache" if info["cached"] else "computed"
                console.print(f"{model.name} {spec.label}: calibration {state} ({info['cache']})")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "compare":
        from kvbench.compare import main as compare_main

        return compare_main(argv[1:])
    args = _parser().parse_args(argv)
    console = Console(stderr=True)
    try:
        if args.command == "run":
            from kvbench.config import load_config
            from kvbench.runner import run_benchmark

            cfg = load_config(args.config, output_override=args.output)
            return run_benchmark(cfg, force=args.force, only=args.only, console=console)
        if args.command == "list":
            return _list(args.what, Console())
        if args.command == "report":
            from kvbench.report import main as report_main

            return report_main([args.dir])
        if args.command == "calibrate":
            return _calibrate(args.config, console)
    except UserError as e:
        print(f"kvbench: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("kvbench: interrupted; finished cells are kept in results.jsonl", file=sys.stderr)
        return 130
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
