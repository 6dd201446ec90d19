#!/usr/bin/env bash
set -u
SHA=${1:?sha}
export KVBENCH_GIT_COMMIT=$SHA PYTHONUNBUFFERED=1
(python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >/dev/null 2>&1) || true
export PYTHONPATH=$PWD:${PYTHONPATH:-}
D=$OUT
t0=$(date +%s)
f() { sed 's/.full_bit_identical.: True, .full_max_abs_diff.: 0.0, .ragged_bit_identical.: True, .ragged_max_abs_diff.: 0.0,/ identical/' | cut -c1-220; }
echo "== MHA token pass: before the shared heads (baseline) vs after (GQ = 1)"
timeout 100 python3 benchmarks/kernel_ab.py token_scores --baseline .ab/token_base17e.py --rounds 7 --out $D/ab-token-gq1-$SHA.json 2>&1 | tail -2 | f
echo "== [$(( $(date +%s) - t0 )) s] gqa A/B (both passes shared vs row per query head)"
timeout 200 python3 .ab/gqa17.py $D/ab-gqa-shared-$SHA.json 2>&1 | tail -4 | cut -c1-300
echo "== [$(( $(date +%s) - t0 )) s] done"
