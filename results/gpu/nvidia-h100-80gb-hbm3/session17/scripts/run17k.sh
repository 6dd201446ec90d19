#!/usr/bin/env bash
set -u
SHA=${1:?sha}
export KVBENCH_GIT_COMMIT=$SHA PYTHONUNBUFFERED=1 KVBENCH_DATA_DIR=$PWD/.stage-gpudata/data
(python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >/dev/null 2>&1) || true
export PYTHONPATH=$PWD:${PYTHONPATH:-}
D=$OUT
t0=$(date +%s)
python3 - <<PY 2>&1 | tail -12
import json, traceback
from kvbench.kernels import checks
res, errors = [], {}
for name, kw in (("check_gqa_cuda", {}), ("check_per_token", {"small": False}), ("check_kivi", {"small": False}),
                 ("check_token_scores_cuda", {}), ("check_values_cuda", {}), ("check_kivi_scores_cuda", {}),
                 ("check_kivi_mha", {"small": False}), ("check_per_token_mha", {"small": False})):
    try:
        getattr(checks, name)("cuda", results=res, **kw)
    except Exception:
        errors[name] = traceback.format_exc()[-2000:]
json.dump({"results": res, "errors": errors}, open("$D/checks-$SHA.json", "w"), indent=1)
print(sum(r["ok"] for r in res), "/", len(res), "ok; not ok:", [r["kernel"] for r in res if not r["ok"]], "; errors:", list(errors))
print([r["kernel"] for r in res if "grouped" in r["kernel"]])
for v in errors.values(): print(v[-1500:])
PY
echo "== [$(( $(date +%s) - t0 )) s] llama-3-8b decode + peak memory"
timeout 300 python3 -m kvbench.cli run benchmarks/gpu_llama3.yaml --output /tmp/l3 2>&1 | grep -E "^ok|^fail|rror|decode_ms" | cut -c1-200 | tail -16
cp /tmp/l3/results.jsonl $D/results_llama3_$SHA.jsonl; cp /tmp/l3/report.md $D/report_llama3_$SHA.md 2>/dev/null
echo "== [$(( $(date +%s) - t0 )) s] kernels (llama-2 shape)"
timeout 200 python3 benchmarks/kernels_gpu.py --skip-checks --only kivi quarot --out $D/kernels-$SHA.json > $D/kernels-$SHA.log 2>&1
python3 - <<PY
import json
d=json.load(open("$D/kernels-$SHA.json"))["decode_attention"]
for k,v in d.items():
    if isinstance(v,dict) and "kernel_only_amortized_ms" in v:
        print(k[:40], round(v["kernel_only_amortized_ms"],4), round(v["kernel_only_amortized_speedup_vs_fp16_sdpa"],3), round(v["kernel_only_amortized_fraction_of_copy_bw"],3))
PY
echo "== [$(( $(date +%s) - t0 )) s] done"
