#!/usr/bin/env bash
set -u
SHA=${1:?sha}
export KVBENCH_GIT_COMMIT=$SHA PYTHONUNBUFFERED=1
(python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >/dev/null 2>&1) || true
export PYTHONPATH=$PWD:${PYTHONPATH:-}
D=$OUT
t0=$(date +%s)
f() { sed 's/.full_bit_identical.: True, .full_max_abs_diff.: 0.0, .ragged_bit_identical.: True, .ragged_max_abs_diff.: 0.0,/ identical/' | cut -c1-250; }
echo "== kivi: base vs interleave"
timeout 100 python3 benchmarks/kernel_ab.py kivi_scores --baseline .ab/kivi_base17.py --baseline-splits 3 --variants 3 --rounds 7 --out $D/ab-kivi-interleave-$SHA.json 2>&1 | tail -3 | f
echo "== [$(( $(date +%s) - t0 )) s] kivi: bias-mma vs interleave"
timeout 100 python3 benchmarks/kernel_ab.py kivi_scores --baseline .ab/kivi_biasmma.py --baseline-splits 3 --variants 3 --rounds 7 --out $D/ab-kivi-biasmma-$SHA.json 2>&1 | tail -3 | f
echo "== [$(( $(date +%s) - t0 )) s] token: base vs interleave"
timeout 100 python3 benchmarks/kernel_ab.py token_scores --baseline .ab/token_base17.py --rounds 7 --out $D/ab-token-interleave-$SHA.json 2>&1 | tail -2 | f
echo "== [$(( $(date +%s) - t0 )) s] kernels"
timeout 300 python3 benchmarks/kernels_gpu.py --skip-checks --only kivi quarot --out $D/kernels-$SHA.json > $D/kernels-$SHA.log 2>&1
python3 - <<PY
import json
d=json.load(open("$D/kernels-$SHA.json"))["decode_attention"]
for k,v in d.items():
    if isinstance(v,dict) and "kernel_only_amortized_ms" in v:
        print(k, round(v["kernel_only_amortized_ms"],4), round(v["kernel_only_amortized_speedup_vs_fp16_sdpa"],3), round(v["kernel_only_amortized_fraction_of_copy_bw"],3))
print("sdpa", d["fp16-sdpa"]["amortized_median_ms"])
PY
echo "== [$(( $(date +%s) - t0 )) s] done"
