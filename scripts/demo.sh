#!/usr/bin/env bash
# Set up (scripts/setup.sh), then run `mergelab demo`: fine-tune two small experts from the base shipped in
# the package (cached in ~/.cache/mergelab/demo), merge them with task arithmetic, TIES and TSV-M, and print
# every model's accuracy on every task. Arguments go to `mergelab demo` (--tasks, --steps, --threads, --synthetic).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec .venv/bin/mergelab demo "$@"
