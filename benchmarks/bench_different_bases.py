"""Merging nets trained from different random initialisations: averaging, weight/activation matching,
PLeaS at several widths (docs/alignment.md). MLPs, a plain conv net and a ResNet on digits (and mnist1d
when installed); with --minilm CACHE also two MiniLM encoders fine-tuned from different starting points
(CACHE: a textmix bench cache, e.g. ~/.cache/mergelab/bench/textmix-<fingerprint>).

Usage: python benchmarks/bench_different_bases.py [OUT] [--minilm CACHE]"""

import argparse

from mergelab.align.bench import run

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("out", nargs="?", default="bench-out/different-bases")
    ap.add_argument("--minilm", default=None, help="textmix bench cache: also run the MiniLM rows")
    args = ap.parse_args()
    run(args.out)
    if args.minilm:
        from mergelab.align.bench_minilm import run_minilm

        run_minilm(args.out, args.minilm)
