#!/usr/bin/env bash
set -u
SHA=${1:?sha}
export KVBENCH_GIT_COMMIT=$SHA PYTHONUNBUFFERED=1
(python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >/dev/null 2>&1) || true
export PYTHONPATH=$PWD:${PYTHONPATH:-}
D=$OUT
t0=$(date +%s)
for d in 250 500 1000; do
echo "== [$(( $(date +%s) - t0 )) s] kivi stagger $d"
timeout 100 python3 benchmarks/kernel_ab.py kivi_scores --baseline .ab/kivi_stagger$d.py --baseline-splits 3 --variants 3 --out $D/ab-kivi-stagger$d.json 2>&1 | cut -c1-250 | tail -3 | sed 's/.full_bit_identical.*ms_median/ ms_median/'
done
for d in 500 1000; do
echo "== [$(( $(date +%s) - t0 )) s] values stagger $d"
timeout 150 python3 benchmarks/kernel_ab.py values --baseline .ab/values_stagger$d.py --out $D/ab-values-stagger$d.json 2>&1 | cut -c1-250 | tail -9 | sed 's/.full_bit_identical.*ms_median/ ms_median/'
done
echo "== [$(( $(date +%s) - t0 )) s] done"
