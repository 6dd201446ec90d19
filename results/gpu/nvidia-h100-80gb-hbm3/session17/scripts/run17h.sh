#!/usr/bin/env bash
set -u
SHA=${1:?sha}
export KVBENCH_GIT_COMMIT=$SHA PYTHONUNBUFFERED=1 KVBENCH_DATA_DIR=$PWD/.stage-gpudata/data
(python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >/dev/null 2>&1) || true
export PYTHONPATH=$PWD:${PYTHONPATH:-}
D=$OUT
t0=$(date +%s)
echo "== checks"
python3 - <<PY 2>&1 | tail -3
import json
from kvbench.kernels import checks
res = []
for name in ("check_per_token", "check_per_token_mha", "check_token_scores_cuda", "check_kivi", "check_kivi_mha",
             "check_kivi_scores_cuda", "check_values_cuda", "check_rotatekv_scores_cuda", "check_fused_kivi_decode"):
    fn = getattr(checks, name)
    try:
        fn("cuda", results=res)
    except TypeError:
        fn("cuda", res)
json.dump(res, open("$D/checks-$SHA.json", "w"), indent=1)
bad = [r for r in res if not r["ok"]]
print(len(res) - len(bad), "/", len(res), "ok", bad)
PY
echo "== [$(( $(date +%s) - t0 )) s] pytest -m cuda"
timeout 420 python3 -m pytest -q -m cuda -p no:cacheprovider 2>&1 | tail -4 | tee $D/pytest-cuda-$SHA.txt
echo "== [$(( $(date +%s) - t0 )) s] done"
