#!/usr/bin/env bash
set -u
SHA=${1:?sha}
export KVBENCH_GIT_COMMIT=$SHA PYTHONUNBUFFERED=1
(python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >/dev/null 2>&1) || true
export PYTHONPATH=$PWD:${PYTHONPATH:-}
D=$OUT
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv > $D/device-$SHA.txt
t0=$(date +%s)
echo "== prefetch A/B"
timeout 240 python3 benchmarks/kernel_ab.py prefetch --variants 0 1 2 --rounds 5 --out $D/ab-prefetch-$SHA.json 2>&1 | grep -v "^\s*$" | cut -c1-260 | tail -30
echo "== [$(( $(date +%s) - t0 )) s] kernels (whole reads, prefetch 1)"
timeout 300 python3 benchmarks/kernels_gpu.py --skip-checks --only kivi quarot --out $D/kernels-$SHA.json 2>&1 | tail -12 | cut -c1-240
echo "== [$(( $(date +%s) - t0 )) s] done"
