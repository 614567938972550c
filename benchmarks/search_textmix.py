"""Issue 19 item 5: CMA-ES, random search and M2N2 on textmix at equal numbers of evaluations.

Reads the three search folders (``mergelab evolve cma.yaml``, ``mergelab evolve random.yaml``,
``mergelab m2n2 m2n2.yaml``; configs in docs/results/search-textmix/), takes for each budget N the best
candidate by validation fitness among the first N evaluations (M2N2: its ``best-at-N/`` archive member),
scores it on the full **test** splits with each task's expert head, and does the same for the bench's
validation grid for task arithmetic (uniform weights ``lambda`` in 0.3, 0.5, 1.0, scored on the same
capped validation). Writes ``results.json``, ``results.md`` and ``best_so_far.png`` into ``--out``.

``--grid-evals N`` (N > 3) also runs the validation grid at the searches' budget: uniform weights
``lambda = k / N`` for k = 1..N, evaluated coarse to fine (step 0.1 first, then 0.05, then 0.01 when N is
a multiple of 100, then the rest), so the first 10, 20 (and 100) points are grids too; each point's
fitness is kept in ``grid.json`` in the work folder, and a rerun evaluates only the missing points.

    cd WORKDIR   # holds cma.yaml, random.yaml, m2n2.yaml, textmix-base/, out-cma/, out-random/, out-m2n2/
    python benchmarks/search_textmix.py --workdir . --budgets 50,100,200 --out docs/results/search-textmix
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import yaml

GRID = (0.3, 0.5, 1.0)  # mergelab bench's LAMBDA_SUM grid for task arithmetic


def best_within(evals: list, n: int) -> dict:
    """The best of the first ``n`` evaluations (the earliest on ties)."""
    pool = [e for e in evals[:n] if math.isfinite(e["fitness"])]
    return max(pool, key=lambda e: (e["fitness"], -e["eval"]))


STEPS = (10, 20, 100)  # the coarser grids inside a fine one: steps 0.1, 0.05, 0.01 (when they divide it)


def grid_order(n: int) -> list:
    """``k / n`` for k = 1..n, coarse to fine: the multiples of 0.1, then of 0.05, then of 0.01 (when n is a
    multiple of 100), then the rest; so the first d points are the grid ``k / d`` for each such step."""
    steps = [d for d in STEPS if n % d == 0 and d < n]

    def level(k):
        return next((i for i, d in enumerate(steps) if (d * k) % n == 0), len(steps))
    return [round(k / n, 6) for k in sorted(range(1, n + 1), key=lambda k: (level(k), k))]


def curve(evals: list) -> list:
    best, out = -math.inf, []
    for e in evals:
        best = max(best, e["fitness"])
        out.append(best)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", type=Path, default=Path("."))
    ap.add_argument("--budgets", default="50,100,200")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--searches", default="grid,cma,random,m2n2", help="which rows to compute (default all)")
    ap.add_argument("--grid-evals", type=int, default=3, help="N > 3: also the grid lambda = k/N, k = 1..N")
    args = ap.parse_args()
    os.chdir(args.workdir)
    budgets = [int(b) for b in args.budgets.split(",")]
    only = set(args.searches.split(","))
    from mergelab.evaluate.model import read_state
    from mergelab.search.candidate import CandidateEvaluator

    cfg = yaml.safe_load(Path("cma.yaml").read_text())
    val = CandidateEvaluator(cfg)
    test_cfg = json.loads(json.dumps(cfg))
    test_cfg["fitness"]["split"] = "test"
    test_cfg["fitness"].pop("limit", None)
    test = CandidateEvaluator(test_cfg)
    tasks = [t.name for t in test.config.fitness.tasks]
    results = {"validation_limit_per_task": cfg["fitness"].get("limit"), "tasks": tasks, "rows": [], "curves": {}}

    def test_row(name, budget, fitness, genes=None, state=None, **extra):
        t0 = time.perf_counter()
        if state is None:
            _, state = test.merge(np.asarray(genes))
        r = test.scorer.score(state)
        row = {"search": name, "budget": budget, "validation_fitness": fitness, "test_mean_accuracy": r["fitness"],
               "test_tasks": r["tasks"], "test_seconds": round(time.perf_counter() - t0, 1), **extra}
        results["rows"].append(row)
        print(json.dumps(row), flush=True)

    # the bench's grid: uniform weights, three points on the same validation; --grid-evals: a finer one
    cache_path = Path("grid.json")
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    if cache.get("limit", "none") != cfg["fitness"].get("limit"):
        cache = {"limit": cfg["fitness"].get("limit"), "points": {}}

    def grid_point(lam):
        key = f"{lam:.6g}"
        if key not in cache["points"]:
            r = val.evaluate(np.full(val.genome.size, lam))
            cache["points"][key] = {"lambda": lam, "fitness": r["fitness"], "tasks": r["tasks"],
                                    "seconds": r["merge_and_score_seconds"]}
            cache_path.write_text(json.dumps(cache, indent=2) + "\n")
            print(f"grid lambda {lam}: {r['fitness']:.4f} ({r['merge_and_score_seconds']:.1f} s)", flush=True)
        return cache["points"][key]

    grid = [grid_point(lam) for lam in (GRID if "grid" in only else ())]
    results["grid"] = grid
    if grid:
        g = max(grid, key=lambda e: e["fitness"])
        test_row("validation grid (task arithmetic, lambda in 0.3/0.5/1.0)", len(GRID), g["fitness"],
                 genes=np.full(val.genome.size, g["lambda"]), values={"lambda": g["lambda"]})
    if "grid" in only and args.grid_evals > len(GRID):
        fine = [grid_point(lam) for lam in grid_order(args.grid_evals)]
        results["fine_grid"] = fine
        results["curves"]["grid (lambda k/%d, coarse to fine)" % args.grid_evals] = curve(fine)
        for n in sorted({d for d in STEPS if args.grid_evals % d == 0} | {args.grid_evals}):  # first n: k / n
            if n <= len(fine):
                g = max(fine[:n], key=lambda e: e["fitness"])  # the earliest on ties
                test_row(f"validation grid (uniform lambda, step {1 / n:g})", n,
                         g["fitness"], genes=np.full(val.genome.size, g["lambda"]), values={"lambda": g["lambda"]},
                         seconds_per_evaluation=round(float(np.mean([e["seconds"] for e in fine[:n]])), 2))

    for name, folder in (("CMA-ES", "out-cma"), ("random", "out-random")):
        if folder[4:] not in only or not Path(folder, "history.json").is_file():
            continue
        h = json.loads(Path(folder, "history.json").read_text())
        evals = h["evaluations"]
        results["curves"][name] = curve(evals)
        secs = [e["merge_and_score_seconds"] for e in evals]
        for n in budgets:
            if len(evals) >= n:
                b = best_within(evals, n)
                test_row(name, n, b["fitness"], genes=b["genes"], best_eval=b["eval"], values=b["values"],
                         seconds_per_evaluation=round(float(np.mean(secs[:n])), 2))
    if "m2n2" in only and Path("out-m2n2").is_dir():
        hp = Path("out-m2n2", "history.json")
        h = json.loads(hp.read_text()) if hp.is_file() else None
        if h is not None:
            # the other searches' curves are means over tasks: M2N2's too when its history records them
            by_task = all("task_mean" in e for e in h["evaluations"])
            results["curves"]["M2N2" + ("" if by_task else " (pooled)")] = curve(
                [{"fitness": e["task_mean"]} for e in h["evaluations"]] if by_task else h["evaluations"])
            secs = [e.get("seconds") for e in h["evaluations"] if e.get("seconds") is not None]
        for n in budgets:
            folder = Path("out-m2n2", f"best-at-{n}")
            if folder.is_dir():
                fit = h["best_at"][str(n)]["mean_score"] if h else None
                by = h["best_at"][str(n)].get("by", "pooled") if h else None
                state = read_state(folder)
                # M2N2's own fitness is the accuracy over all pooled examples; the column is the mean over tasks
                task_mean = val.scorer.score(state)["fitness"]
                test_row("M2N2", n, task_mean, state=state, m2n2_pooled_validation=fit, m2n2_best_by=by,
                         seconds_per_evaluation=round(float(np.mean(secs[:n])), 2) if h and secs else None)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    _table(results, args.out / "results.md")
    _plot(results, grid, args.out / "best_so_far.png")


def _table(results: dict, path: Path) -> None:
    tasks = results["tasks"]
    kind = "full" if results["validation_limit_per_task"] is None else "capped"
    lines = [f"| search | evaluations | validation fitness ({kind}) | test mean acc | " + " | ".join(tasks) +
             " | s / evaluation |", "|---" * (5 + len(tasks)) + "|"]
    for r in results["rows"]:
        fit = "–" if r["validation_fitness"] is None else f"{100 * r['validation_fitness']:.1f}"
        lines.append(f"| {r['search']} | {r['budget']} | {fit} | {100 * r['test_mean_accuracy']:.1f} | " +
                     " | ".join(f"{100 * r['test_tasks'][t]:.1f}" for t in tasks) +
                     f" | {r.get('seconds_per_evaluation', '–')} |")
    path.write_text("\n".join(lines) + "\n")


def _plot(results: dict, grid: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for name, ys in results["curves"].items():
        ax.plot(range(1, len(ys) + 1), [100 * y for y in ys], label=name)
    if grid:
        ax.axhline(100 * max(g["fitness"] for g in grid), color="gray", ls="--", label="validation grid (3 points)")
    ax.set_xlabel("evaluations")
    limit = results["validation_limit_per_task"]
    ax.set_ylabel("best validation fitness so far (%, " + ("full splits)" if limit is None else f"{limit} / task)"))
    ax.set_title("textmix, task arithmetic with one weight per expert")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
