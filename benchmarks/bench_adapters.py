#!/usr/bin/env python
"""LoRA adapter merges: mergelab against PEFT's ``add_weighted_adapter`` and mergekit's densify-then-merge.

Same inputs for every tool, one run of this script: a synthetic float32 Llama base
(:func:`mergelab.synthetic.make_llama_family`) and ``--adapters`` PEFT LoRA folders of rank ``--rank``
on every attention and MLP projection (random factors, written with
:func:`mergelab.io.peft_adapter.write_lora`), in ``--workdir`` (default ``bench-out/adapters``). Each
task runs as its own process ``--runs`` times (medians reported, order rotated between runs); wall
time is taken around the process (interpreter start and imports included), CPU time (user + system)
and peak memory are the child's own from ``os.wait4`` (this parent never imports torch, so it passes
on no high-water mark).

Tasks (all task arithmetic, weights 1/n):

* ``mergelab cat`` / ``peft cat``: adapter-space concatenation (exact), written as a PEFT folder;
  PEFT loads the base model and every adapter, ``add_weighted_adapter(combination_type="cat")``,
  ``save_pretrained``.
* ``mergelab svd`` / ``peft svd``: the merged delta truncated to rank ``--rank`` (PEFT with its default
  ``svd_full_matrices=True``).
* ``mergelab dense`` / ``mergekit dense``: a full merged model from ``BASE+ADAPTER`` inputs. mergelab
  forms ``W + s B A`` per tensor while merging; mergekit 0.1.5 first densifies each adapter into a
  cached full copy (PEFT ``merge_and_unload`` + ``save_pretrained`` into ``--lora-merge-cache``, emptied
  before every run), then merges those copies.

Example (a few minutes on 2 idle cores)::

    nice -n 10 .venv/bin/python benchmarks/bench_adapters.py --runs 3
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SIZES = {
    "small": dict(hidden=512, layers=4, intermediate=1408, vocab=8000),
    "tiny": dict(hidden=64, layers=2, intermediate=128, vocab=256),  # for checking the script itself
}
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# --------------------------------------------------------------------------- children (import torch)
def _prepare(work: Path, size: str, n: int, rank: int) -> None:
    import torch

    from mergelab.io.peft_adapter import write_lora
    from mergelab.synthetic import make_llama_family

    base = make_llama_family(work / "models", experts=0, **SIZES[size])[0]
    from safetensors import safe_open

    with safe_open(str(base / "model.safetensors"), "pt") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    for i in range(n):
        g = torch.Generator().manual_seed(100 + i)
        mods = {}
        for name, shape in shapes.items():
            if name.endswith(".weight") and name.split(".")[-2] in TARGETS:
                out, inn = shape
                mods[name[:-len(".weight")]] = (torch.randn(rank, inn, generator=g) / inn ** 0.5,
                                                torch.randn(out, rank, generator=g) * 0.01)
        write_lora(work / f"adapter_{i}", mods, alphas={m: 2.0 * rank for m in mods}, base_model=str(base),
                   overwrite=True)


def _peft(work: Path, combine: str, n: int, rank: int, out: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(work / "models" / "base"), dtype=torch.float32)
    names = [f"a{i}" for i in range(n)]
    pm = PeftModel.from_pretrained(model, str(work / "adapter_0"), adapter_name=names[0])
    for i in range(1, n):
        pm.load_adapter(str(work / f"adapter_{i}"), adapter_name=names[i])
    kw = {"svd_rank": rank} if combine == "svd" else {}
    pm.add_weighted_adapter(names, [1.0 / n] * n, "merged", combination_type=combine, **kw)
    pm.save_pretrained(str(out), selected_adapters=["merged"])


# --------------------------------------------------------------------------- parent
def _recipes(work: Path, n: int, rank: int) -> dict:
    import yaml

    base = str(work / "models" / "base")
    models = [{"model": f"{base}+{work / f'adapter_{i}'}", "parameters": {"weight": 1.0 / n}} for i in range(n)]
    rec = {"merge_method": "task_arithmetic", "base_model": base, "models": models, "dtype": "float32"}
    out = {}
    for name, extra in (("cat", {"output": {"format": "peft", "combine": "cat"}}),
                        ("svd", {"output": {"format": "peft", "combine": "svd", "rank": rank}}), ("dense", {})):
        path = work / f"recipe_{name}.yaml"
        path.write_text(yaml.safe_dump({**rec, **extra}, sort_keys=False))
        out[name] = path
    return out


def _measure(cmd, env) -> tuple:
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{err.decode()[-3000:]}")
    return wall, usage.ru_maxrss * 1024, usage.ru_utime + usage.ru_stime


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=REPO / "bench-out" / "adapters")
    ap.add_argument("--size", default="small", choices=sorted(SIZES))
    ap.add_argument("--adapters", type=int, default=3)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None,
                    help="OMP/MKL threads for every child (the same for every tool; default: their own)")
    ap.add_argument("--mergekit-python", default=os.environ.get("MERGEKIT_PYTHON")
                    or str(REPO / ".venv-mergekit" / "bin" / "python"))
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    work = a.workdir / f"{a.size}-n{a.adapters}-r{a.rank}"
    if a.child:
        kind = a.child[0]
        if kind == "prepare":
            _prepare(work, a.size, a.adapters, a.rank)
        else:
            _peft(work, a.child[1], a.adapters, a.rank, Path(a.child[2]))
        return
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    if a.threads:
        env.update(OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads))
    me = [sys.executable, str(Path(__file__).resolve()), "--workdir", str(a.workdir), "--size", a.size,
          "--adapters", str(a.adapters), "--rank", str(a.rank)]
    if not (work / f"adapter_{a.adapters - 1}").exists():
        work.mkdir(parents=True, exist_ok=True)
        subprocess.run(me + ["--child", "prepare"], env=env, check=True)
    recipes = _recipes(work, a.adapters, a.rank)
    out = work / "out"
    cache = work / "lora-cache"
    mergelab = [sys.executable, "-m", "mergelab", "merge", "--quiet", "--overwrite"]
    tasks = {
        "mergelab cat": mergelab + [str(recipes["cat"]), "-o", str(out)],
        "peft cat": me + ["--child", "peft", "cat", str(out)],
        "mergelab svd": mergelab + [str(recipes["svd"]), "-o", str(out)],
        "peft svd": me + ["--child", "peft", "svd", str(out)],
        "mergelab dense": mergelab + [str(recipes["dense"]), "-o", str(out)],
    }
    if Path(a.mergekit_python).exists():
        mk = str(Path(a.mergekit_python).parent / "mergekit-yaml")
        tasks["mergekit dense"] = [mk, str(recipes["dense"]), str(out), "--lora-merge-cache", str(cache),
                                   "--out-shard-size", "5B"]
    results = {t: [] for t in tasks}
    names = list(tasks)
    for run in range(a.runs):
        order = names[run % len(names):] + names[:run % len(names)]
        for t in order:
            shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(cache, ignore_errors=True)
            results[t].append(_measure(tasks[t], env))
            w, m, c = results[t][-1]
            print(f"run {run + 1} {t}: {w:.2f} s wall, {c:.2f} s CPU, {m / 2**20:.0f} MiB", flush=True)
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(cache, ignore_errors=True)
    med = {t: tuple(statistics.median(x[i] for x in r) for i in range(3)) for t, r in results.items()}
    pairs = [("cat", "peft cat", "mergelab cat"), ("svd", "peft svd", "mergelab svd"),
             ("dense model", "mergekit dense", "mergelab dense")]
    lines = [f"| task | tool | wall s (median of {a.runs}) | CPU s | peak RSS MiB | wall ratio | CPU ratio | "
             f"memory ratio |", "|---|---|---|---|---|---|---|---|"]
    for label, other, ours in pairs:
        if other not in med:
            continue
        for tool in (ours, other):
            w, m, c = med[tool]
            ratios = ["", "", ""] if tool == ours else [f"{x / y:.2f}x" for x, y in zip((w, c, m), (med[ours][0],
                                                                                                  med[ours][2],
                                                                                                  med[ours][1]))]
            lines.append(f"| {label} | {tool.split()[0]} | {w:.2f} | {c:.2f} | {m / 2**20:.0f} | " + " | ".join(ratios)
                         + " |")
    table = "\n".join(lines)
    print(table)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    (a.workdir / f"results-{stamp}.md").write_text(table + "\n")
    (a.workdir / f"results-{stamp}.json").write_text(json.dumps({
        "size": a.size, "shape": SIZES[a.size], "adapters": a.adapters, "rank": a.rank, "runs": a.runs,
        "threads": a.threads,
        "targets": TARGETS, "python": platform.python_version(), "raw": results,
        "median": {t: {"wall_s": w, "peak_rss_bytes": m, "cpu_s": c} for t, (w, m, c) in med.items()}}, indent=2))


if __name__ == "__main__":
    main()
