#!/usr/bin/env bash
# Micro-benchmarks of kvbench's primitives (pytest-benchmark). Run from anywhere:
#   benchmarks/micro/run.sh            run and print the tables
#   benchmarks/micro/run.sh compare    run and fail if any median is >25% slower than the baseline
#   benchmarks/micro/run.sh save       refresh the committed baseline (on the machine that gates)
# Extra arguments go to pytest, e.g. `run.sh compare -k pack`.
# KVBENCH_BENCH_THREADS (default 1) sets torch's CPU threads; BASELINE overrides the baseline file;
# PYTHON picks the interpreter (default python3); FAIL the compare threshold (default median:25%;
# GPU sets are launch-bound and jittery on VMs: gate them on min, FAIL=min:25%).
set -euo pipefail
cd "$(dirname "$0")/../.."
baseline="${BASELINE:-benchmarks/micro/baseline/cpu.json}"
mode="${1:-run}"
py="${PYTHON:-python3}"
[ $# -gt 0 ] && shift
case "$mode" in
  run)     exec "$py" -m pytest benchmarks/micro "$@" ;;
  save)    exec "$py" -m pytest benchmarks/micro --benchmark-json="$baseline" "$@" ;;
  compare) exec "$py" -m pytest benchmarks/micro --benchmark-compare="$baseline" \
                --benchmark-compare-fail="${FAIL:-median:25%}" "$@" ;;
  *) echo "usage: $0 [run|save|compare] [pytest args...]" >&2; exit 2 ;;
esac
