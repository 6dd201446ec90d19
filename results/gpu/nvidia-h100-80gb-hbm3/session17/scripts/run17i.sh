#!/usr/bin/env bash
set -u
SHA=${1:?sha}
export KVBENCH_GIT_COMMIT=$SHA PYTHONUNBUFFERED=1 KVBENCH_DATA_DIR=$PWD/.stage-gpudata/data
(python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >/dev/null 2>&1) || true
export PYTHONPATH=$PWD:${PYTHONPATH:-}
D=$OUT
python3 - <<PY 2>&1 | tail -60
import json, traceback
from kvbench.kernels import checks
res, errors = [], {}
for name in ("check_per_token", "check_per_token_mha", "check_token_scores_cuda", "check_kivi", "check_kivi_mha",
             "check_kivi_scores_cuda", "check_values_cuda", "check_rotatekv_scores_cuda", "check_fused_kivi_decode",
             "check_packed_caches", "check_fp_partial", "check_merge"):
    fn = getattr(checks, name)
    try:
        fn("cuda", results=res)
    except Exception as e:
        errors[name] = traceback.format_exc()[-3000:]
json.dump({"results": res, "errors": errors}, open("$D/checks-$SHA.json", "w"), indent=1)
bad = [r["kernel"] for r in res if not r["ok"]]
print(len(res) - len(bad), "/", len(res), "ok; not ok:", bad, "; errors in:", list(errors))
for k, v in errors.items():
    print("=====", k); print(v[-2500:])
PY
