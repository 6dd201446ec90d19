#!/usr/bin/env bash
# The whole GPU suite in one go on a CUDA machine (docs/gpu.md). Usage:
#   scripts/gpu_suite.sh [all|a|b|c|d]   results and logs under $OUT (default /tmp/kvbench-gpu)
# a: set-up, peak memory, decode latency, peer rows, max batch + throughput (fp16, rotatekv-2)
# b: SmolLM2 packed-vs-simulated perplexity (needs the GGUF, see below), max batch + throughput
#    (quarot-2, kivi-2), peak memory and decode step on a grouped-query model (about 80 s)
# c: kernel correctness checks and timings (benchmarks/kernels_gpu.py; the checks alone take
#    about 280 s on an H100), then the CUDA passes' launch sweep (benchmarks/two_pass_cuda_sweep.py,
#    about 90 s, when the part's time allows)
# d: where a decode step's GPU time goes (benchmarks/decode_profile.py, about 110 s), the peer row
#    of transformers' QuantizedCache when .whl/peer-quanto/ holds the optimum-quanto and ninja
#    wheels (about 130 s, most of it building quanto's CUDA extension), then pytest -m cuda (30 s;
#    240 s on a fresh machine, where Triton compiles every kernel first)
# all: a, b, c, d. Every step has its own time limit so the script ends inside 10 minutes a part.
# Optional inputs, when present in the repo root (ignored by git, carried by the device tool):
#   .whl/*.whl          wheels to install first (gguf, for the SmolLM2 GGUF)
#   .stage-gpudata/data WikiText-2 and pg-essays (else $KVBENCH_DATA_DIR or ../shared/data)
#   .stage-gpu1/ .stage-gpu2/  the two halves of SmolLM2-135M-Instruct.Q4_1.gguf (split -b 49M),
#                       joined in /tmp/m (part a copies the first half there, part b the second)
set -u
PART=${1:-all}
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/kvbench-gpu}
mkdir -p "$OUT"
LOG="$OUT/suite_$PART.log"
exec > >(tee -a "$LOG") 2>&1
export PYTHONUNBUFFERED=1
[ -d .stage-gpudata/data ] && export KVBENCH_DATA_DIR="$PWD/.stage-gpudata/data"
RUN=/tmp/kvrun
GGUF=/tmp/m/SmolLM2-135M-Instruct.Q4_1.gguf
SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
t0=$(date +%s)
step() { echo; echo "=== [$(( $(date +%s) - t0 )) s] $*"; }

setup() {
  step "set-up"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/device.txt"
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/device.txt"
  # the device's copy of the tree may carry a stale .git: the caller's KVBENCH_GIT_COMMIT wins
  if [ -n "${KVBENCH_GIT_COMMIT:-}" ]; then echo "commit $KVBENCH_GIT_COMMIT" | tee -a "$OUT/device.txt"
  else git log -1 --format='commit %H %s' 2>/dev/null | tee -a "$OUT/device.txt"; fi
  if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
  fi
  python3 -c "import kvbench.tasks.max_batch" 2>/dev/null \
    || python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . \
    || export PYTHONPATH=$PWD:${PYTHONPATH:-}
  python3 -c "import kvbench.tasks.max_batch; print('kvbench importable')"
  mkdir -p /tmp/m
}

BUDGET=${BUDGET:-570}  # seconds per part; each step gets min(its cap, what is left - 15 s)
left() { local l=$(( BUDGET - ($(date +%s) - t0) - 15 )); local c=$1; [ $l -lt $c ] && c=$l; [ $c -lt 5 ] && c=5; echo $c; }

part_a() {
  [ -d .stage-gpu1 ] && cp .stage-gpu1/* /tmp/m/ && echo "staged GGUF part 1"
  step "peak memory, decode latency, peer rows (benchmarks/gpu.yaml)"
  timeout $(left 330) python3 -m kvbench.cli run benchmarks/gpu.yaml --output $RUN --only peak-memory decode 'peer-*'
  step "max batch + throughput at max batch: fp16, rotatekv-2"
  timeout $(left 170) python3 -m kvbench.cli run benchmarks/gpu.yaml --output $RUN --only max-batch fp16 rotatekv-2
  cp $RUN/results.jsonl "$OUT/results_a.jsonl" 2>/dev/null
}

part_c() {
  [ -n "${SKIP_CHECKS:-}" ] && return
  step "correctness + kernel timings: benchmarks/kernels_gpu.py"
  timeout $(left 540) python3 benchmarks/kernels_gpu.py --out "$OUT/kernels.json" 2>&1 | tail -60
  step "the hand-laid CUDA passes alone: benchmarks/two_pass_cuda_sweep.py"
  timeout $(left 120) python3 benchmarks/two_pass_cuda_sweep.py --out "$OUT/two_pass_sweep.json" 2>&1 | tail -5
}

part_b() {
  if [ -d .stage-gpu2 ] && [ -f /tmp/m/gguf.part.aa ]; then
    cat /tmp/m/gguf.part.aa .stage-gpu2/gguf.part.ab > $GGUF && rm /tmp/m/gguf.part.aa
  fi
  if [ -f $GGUF ] && echo "$SHA  $GGUF" | sha256sum -c; then
    step "SmolLM2 perplexity, packed vs simulated (prefill windows)"
    timeout $(left 130) python3 -m kvbench.cli run benchmarks/gpu_smollm2.yaml --output /tmp/kvsmol
    cp /tmp/kvsmol/results.jsonl "$OUT/results_smollm2.jsonl" 2>/dev/null
    step "SmolLM2 decode-step perplexity, packed (fused kernels) vs simulated"
    timeout $(left 150) python3 scripts/gpu_decode_ppl.py $GGUF --tokens 256 --windows 1 --out "$OUT/decode_ppl.json"
    step "accuracy of the fast RotateKV variants (benchmarks/rotatekv_fast_variants.yaml)"
    timeout $(left 150) python3 -m kvbench.cli run benchmarks/rotatekv_fast_variants.yaml --output /tmp/kvfast
    cp /tmp/kvfast/results.jsonl "$OUT/results_fast_variants.jsonl" 2>/dev/null
  else
    echo "SmolLM2 GGUF not staged: perplexity checks skipped"
  fi
  step "max batch + throughput at max batch: quarot-2, kivi-2"
  timeout $(left 150) python3 -m kvbench.cli run benchmarks/gpu.yaml --output $RUN --only max-batch quarot-2 kivi-2
  cp $RUN/results.jsonl "$OUT/results_b.jsonl" 2>/dev/null
  step "a grouped-query model: peak memory and decode step on a Llama-3-8B shape (benchmarks/gpu_llama3.yaml)"
  timeout $(left 120) python3 -m kvbench.cli run benchmarks/gpu_llama3.yaml --output /tmp/kvrun-llama3
  cp /tmp/kvrun-llama3/results.jsonl "$OUT/results_llama3.jsonl" 2>/dev/null
}

part_d() {
  step "decode-step profile: benchmarks/decode_profile.py"
  timeout $(left 150) python3 benchmarks/decode_profile.py --out "$OUT/decode_profile.json" 2>&1 | grep -v -i warn
  if ls .whl/peer-quanto/*.whl >/dev/null 2>&1; then
    # transformers' QuantizedCache needs a backend: optimum-quanto, whose CUDA extension nvcc builds
    # on first use (about 2 minutes on the H100 machine). Only this step sees the package.
    step "peer row: transformers QuantizedCache (optimum-quanto)"
    python3 -m pip install -q --no-index --no-deps --target /tmp/site-quanto .whl/peer-quanto/*.whl
    PYTHONPATH=/tmp/site-quanto:${PYTHONPATH:-} PATH=/tmp/site-quanto/bin:$PATH MAX_JOBS=16 \
      timeout $(left 280) python3 -m kvbench.cli run benchmarks/gpu.yaml --output $RUN --only peer-hf-quantized fp16
    cp $RUN/results.jsonl "$OUT/results_d.jsonl" 2>/dev/null
  fi
  [ -n "${SKIP_CHECKS:-}" ] && return
  step "pytest -m cuda"
  timeout $(left 400) python3 -m pytest -q -m cuda tests -p no:cacheprovider --durations=5 2>&1 | tail -15
}

setup
case "$PART" in
  a) part_a ;;
  b) part_b ;;
  c) part_c ;;
  d) part_d ;;
  all) BUDGET=100000; part_a; part_b; part_c; part_d ;;
esac
tar czf "$OUT/logs_$PART.tgz" -C /tmp kvrun 2>/dev/null
step "done"
