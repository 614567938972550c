#!/usr/bin/env python
"""The Ray executor against the local one: wall time of one merge with 1 and 2 Ray workers.

Writes a synthetic float32 Llama family (:func:`mergelab.synthetic.make_llama_family`) to ``--workdir``,
starts a local Ray with as many CPUs as the largest worker count (its start-up is not timed), then
merges it ``--runs`` times with the local streaming executor and with ``mergelab merge --executor
ray --workers N`` for each N, checks that every output's shards and index are byte-identical to the
local one, and prints (and writes ``bench_ray.json``) the median wall seconds, the output rate and
each worker's own seconds. Usage::

    python benchmarks/bench_ray.py --workdir /tmp/bench-ray --workers 1,2 --method dare_ties
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path


def same_bytes(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir() if p.name.endswith((".safetensors", ".index.json")))
    return names == sorted(p.name for p in b.iterdir() if p.name.endswith((".safetensors", ".index.json"))) and \
        all((a / n).read_bytes() == (b / n).read_bytes() for n in names)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("bench-out/ray"))
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--method", default="dare_ties")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--intermediate", type=int, default=1536)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--experts", type=int, default=3)
    ap.add_argument("--shard-size", default="20MB")
    ap.add_argument("--runs", type=int, default=2)
    args = ap.parse_args()
    import ray

    from mergelab.execute.ray import RayExecutor
    from mergelab.merge import merge
    from mergelab.synthetic import make_llama_family

    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    fam = work / "family"
    if not (fam / "base" / "config.json").is_file():
        make_llama_family(fam, experts=args.experts, hidden=args.hidden, layers=args.layers,
                          intermediate=args.intermediate, vocab=args.vocab, heads=8, kv_heads=4)
    paths = [fam / "base"] + [fam / f"expert_{i}" for i in range(args.experts)]
    recipe = {"merge_method": args.method, "base_model": str(paths[0]), "seed": 1,
              "models": [{"model": str(p), "parameters": {"weight": 1.0 / args.experts,
                                                         **({"density": 0.5} if "ties" in args.method else {})}}
                         for p in paths[1:]]}
    counts = [int(w) for w in args.workers.split(",")]
    for attempt in range(8):  # on a loaded machine Ray's raylet may give up waiting for its agent (15 s)
        try:
            ray.init(num_cpus=max(counts), include_dashboard=False, logging_level="ERROR", log_to_driver=False)
            break
        except Exception:
            if attempt == 7:
                raise
            ray.shutdown()
            time.sleep(20)
    results = {}
    reference = None
    for label, make in [("local", lambda: None)] + [(f"ray-{n}", (lambda n=n: RayExecutor(workers=n)))
                                                    for n in counts]:
        times, per_worker = [], None
        for r in range(args.runs):
            out = work / f"out-{label}"
            shutil.rmtree(out, ignore_errors=True)
            ex = make()
            t0 = time.perf_counter()
            res = merge(recipe, out, shard_size=args.shard_size, executor=ex, on_warning=lambda s: None)
            times.append(time.perf_counter() - t0)
            if ex is not None:
                per_worker = [{"seconds": round(w["seconds"], 2), "shards": len(w["shards"]),
                               "tensors": w["tensors"]} for w in ex.worker_reports]
        if reference is None:
            reference = out
            identical = True
        else:
            identical = same_bytes(reference, out)
        s = res.summary
        results[label] = {"median_seconds": round(statistics.median(times), 2), "runs": [round(t, 2) for t in times],
                          "output_bytes": s["output_bytes"], "input_bytes": s["input_bytes"],
                          "output_MB_per_s": round(s["output_bytes"] / 1e6 / statistics.median(times), 1),
                          "identical_to_local": identical, "per_worker": per_worker}
        print(label, json.dumps(results[label]), flush=True)
    ray.shutdown()
    (work / "bench_ray.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                     "results": results}, indent=2))


if __name__ == "__main__":
    main()
