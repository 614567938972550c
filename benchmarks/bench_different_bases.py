"""Merging MLPs trained from different random initialisations: averaging, weight/activation matching,
PLeaS at several widths (docs/alignment.md). Usage: python benchmarks/bench_different_bases.py [OUT]"""

import sys

from mergelab.align.bench import run

if __name__ == "__main__":
    run(sys.argv[1] if len(sys.argv) > 1 else "bench-out/different-bases")
