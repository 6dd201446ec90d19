#!/usr/bin/env bash
set -u
SHA=${1:?sha}
export KVBENCH_GIT_COMMIT=$SHA PYTHONUNBUFFERED=1 KVBENCH_DATA_DIR=$PWD/.stage-gpudata/data
(python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >/dev/null 2>&1) || true
export PYTHONPATH=$PWD:${PYTHONPATH:-}
D=$OUT
t0=$(date +%s)
f() { sed 's/.full_bit_identical.: True, .full_max_abs_diff.: 0.0, .ragged_bit_identical.: True, .ragged_max_abs_diff.: 0.0,/ identical/' | cut -c1-220; }
python3 - <<PY 2>&1 | tail -6
import json, traceback
from kvbench.kernels import checks
res, errors = [], {}
for name, kw in (("check_gqa_cuda", {}), ("check_values_cuda", {}), ("check_token_scores_cuda", {}),
                 ("check_per_token_mha", {"small": False}), ("check_kivi_mha", {"small": False})):
    try:
        getattr(checks, name)("cuda", results=res, **kw)
    except Exception:
        errors[name] = traceback.format_exc()[-2000:]
json.dump({"results": res, "errors": errors}, open("$D/checks-$SHA.json", "w"), indent=1)
print(sum(r["ok"] for r in res), "/", len(res), "ok; not ok:", [(r["kernel"], r.get("max_abs_err"), r.get("bound")) for r in res if not r["ok"]], "; errors:", list(errors))
for v in errors.values(): print(v[-1200:])
PY
echo "== [$(( $(date +%s) - t0 )) s] MHA values: before (baseline) vs after (GQS = 1)"
timeout 150 python3 benchmarks/kernel_ab.py values --baseline .ab/values_base17d.py --rounds 5 --out $D/ab-values-gqs1-$SHA.json 2>&1 | tail -9 | f
echo "== [$(( $(date +%s) - t0 )) s] gqa A/B (both passes shared vs row per query head)"
timeout 200 python3 .ab/gqa17.py $D/ab-gqa-shared-$SHA.json 2>&1 | tail -4 | cut -c1-300
echo "== [$(( $(date +%s) - t0 )) s] llama-3-8b decode"
timeout 200 python3 -m kvbench.cli run benchmarks/gpu_llama3.yaml --output /tmp/l3 --only decode fp16 quarot-2 kivi-2 2>&1 | grep -E "^ok|^fail|rror|decode_ms" | cut -c1-200 | tail -8
cp /tmp/l3/results.jsonl $D/results_llama3_decode_$SHA.jsonl
echo "== [$(( $(date +%s) - t0 )) s] done"
