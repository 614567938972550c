#!/usr/bin/env bash
# End-to-end parity with mergekit 0.1.5: the same recipe files through `mergekit-yaml` and
# `mergelab merge`, every output tensor compared (tests/parity/test_parity_cli.py), plus the
# method-level parity tests in tests/parity/.
#
#   bash benchmarks/parity_vs_mergekit.sh                 # mergekit venv from MERGEKIT_PYTHON or .venv-mergekit
#   MERGEKIT_PYTHON=/path/to/venv/bin/python bash benchmarks/parity_vs_mergekit.sh -k ties
#
# Extra arguments go to pytest. Without a mergekit venv the tests are skipped, not failed: create
# one with benchmarks/setup_mergekit_venv.sh.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -z "${MERGEKIT_PYTHON:-}" ] && [ -z "${MERGEKIT_YAML:-}" ]; then
    if [ -x "$repo/.venv-mergekit/bin/python" ]; then
        export MERGEKIT_PYTHON="$repo/.venv-mergekit/bin/python"
    else
        echo "no mergekit venv: run benchmarks/setup_mergekit_venv.sh or set MERGEKIT_PYTHON" >&2
        exit 2
    fi
fi
python="${PYTHON:-$repo/.venv/bin/python}"
cd "$repo"
exec "$python" -m pytest -m mergekit tests/parity -q -rs "$@"
