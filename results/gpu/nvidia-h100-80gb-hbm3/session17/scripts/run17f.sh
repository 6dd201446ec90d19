#!/usr/bin/env bash
set -u
SHA=${1:?sha}
export KVBENCH_GIT_COMMIT=$SHA PYTHONUNBUFFERED=1
(python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >/dev/null 2>&1) || true
export PYTHONPATH=$PWD:${PYTHONPATH:-}
D=$OUT
t0=$(date +%s)
f() { sed 's/.full_bit_identical.: True, .full_max_abs_diff.: 0.0, .ragged_bit_identical.: True, .ragged_max_abs_diff.: 0.0,/ identical/' | cut -c1-200; }
for v in u2_mb5 u2_mb6 u4_mb5 u8_mb4; do
echo "== [$(( $(date +%s) - t0 )) s] values $v (baseline) vs shipped U4 mb4"
timeout 150 python3 benchmarks/kernel_ab.py values --baseline .ab/values_$v.py --rounds 5 --out $D/ab-values-$v-$SHA.json 2>&1 | tail -9 | f
done
echo "== [$(( $(date +%s) - t0 )) s] done"
