#!/usr/bin/env bash
# Create .venv with the CPU build of torch 2.13.0 (on disk on these machines; never a multi-GB CUDA
# build) and install mergelab with its test, evaluation and llmmix-corpus and search extras. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/pip install -q torch==2.13.0
fi
.venv/bin/pip install -q -e ".[dev,eval,llm,search]"
