#!/usr/bin/env bash
set -u
SHA=${1:?sha}
export KVBENCH_GIT_COMMIT=$SHA PYTHONUNBUFFERED=1
(python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >/dev/null 2>&1) || true
export PYTHONPATH=$PWD:${PYTHONPATH:-}
D=$OUT
t0=$(date +%s)
f() { sed 's/.full_bit_identical.: True, .full_max_abs_diff.: 0.0, .ragged_bit_identical.: True, .ragged_max_abs_diff.: 0.0,/ identical/' | cut -c1-250; }
echo "== checks"
python3 - <<PY 2>&1 | tail -4
import json
from kvbench.kernels import checks
res = checks.check_kivi_scores_cuda("cuda") + checks.check_values_cuda("cuda") + checks.check_kivi_mha("cuda", small=False) + checks.check_per_token_mha("cuda", small=False)
json.dump(res, open("$D/checks-$SHA.json", "w"), indent=1)
bad = [r for r in res if not r["ok"]]
print(len(res) - len(bad), "/", len(res), "ok", bad)
PY
echo "== [$(( $(date +%s) - t0 )) s] kivi: base vs staged stores"
timeout 100 python3 benchmarks/kernel_ab.py kivi_scores --baseline .ab/kivi_base17b.py --baseline-splits 3 --variants 3 --rounds 7 --out $D/ab-kivi-staged-$SHA.json 2>&1 | tail -3 | f
echo "== [$(( $(date +%s) - t0 )) s] values: base vs vector scale loads"
timeout 150 python3 benchmarks/kernel_ab.py values --baseline .ab/values_base17b.py --rounds 7 --out $D/ab-values-vec-$SHA.json 2>&1 | tail -9 | f
echo "== [$(( $(date +%s) - t0 )) s] kernels"
timeout 300 python3 benchmarks/kernels_gpu.py --skip-checks --only kivi quarot rotatekv --out $D/kernels-$SHA.json > $D/kernels-$SHA.log 2>&1
python3 - <<PY
import json
d=json.load(open("$D/kernels-$SHA.json"))["decode_attention"]
for k,v in d.items():
    if isinstance(v,dict) and "kernel_only_amortized_ms" in v:
        print(k[:60], round(v["kernel_only_amortized_ms"],4), round(v["kernel_only_amortized_speedup_vs_fp16_sdpa"],3), round(v["kernel_only_amortized_fraction_of_copy_bw"],3), "| whole", round(v["amortized_median_ms"],4))
print("sdpa", d["fp16-sdpa"]["amortized_median_ms"])
PY
echo "== [$(( $(date +%s) - t0 )) s] done"
