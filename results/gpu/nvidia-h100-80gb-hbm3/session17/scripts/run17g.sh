#!/usr/bin/env bash
# Session 17: one consistent run of the headline rows at one commit on one machine.
set -u
SHA=${1:?sha}
export KVBENCH_GIT_COMMIT=$SHA PYTHONUNBUFFERED=1 KVBENCH_DATA_DIR=$PWD/.stage-gpudata/data
(python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >/dev/null 2>&1) || true
export PYTHONPATH=$PWD:${PYTHONPATH:-}
D=$OUT
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv > $D/device-$SHA.txt
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" >> $D/device-$SHA.txt
t0=$(date +%s)
echo "== decode + max batch"
timeout 330 python3 -m kvbench.cli run benchmarks/gpu.yaml --output /tmp/r1 --only decode max-batch fp16 quarot-2 kivi-2 rotatekv-2 rotatekv-2-postrope 2>&1 | grep -E "decode_ms_p50|tokens_per_s|max_batch|Error|error" | tail -20
cp /tmp/r1/results.jsonl $D/results_decode_maxbatch_$SHA.jsonl; cp /tmp/r1/report.md $D/report_decode_maxbatch_$SHA.md 2>/dev/null
echo "== [$(( $(date +%s) - t0 )) s] kernels alone"
timeout $(( 585 - ($(date +%s) - t0) )) python3 benchmarks/kernels_gpu.py --skip-checks --out $D/kernels-$SHA.json 2>&1 | tail -25
echo "== [$(( $(date +%s) - t0 )) s] done"
