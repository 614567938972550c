"""Merging nets trained from different random initialisations: averaging, weight/activation matching,
PLeaS at several widths (docs/alignment.md). MLPs, a plain conv net and a ResNet on digits (and mnist1d
when installed); with --minilm CACHE also two MiniLM encoders fine-tuned from different starting points
(CACHE: a textmix bench cache, e.g. ~/.cache/mergelab/bench/textmix-<fingerprint>); with --llama also
two 1m Llamas pretrained from seeds 0 and 1 on the llmmix 1m base's tokens (--llama-only: only those).

Usage: python benchmarks/bench_different_bases.py [OUT] [--minilm CACHE] [--llama | --llama-only] [--llama-steps N]
       python benchmarks/bench_different_bases.py OUT --budget 1.5   # per-layer widths under a FLOPs budget"""

import argparse

from mergelab.align.bench import run

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("out", nargs="?", default="bench-out/different-bases")
    ap.add_argument("--minilm", default=None, help="textmix bench cache: also run the MiniLM rows")
    ap.add_argument("--llama", action="store_true", help="also the two Llamas pretrained from different seeds")
    ap.add_argument("--llama-only", action="store_true", help="only the Llama rows")
    ap.add_argument("--budget", type=float, default=None,
                    help="only PLeaS's per-layer widths under the FLOPs budget of this uniform width vs that width")
    ap.add_argument("--llama-attention", action="store_true",
                    help="with --llama-only: PLeaS widths 1 and 1.5 with and without the attention refitted")
    ap.add_argument("--llama-steps", type=int, default=400, help="training steps per Llama (default 400)")
    args = ap.parse_args()
    if args.budget is not None:
        from mergelab.align.bench import run_budget

        run_budget(args.out, args.budget)
    elif not args.llama_only:
        run(args.out)
    if args.llama or args.llama_only:
        from mergelab.align.bench_llama import run_llama

        if args.llama_attention:
            run_llama(args.out, steps=args.llama_steps, widths=(1.0, 1.5), free_widths=(),
                      attention=((1.0, 1.0), (1.0, 2.0), (1.5, 2.0), (2.0, 2.0)))
        else:
            run_llama(args.out, steps=args.llama_steps)
    if args.minilm:
        from mergelab.align.bench_minilm import run_minilm

        run_minilm(args.out, args.minilm)
