#!/usr/bin/env bash
set -u
SHA=${1:?sha}
export KVBENCH_GIT_COMMIT=$SHA PYTHONUNBUFFERED=1
(python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >/dev/null 2>&1) || true
export PYTHONPATH=$PWD:${PYTHONPATH:-}
D=$OUT
t0=$(date +%s)
echo "== read ceiling"
timeout 200 python3 benchmarks/read_ceiling.py --out $D/read-ceiling-$SHA.json 2>&1 | tail -5 | cut -c1-300
echo "== [$(( $(date +%s) - t0 )) s] kivi hint (codes)"
timeout 100 python3 benchmarks/kernel_ab.py kivi_scores --baseline .ab/kivi_hint.py --baseline-splits 3 --variants 3 --out $D/ab-kivi-hint.json 2>&1 | cut -c1-250 | tail -4
echo "== [$(( $(date +%s) - t0 )) s] kivi hint (codes, scales, zeros)"
timeout 100 python3 benchmarks/kernel_ab.py kivi_scores --baseline .ab/kivi_hint2.py --baseline-splits 3 --variants 3 --out $D/ab-kivi-hint2.json 2>&1 | cut -c1-250 | tail -4
echo "== [$(( $(date +%s) - t0 )) s] values hint"
timeout 150 python3 benchmarks/kernel_ab.py values --baseline .ab/values_hint.py --out $D/ab-values-hint.json 2>&1 | cut -c1-250 | tail -9
echo "== [$(( $(date +%s) - t0 )) s] done"
