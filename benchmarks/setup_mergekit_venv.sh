#!/usr/bin/env bash
# Create (or reuse) a separate virtual environment with mergekit 0.1.5, for the benchmark against
# mergekit (benchmarks/bench_vs_mergekit.py) and the parity tests (tests/parity).
#
# mergekit pins transformers 5.x and other packages that must not leak into mergelab's own
# environment, so it lives in a venv of its own.
#
#   bash benchmarks/setup_mergekit_venv.sh            # creates .venv-mergekit in the repo (git-ignored)
#   MERGEKIT_VENV=/path/to/venv bash benchmarks/setup_mergekit_venv.sh
#                                                     # reuses that venv if it already has mergekit 0.1.5
#
# torch is installed first, pinned to torch==2.13.0+cpu: the CPU build that these machines carry on
# disk in pip's find-links folder (the "+cpu" local label means pip can only ever pick a CPU build;
# without such a wheel it fails instead of downloading a multi-gigabyte CUDA one). Once torch is
# there, resolving mergekit's dependencies finds it satisfied and leaves it alone. Elsewhere, point
# PIP_EXTRA_INDEX_URL at a CPU wheel index, or set TORCH_SPEC.
# At the end it prints the two variables the benchmark and the tests read.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${MERGEKIT_VENV:-$repo/.venv-mergekit}"
torch_spec="${TORCH_SPEC:-torch==2.13.0+cpu}"
mergekit_spec="${MERGEKIT_SPEC:-mergekit==0.1.5}"
python="${PYTHON:-python3}"

have_mergekit() {
    [ -x "$venv/bin/python" ] && "$venv/bin/python" - "$mergekit_spec" <<'EOF' 2>/dev/null
import sys
from importlib.metadata import version
want = sys.argv[1].split("==")[-1]
sys.exit(0 if version("mergekit") == want else 1)
EOF
}

if have_mergekit; then
    echo "reusing $venv ($mergekit_spec already installed)"
else
    if [ ! -x "$venv/bin/python" ]; then
        echo "creating $venv"
        "$python" -m venv "$venv"
    fi
    "$venv/bin/python" -m pip install "$torch_spec"
    # torch is already satisfied, so this cannot replace it with another build.
    "$venv/bin/python" -m pip install "$mergekit_spec"
    if ! "$venv/bin/python" -c 'import sys, torch; sys.exit(0 if torch.version.cuda is None else 1)'; then
        echo "warning: $venv has a CUDA build of torch; the benchmark expects the CPU build" >&2
    fi
fi

"$venv/bin/python" -c 'import mergekit, torch; from importlib.metadata import version; print("mergekit", version("mergekit"), "torch", torch.__version__)'
echo
echo "export MERGEKIT_PYTHON=$venv/bin/python"
echo "export MERGEKIT_YAML=$venv/bin/mergekit-yaml"
