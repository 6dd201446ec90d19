#!/usr/bin/env bash
set -u
SHA=${1:?sha}
export KVBENCH_GIT_COMMIT=$SHA PYTHONUNBUFFERED=1
(python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >/dev/null 2>&1) || true
export PYTHONPATH=$PWD:${PYTHONPATH:-}
D=$OUT
python3 - <<PY 2>&1 | tail -8
import json, traceback, torch, triton
from kvbench.kernels import checks
res, errors = [], {}
for small in (True, False):
    try:
        checks.check_kivi("cuda", small=small, results=res)
    except Exception:
        errors[f"check_kivi small={small}"] = traceback.format_exc()[-1500:]
json.dump({"triton": triton.__version__, "results": res, "errors": errors}, open("$D/checks-kivi-tc-$SHA.json", "w"), indent=1)
print(triton.__version__, sum(r["ok"] for r in res), "/", len(res), "ok", [r["kernel"] for r in res if not r["ok"]], list(errors))
PY
