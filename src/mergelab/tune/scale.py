"""Pool-scaling experiment: FW-Merging and AdaMerging as the pool fills with irrelevant models.

Target: ``targets`` tasks of the suite (their experts are the *relevant* models, their heads score
the merge). The pool starts with the relevant experts and grows, alternately, with (a) experts of
*other* tasks of the suite and (b) models fine-tuned on a target task with **shuffled labels**
(trained here once, with the bench's training loop and settings). For each pool size, each method
runs in a **fresh subprocess** reading the pool from safetensors files one model at a time
(``storage="stream"``), and reports test accuracy on the target tasks, its own wall time and its
process's peak resident memory -- so the memory curve measures the method, not earlier runs.

``python -m mergelab.tune.scale --suite textmix --cache DIR --out DIR`` (or ``mergelab tune scale``)
writes ``scale.json`` and ``pool-scaling.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence

import torch


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _bench_train_config(cache):
    from mergelab.bench.training import TrainConfig

    path = cache.dir / "prepare.json" if cache is not None else None
    prep = json.loads(path.read_text()) if path is not None and path.is_file() else {}
    given = prep.get("train_config", {})
    return TrainConfig(**{k: v for k, v in given.items() if k in TrainConfig.__dataclass_fields__})


def train_shuffled(suite, targets: Sequence[str], count: int, out: Path, seed: int = 0, cache=None,
                   log=print, base: str = "minilm-l6") -> List[dict]:
    """``count`` models fine-tuned on target tasks with **shuffled labels** (the bench's training loop and
    settings, read from the cache's ``prepare.json`` when given); encoders written to ``out/pool``."""
    from safetensors.torch import save_file

    from mergelab.bench.training import TrainConfig, train
    from mergelab.evaluate.model import base_model_path, load_config, load_tokenizer, read_state, split_state

    pool_dir = out / "pool"
    pool_dir.mkdir(parents=True, exist_ok=True)
    base_path = base_model_path(base)
    config, tok = load_config(base_path), load_tokenizer(base_path)
    base_enc = {k: v.float() for k, v in split_state(read_state(base_path))[0].items() if v.is_floating_point()}
    cfg = _bench_train_config(cache)
    members = []
    for i in range(count):
        t = targets[i % len(targets)]
        path = pool_dir / f"shuffled-{t}-{i}.safetensors"
        if not path.is_file():
            task = suite.task(t)
            tr = task.split("train")
            labels = [e.label for e in tr]
            random.Random(seed + 1000 + i).shuffle(labels)
            log(f"training a shuffled-label model on {t} ({len(tr)} examples)")
            state, _, info = train(config, base_enc, tok, [([e.text for e in tr], labels, task.num_labels)],
                                   TrainConfig(**{**cfg.to_dict(), "seed": seed + 1000 + i}))
            save_file({k: v.contiguous() for k, v in state.items()}, str(path))
        members.append({"name": f"shuffled:{t}#{i}", "path": str(path), "kind": "shuffled labels"})
    return members


def build_pool(suite, cache, targets: Sequence[str], others: Sequence[str], shuffled: int, out: Path,
               seed: int = 0, log=print, base: str = "minilm-l6") -> List[dict]:
    """Write every pool member's encoder to ``out/pool/<name>.safetensors``; returns the ordered pool:
    the relevant experts, then other-task experts and shuffled-label models, alternately."""
    from safetensors.torch import save_file

    pool_dir = out / "pool"
    pool_dir.mkdir(parents=True, exist_ok=True)
    members = []
    for t in list(targets) + list(others):
        path = pool_dir / f"expert-{t}.safetensors"
        if not path.is_file():
            enc, _, _ = cache.expert(t)
            save_file({k: v.float().contiguous() for k, v in enc.items() if v.is_floating_point()}, str(path))
        members.append({"name": f"expert:{t}", "path": str(path), "kind": "relevant" if t in targets else "other task"})
    shuffled_members = train_shuffled(suite, targets, shuffled, out, seed, cache, log, base)
    irrelevant = []
    rest_other = [m for m in members if m["kind"] == "other task"]
    for j in range(max(len(rest_other), len(shuffled_members))):
        for group in (rest_other, shuffled_members):
            if j < len(group):
                irrelevant.append(group[j])
    return [m for m in members if m["kind"] == "relevant"] + irrelevant


def worker(args) -> dict:
    """One method on the first ``args.size`` pool members, in this (fresh) process."""
    from mergelab.bench.cache import BenchCache
    from mergelab.evaluate.tasks import load_suite
    from mergelab.tune.bench import TunedBench, TunedSettings
    from mergelab.tune.functional import ModelPool

    torch.set_num_threads(args.threads)
    suite = load_suite(args.suite)
    cache = BenchCache(suite, Path(args.cache))
    pool_spec = json.loads(Path(args.pool).read_text())[: args.size]
    targets = args.targets.split(",")
    bench = TunedBench(suite, cache, targets, [], base=args.base, seed=args.seed,
                       settings=TunedSettings(batch_size=16), log=lambda s: None)
    # the bench runner holds the target experts in memory for its evaluator's references; drop them
    bench.experts.clear()
    bench.runner.experts.clear()
    import gc

    gc.collect()
    pool = ModelPool([m["path"] for m in pool_spec], names=[m["name"] for m in pool_spec])
    tm = bench.task_model()
    from mergelab.bench.run import PeakMemory

    mem = PeakMemory(interval=0.01).__enter__()
    t0 = time.perf_counter()
    if args.method in ("fw", "fw_ip"):
        from mergelab.tune.fw_merging import FWConfig, fw_merging

        data = bench.batches("train", args.examples, 16)
        res = fw_merging(tm, bench.base, pool, data,
                         FWConfig(iterations=args.iterations, step_size=args.step_size, scaling_factor=1.0,
                                  init="base", exclude=bench.exclude, granularity=args.granularity,
                                  lmo="inner_product" if args.method == "fw_ip" else "cosine_raw"))
        detail = {"selections": [h["selected"] for h in res.history], "coefficients": res.coefficients}
    elif args.method == "ta":  # data-free contrast: task arithmetic (lambda 0.3) over the whole pool, streamed
        from mergelab.tune.functional import CoefficientSpace, merge_keys

        space = CoefficientSpace(bench.base, pool, merge_keys(bench.base, pool, bench.exclude), "task", init=0.3,
                                 storage="stream")

        class _Res:
            state = space.assemble()

        res = _Res()
        detail = {}
    else:
        from mergelab.tune.adamerging import AdaMergingConfig, adamerging

        data = bench.batches("validation", args.examples, 16)
        res = adamerging(tm, bench.base, pool, data,
                         AdaMergingConfig(args.granularity, lr=args.lr, steps=args.steps, exclude=bench.exclude,
                                          storage="memory" if args.method == "ada_mem" else "stream"))
        per_model = {}
        for name, c in res.coefficients.items():
            per_model[name] = c if isinstance(c, float) else sum(v for vs in c.values() for v in vs) / max(
                1, sum(len(vs) for vs in c.values()))
        detail = {"mean_coefficient": per_model}
    seconds = time.perf_counter() - t0
    mem.__exit__(None, None, None)
    ev = bench.runner.evaluator
    acc = {}
    enc = ev.encoder(bench.full(res.state))
    from mergelab.evaluate.metrics import accuracy

    for t, bits in ev.correct(enc, bench.runner.heads, targets, "test").items():
        acc[t] = accuracy(bits)
    return {"method": args.method, "size": args.size, "accuracy": acc,
            "mean_accuracy": sum(acc.values()) / len(acc), "seconds": round(seconds, 2),
            "peak_rss_mib": round(mem.peak / 2**20, 1), "rss_at_start_mib": round(mem.start / 2**20, 1),
            "process_high_water_mib": round(_peak_mib(), 1), "pool": [m["name"] for m in pool_spec],
            "pool_reads": pool.reads, **detail}


def plot(results: List[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    labels = {"fw": "FW-Merging hard, LMO cosine_raw (reference)", "fw_ip": "FW-Merging hard, LMO inner_product",
              "ada": "AdaMerging layer-wise (stream)", "ada_mem": "AdaMerging layer-wise (task vectors in memory)",
              "ta": "task arithmetic, lambda 0.3 (no data)"}
    for method in sorted({r["method"] for r in results}):
        rs = sorted([r for r in results if r["method"] == method], key=lambda r: r["size"])
        sizes = [r["size"] for r in rs]
        axes[0].plot(sizes, [100 * r["mean_accuracy"] for r in rs], marker="o", label=labels.get(method, method))
        axes[1].plot(sizes, [r["peak_rss_mib"] for r in rs], marker="o", label=labels.get(method, method))
    axes[0].set_xlabel("models in the pool (4 relevant + irrelevant)")
    axes[0].set_ylabel("mean test accuracy on the 4 target tasks (%)")
    axes[1].set_xlabel("models in the pool")
    axes[1].set_ylabel("peak resident memory of the run (MiB)")
    axes[1].set_ylim(bottom=0)
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Irrelevant models in the pool: accuracy and memory", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="python -m mergelab.tune.scale", description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", default="textmix")
    p.add_argument("--base", default="minilm-l6")
    p.add_argument("--cache", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--targets", default="sentiment,language,frequency,syllables")
    p.add_argument("--others", default="pos,surname,name_gender,docstring")
    p.add_argument("--shuffled", type=int, default=4)
    p.add_argument("--sizes", default="4,6,8,10,12")
    p.add_argument("--methods", default="fw,ada")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--examples", type=int, default=32)
    p.add_argument("--iterations", type=int, default=10)
    p.add_argument("--step-size", type=float, default=1.0)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--granularity", default=None)
    p.add_argument("--plot", default=None, help="PNG path (default OUT/pool-scaling.png)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--pool", default=None, help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--method", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        args.granularity = args.granularity or ("task" if args.method.startswith(("fw", "ta")) else "layer")
        print("RESULT " + json.dumps(worker(args)))
        return
    from mergelab.bench.cache import BenchCache
    from mergelab.evaluate.tasks import load_suite

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suite = load_suite(args.suite)
    cache = BenchCache(suite, Path(args.cache))
    targets = args.targets.split(",")
    pool = build_pool(suite, cache, targets, [t for t in args.others.split(",") if t], args.shuffled, out, args.seed,
                      base=args.base)
    (out / "pool.json").write_text(json.dumps(pool, indent=1))
    results_path = out / "scale.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else []
    done = {(r["method"], r["size"]) for r in results}
    for method in args.methods.split(","):
        for size in [int(s) for s in args.sizes.split(",")]:
            if (method, size) in done or size > len(pool):
                continue
            cmd = [sys.executable, "-m", "mergelab.tune.scale", "--worker", "1", "--pool", str(out / "pool.json"),
                   "--size", str(size), "--method", method, "--suite", args.suite, "--cache", args.cache, "--base", args.base,
                   "--out", args.out, "--targets", args.targets, "--threads", str(args.threads),
                   "--examples", str(args.examples), "--iterations", str(args.iterations),
                   "--step-size", str(args.step_size), "--steps", str(args.steps), "--lr", str(args.lr),
                   "--seed", str(args.seed)] + (["--granularity", args.granularity] if args.granularity else [])
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode != 0 or not line:
                raise SystemExit(f"worker {method} size {size} failed:\n{proc.stderr[-3000:]}")
            r = json.loads(line[-1][len("RESULT "):])
            results.append(r)
            results_path.write_text(json.dumps(results, indent=1))
            print(f"{method} size {size}: mean accuracy {r['mean_accuracy']:.4f}, {r['seconds']:.0f} s, "
                  f"peak {r['peak_rss_mib']:.0f} MiB (wall {time.perf_counter() - t0:.0f} s)", flush=True)
    plot(results, Path(args.plot) if args.plot else out / "pool-scaling.png")


if __name__ == "__main__":
    main()
