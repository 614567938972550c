"""``mergelab evolve``: CMA-ES over a merge genome (Akiba et al. 2024, arXiv 2403.13187; mergekit-evolve).

Each generation CMA-ES (Hansen's ``cma`` package, ``CMAEvolutionStrategy`` with mergekit-evolve's
``sigma0 = 1/6`` by default) proposes ``popsize`` genotypes; each is decoded to a recipe
(:mod:`mergelab.search.genome`), merged in memory and scored (:mod:`mergelab.search.candidate`), in
this process or on Ray actors (:mod:`mergelab.search.pool`); CMA-ES minimises minus the fitness. The
search stops once ``max_evals`` evaluations are done (the last generation is completed, so it may end
up to ``popsize - 1`` past it) or when CMA-ES's own stopping criteria fire.

``OUT`` holds, rewritten after every generation:

* ``best_recipe.yaml``: the best candidate so far as an ordinary recipe (``mergelab merge`` of it
  gives exactly the tensors that were scored: their digest is in the history);
* ``history.json``: every evaluation (generation, genes, decoded values, fitness, per-task scores,
  tensor digest, seconds) and the best; ``history.png``: fitness against evaluations;
* ``state.pkl``: the CMA-ES object, NumPy's global random state (``cma`` samples from it) and the
  history. ``--resume`` continues from it after a kill and ends exactly as an uninterrupted run.

CMA-ES's seed is ``search.seed + 1`` (``cma`` reads 0 as "seed from the clock").

``search.strategy: random`` (``--strategy random``) replaces CMA-ES by uniform random search at the same
budget: each "generation" draws ``popsize`` genotypes (default CMA-ES's ``4 + floor(3 ln genes)``)
uniformly from the genome's sampling bounds (:meth:`~mergelab.search.genome.Genome.sample_bounds`)
with ``numpy.random.default_rng(search.seed)``; the draws do not depend on the budget, and the
generator's state is in ``state.pkl``, so ``--resume`` continues it exactly as for CMA-ES.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import yaml

from mergelab.errors import MergeLabError
from mergelab.search.candidate import SearchConfig, read_config

STATE = "state.pkl"
FAILED = 1e30  # what CMA-ES is told for a candidate whose merge failed (it minimises)


class RandomSearch:
    """Uniform random search with CMA-ES's ask/tell/stop interface (``tell`` learns nothing)."""

    def __init__(self, low: np.ndarray, high: np.ndarray, seed: int, popsize: int):
        self.low, self.high, self.popsize = np.asarray(low, float), np.asarray(high, float), int(popsize)
        self.rng = np.random.default_rng(seed)

    def ask(self) -> list:
        return list(self.rng.uniform(self.low, self.high, size=(self.popsize, len(self.low))))

    def tell(self, xs, fitnesses) -> None:
        pass

    def stop(self) -> dict:
        return {}


def default_popsize(genes: int) -> int:
    """CMA-ES's default population, ``4 + floor(3 ln N)``."""
    return 4 + int(3 * math.log(genes))


class SearchStateError(MergeLabError):
    """The output folder cannot be used (exists, or holds another search)."""


def resumable(config: SearchConfig, search: dict) -> dict:
    """What a resumed search must share with the interrupted one, as plain JSON: the genome as read
    (model paths absolute), the fitness (tasks with their data's fingerprints, split, limit, ...) and
    ``search`` (the caller leaves out what may change on resume: the budget, snapshots)."""
    blob = {"genome": config.data["genome"], "fitness": config.fitness.describe(), "search": search}
    return json.loads(json.dumps(blob, sort_keys=True, default=str))


def _short(v: Any) -> str:
    text = json.dumps(v, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


def differences(old: Any, new: Any, where: str = "") -> list:
    """``"PATH: A there, B now"`` for every dotted path (``genome.models[1]``, ``search.seed``) at which
    two JSON-like configs differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            path = f"{where}.{k}" if where else str(k)
            if k not in old:
                out.append(f"{path}: unset there, {_short(new[k])} now")
            elif k not in new:
                out.append(f"{path}: {_short(old[k])} there, unset now")
            else:
                out += differences(old[k], new[k], path)
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [d for i, (a, b) in enumerate(zip(old, new)) for d in differences(a, b, f"{where}[{i}]")]
    return [] if old == new else [f"{where}: {_short(old)} there, {_short(new)} now"]


ALGORITHMS = {"evolve": "an evolve search (mergelab evolve)", "m2n2": "an M2N2 run (mergelab m2n2)"}


def check_resume(out: Path, state: dict, algorithm: str, config: dict, fingerprint: Optional[str] = None) -> None:
    """Refuse to ``--resume`` the state in ``out`` under another command or config, naming every
    difference (``config`` from :func:`resumable`); nothing in ``out`` is touched. ``fingerprint``
    checks states written before the config itself was stored in them."""
    held = state.get("algorithm", "evolve" if "es" in state else None)
    if held != algorithm:
        raise SearchStateError(f"--resume: '{out}' holds {ALGORITHMS.get(held, 'another search')}, not "
                               f"{ALGORITHMS[algorithm]}; use another folder or --overwrite")
    if "config" in state:
        diff = differences(state["config"], config)
    else:
        diff = [] if state.get("fingerprint") == fingerprint else ["genome, fitness or search settings"]
    if diff:
        raise SearchStateError(f"--resume: '{out}' holds a search of another config ({'; '.join(diff)}); resume "
                               "with the config it was started with, or use another folder or --overwrite")


def prepare_out(out: Path, resume: bool, overwrite: bool) -> None:
    out = Path(out)
    if resume:
        if not (out / STATE).is_file():
            raise SearchStateError(f"--resume: '{out}' holds no search state ({STATE}); run without --resume")
        return
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise SearchStateError(f"'{out}' exists and is not empty; pass --overwrite to replace it or --resume "
                                   "to continue the search in it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_json(path: Path, obj: Any) -> None:
    write_atomic(path, (json.dumps(obj, indent=2, default=_jsonable) + "\n").encode())


def _jsonable(v):
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    raise TypeError(type(v))


def write_recipe(path: Path, recipe: dict, header: str) -> None:
    text = "".join(f"# {line}\n" for line in header.splitlines()) + yaml.safe_dump(recipe, sort_keys=False)
    write_atomic(path, text.encode())


def plot_history(path: Path, evaluations: list, title: str) -> None:
    """Fitness of every evaluation (dots) and the best so far (line) against the evaluation number."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [e["eval"] for e in evaluations]
    ys = [e["fitness"] if math.isfinite(e["fitness"]) else float("nan") for e in evaluations]
    best, run = [], -math.inf
    for y in ys:
        run = max(run, y) if y == y else run
        best.append(run if math.isfinite(run) else float("nan"))
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    ax.plot(xs, ys, ".", alpha=0.5, label="candidate")
    ax.plot(xs, best, "-", label="best so far")
    ax.set_xlabel("evaluations")
    ax.set_ylabel("fitness")
    ax.set_title(title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    tmp = path.with_name(path.name + ".partial.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def evolve(config: Any, out: Path, *, workers: Optional[int] = None, ray_address: Optional[str] = None,
           threads: int = 1, resume: bool = False, overwrite: bool = False, max_evals: Optional[int] = None,
           log: Callable[[str], None] = print, use_ray: Optional[bool] = None,
           on_generation: Optional[Callable[[int], None]] = None, strategy: Optional[str] = None) -> dict:
    """Run (or ``resume``) the CMA-ES (or random, ``search.strategy`` / ``strategy``) search of
    ``config`` into ``out``; returns the history dict.

    Candidates are evaluated on Ray when ``ray_address`` is given, ``workers > 1`` or ``use_ray``
    (:func:`mergelab.search.pool.make_pool`). ``max_evals`` overrides the config's budget (a resumed search may be given a larger one).
    ``on_generation(g)`` is called after generation ``g``'s state is written (tests stop a run there).
    """
    import cma

    from mergelab.search.pool import check_ray_address, make_pool

    if strategy is not None:
        if isinstance(config, (str, Path)):
            data = yaml.safe_load(Path(config).read_text(encoding="utf-8")) if Path(config).is_file() else None
            if isinstance(data, dict):
                data["search"] = {**(data.get("search") or {}), "strategy": strategy}
                cfg = read_config(data)
                cfg.path = Path(config)
            else:
                cfg = read_config(config)
        else:
            cfg = read_config({**config, "search": {**(config.get("search") or {}), "strategy": strategy}})
    else:
        cfg = read_config(config)
    if ray_address:
        check_ray_address(ray_address)
    if workers is not None and workers < 1:
        raise MergeLabError(f"--workers must be at least 1, got {workers}")
    out = Path(out)
    budget = int(max_evals or cfg.search["max_evals"])
    same = resumable(cfg, {k: v for k, v in cfg.search.items() if k != "max_evals"})
    if resume and (out / STATE).is_file():
        with open(out / STATE, "rb") as f:
            state = pickle.load(f)
        check_resume(out, state, "evolve", same, cfg.fingerprint())
    if ray_address or use_ray or (workers or 1) > 1:
        from mergelab.search.pool import connect

        connect(ray_address, workers or 1)  # a cluster that cannot be joined fails before OUT is touched
    prepare_out(out, resume, overwrite)
    genome = cfg.genome
    pool = make_pool(cfg.data, workers, ray_address, threads, use_ray)
    try:
        if resume:
            es = state["es"]
            np.random.set_state(state["np_random"])
            history = state["history"]
            log(f"resumed at generation {history['generations']} ({len(history['evaluations'])} evaluations)")
        else:
            if cfg.search["random_init"]:
                x0 = np.random.default_rng(cfg.search["seed"]).uniform(0, 1, genome.size)
            else:
                x0 = genome.x0()
            if cfg.search["strategy"] == "random":
                low, high = genome.sample_bounds()
                es = RandomSearch(low, high, cfg.search["seed"], cfg.search["popsize"] or default_popsize(genome.size))
            else:
                opts = {"seed": cfg.search["seed"] + 1, "verbose": -9, "maxfevals": budget}
                if cfg.search["popsize"]:
                    opts["popsize"] = cfg.search["popsize"]
                es = cma.CMAEvolutionStrategy(list(x0), cfg.search["sigma0"], opts)
            algorithm = "random" if cfg.search["strategy"] == "random" else "cma-es"
            history = {"config": str(cfg.path) if cfg.path else None, "algorithm": algorithm,
                       "genome_size": genome.size, "popsize": es.popsize, "sigma0": cfg.search["sigma0"],
                       "seed": cfg.search["seed"], "fitness": cfg.fitness.describe(), "generations": 0,
                       "evaluations": [], "best": None, "x0": [float(v) for v in x0]}
        if not isinstance(es, RandomSearch):
            es.opts.set({"maxfevals": budget})
        history["max_evals"] = budget
        history["workers"] = pool.size
        started = time.perf_counter()
        while len(history["evaluations"]) < budget and not es.stop():
            gen = history["generations"]
            xs = es.ask()
            t0 = time.perf_counter()
            results = pool.map(xs)
            wall = time.perf_counter() - t0
            es.tell(xs, [FAILED if not math.isfinite(r["fitness"]) else -r["fitness"] for r in results])
            for x, r in zip(xs, results):
                rec = {"eval": len(history["evaluations"]) + 1, "generation": gen,
                       "genes": [float(v) for v in x], "values": genome.describe(x), **r}
                history["evaluations"].append(rec)
                best = history["best"]
                if math.isfinite(r["fitness"]) and (best is None or r["fitness"] > best["fitness"]):
                    history["best"] = {"eval": rec["eval"], "generation": gen, "fitness": r["fitness"],
                                       "tasks": r["tasks"], "genes": rec["genes"], "values": rec["values"],
                                       "digest": r.get("digest"), "recipe": genome.decode(x)}
            history["generations"] = gen + 1
            history.setdefault("generation_seconds", []).append(round(wall, 3))
            _save(out, cfg, history, es, same)
            best = history["best"]
            log(f"generation {gen + 1}: {len(history['evaluations'])}/{budget} evaluations, best this generation "
                f"{max(r['fitness'] for r in results):.4f}, best so far "
                f"{best['fitness'] if best else float('nan'):.4f} ({wall:.1f} s, {wall / len(xs):.2f} s/evaluation)")
            if on_generation is not None:
                on_generation(gen + 1)
        history["stopped_by"] = "max_evals" if len(history["evaluations"]) >= budget else \
            ", ".join(f"{k}" for k in es.stop())
        history["seconds_this_run"] = round(time.perf_counter() - started, 2)
        _save(out, cfg, history, es, same)
    finally:
        pool.close()
    return history


def _save(out: Path, cfg: SearchConfig, history: dict, es, same: dict) -> None:
    """State first (what a resume needs), then the readable files."""
    state = {"algorithm": "evolve", "config": same, "es": es, "np_random": np.random.get_state(), "history": history}
    write_atomic(out / STATE, pickle.dumps(state))
    write_json(out / "history.json", history)
    best = history["best"]
    if best is not None:
        write_recipe(out / "best_recipe.yaml", best["recipe"],
                     f"mergelab evolve ({history['algorithm']}): best of {len(history['evaluations'])} evaluations "
                     f"(evaluation {best['eval']}, "
                     f"generation {best['generation'] + 1})\nfitness {best['fitness']:.6g} on the "
                     f"{cfg.fitness.split} split ({cfg.fitness.metric}); merged tensors' sha256 {best['digest']}")
    name = "random search" if history["algorithm"] == "random" else "CMA-ES"
    plot_history(out / "history.png", history["evaluations"], f"{name}, popsize {history['popsize']}")
