"""``mergelab m2n2``: M2N2, model merging by competition and attraction (Abrantes, Lange and Tang 2025,
"Competition and Attraction Improve Model Fusion", arXiv 2508.16204; github SakanaAI/natural_niches).

An archive of models (flattened float parameters, in name order) starts from the genome's ``models``
(the suite's experts). Each step:

1. **Competition** (fitness sharing): with ``S[i, j]`` model i's score on example j (1/0 for
   ``metric: accuracy``; ``exp(-answer loss)`` in (0, 1] for ``metric: loss``), ``z_j = (sum_i S_ij)^alpha``
   (0 read as 1), ``S^_ij = S_ij / z_j`` and ``f_i = sum_j S^_ij``. ``alpha = 1`` (default) shares each
   example among the models that solve it; ``alpha = 0`` is a plain genetic algorithm on summed scores.
2. **Parents**: the first with probability proportional to ``f``; the second (**attraction**) with
   probability proportional to ``a_k = sum_j max(0, S^_kj - S^_{p1, j})``, a partner strong where the
   first is weak (proportional to ``f`` when ``matchmaker: false`` or every ``a_k`` is 0).
3. **Crossover**: split ``s ~ U{0..D-1}`` and ``w ~ U(0, 1)``; ``v_d = w`` for ``d < s`` else ``1 - w``;
   ``child = sin((1-v) W)/sin W * x + sin(v W)/sin W * y`` elementwise, ``W`` the angle between the two
   whole vectors (linear interpolation when ``sin W <= 1e-6``). No mutation (pre-trained models).
4. **Replacement**: fitness is recomputed over the archive and the child; the weakest archive member is
   replaced unless the child is the weakest.

**Rounds** (``search.batch_size: B``, default 1): M2N2 is steady state; to evaluate in parallel, each round
draws B children (steps 2-3, B times in a row from one random generator) from the archive as it stands at
the round's start, evaluates them together on the pool (:mod:`mergelab.search.pool`: in this process, or
on Ray actors with ``workers`` / ``ray_address``), then inserts them one by one in draw order (step 4, each
against the archive as the previous insertions left it). ``B = 1`` is the paper's one child per step.
``search.steps`` counts children (the last round is cut to fit), so a run makes ``len(models) + steps``
evaluations whatever B is. Results do not depend on the number of workers: the children are made here
(the crossover's angle is a float64 NumPy sum, its coefficients Python floats, so no torch reduction
whose rounding follows the thread count), scored in order with ``threads`` torch threads per evaluator,
and inserted here in order. B does change the search (children of one round see the same archive).

``OUT``: ``history.json`` (per step: round, parents, split, w, the child's score, the replaced member),
``history.png`` and ``best/``, the archive member with the best mean score, saved as a Hugging Face folder
of ``fitness.model``'s architecture (for ``suite: textmix`` the merged encoder, without heads).
``search.save_best_at: [N, ...]`` also saves the best member after N evaluations (seeds included) as
``best-at-N/``, to compare budgets from one run. "Best" is by ``search.best_by``: ``pooled`` (default, the
paper's view of the examples as one pool of resources: the mean of all per-example scores, so a task
weighs by its number of examples) or ``task_mean`` (the weighted mean over tasks of each task's mean,
:meth:`~mergelab.search.fitness.FitnessSpec.task_mean`: the fitness ``evolve`` ranks by, for comparisons
with it). It changes only which member is reported, never the search; every evaluation records both.
``state.pkl`` (after every round): the random generator, the per-example scores, the history and each
member's sha256; the archive itself is not stored (a member of a MiniLM archive is 90 MB) but rebuilt on
``resume`` by replaying the recorded crossovers from the seeds, checked against those digests. A resumed run ends exactly as an
uninterrupted one; a larger ``steps`` continues a finished run.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import pickle
import time
from pathlib import Path
from typing import Any, Callable, List, Optional

import numpy as np
import torch

from mergelab.errors import MergeLabError
from mergelab.search.candidate import SearchConfigError, read_config
from mergelab.search.evolve import (STATE, SearchStateError, check_resume, plot_history, prepare_out, resumable,
                                    write_atomic, write_json)

M2N2_KEYS = {"steps", "alpha", "seed", "matchmaker", "split_point", "archive_size", "save_best_at", "batch_size",
             "best_by"}
BEST_BY = ("pooled", "task_mean")
MAY_CHANGE = ("steps", "save_best_at", "best_by")  # on resume: the budget and what is reported, not the search


def shared_fitness(S: np.ndarray, alpha: float) -> tuple:
    """``(f, S^)``: fitness sharing of the score matrix ``S`` [models, examples] (see the module doc)."""
    z = S.sum(axis=0) ** alpha
    z = np.where(z == 0, 1.0, z)
    Sh = S / z
    return Sh.sum(axis=1), Sh


def attraction(Sh: np.ndarray, p1: int) -> np.ndarray:
    """``a_k = sum_j max(0, S^_kj - S^_{p1, j})`` for every archive member k."""
    return np.maximum(0.0, Sh - Sh[p1]).sum(axis=1)


def _pick(rng: np.random.Generator, weights: np.ndarray) -> int:
    w = np.clip(np.asarray(weights, dtype=float), 0, None)
    if not np.isfinite(w).all() or w.sum() <= 0:
        w = np.ones_like(w)
    return int(rng.choice(len(w), p=w / w.sum()))


def crossover(x: torch.Tensor, y: torch.Tensor, split: int, w: float) -> torch.Tensor:
    """SLERP of flat vectors ``x``, ``y`` with per-coordinate weight ``w`` before ``split``, ``1 - w`` after.

    The angle is summed in float64 by NumPy and the two pairs of coefficients are Python floats, so the
    child's bits do not depend on torch's thread count (a torch sum's rounding does)."""
    xd, yd = x.detach().double().numpy(), y.detach().double().numpy()
    cos = float(np.sum(xd * yd)) / math.sqrt(float(np.sum(xd * xd)) * float(np.sum(yd * yd)))
    del xd, yd
    omega = math.acos(min(1.0, max(-1.0, cos)))
    so = math.sin(omega)

    def coefficients(v: float) -> tuple:
        if so <= 1e-6:
            return 1.0 - v, v
        return math.sin((1.0 - v) * omega) / so, math.sin(v * omega) / so

    child = torch.empty_like(x)
    for part, v in ((slice(0, split), w), (slice(split, None), 1.0 - w)):
        a, b = coefficients(v)
        child[part] = x[part] * a + y[part] * b
    return child


class Flat:
    """Float tensors of a state dict as one vector (name order), and back."""

    def __init__(self, state: dict):
        self.names = sorted(k for k, v in state.items() if v.is_floating_point())
        self.shapes = [tuple(state[k].shape) for k in self.names]
        self.sizes = [state[k].numel() for k in self.names]
        self.rest = {k: v for k, v in state.items() if not v.is_floating_point()}

    def flatten(self, state: dict) -> torch.Tensor:
        return torch.cat([state[k].detach().float().reshape(-1) for k in self.names])

    def unflatten(self, vec: torch.Tensor) -> dict:
        out = dict(self.rest)
        for k, shape, part in zip(self.names, self.shapes, torch.split(vec, self.sizes)):
            out[k] = part.reshape(shape).clone()
        return out


class MemberEvaluator:
    """Per-example scores of archive members (flat vectors in :class:`Flat`'s layout): one per pool worker
    (:func:`mergelab.search.pool.make_pool`), its evaluation model loaded once. ``data``:
    ``{"config": a search config's data, "layout": Flat}``."""

    def __init__(self, data: dict, threads: int = 1):
        from mergelab.search.fitness import make_scorer

        if threads:
            torch.set_num_threads(threads)
        self.layout = data["layout"]
        self.scorer = make_scorer(read_config(data["config"]).fitness)

    @staticmethod
    def pack(x) -> np.ndarray:
        """What a Ray actor is sent for member ``x``: its float32 values as a NumPy array (Ray's object
        store carries it without pickling the values)."""
        return x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float32)

    def evaluate(self, x) -> dict:
        """``{"scores": per-example scores, "seconds": load and scoring time}``."""
        t0 = time.perf_counter()
        vec = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.array(x, dtype=np.float32))  # a copy
        scores = self.scorer.example_scores(self.layout.unflatten(vec))
        return {"scores": np.asarray(scores, dtype=float), "seconds": round(time.perf_counter() - t0, 3)}


def member_digest(vec: torch.Tensor) -> str:
    """sha256 of a member's float32 values (what ``resume`` checks the replayed archive against)."""
    return hashlib.sha256(vec.contiguous().numpy().tobytes()).hexdigest()


def read_options(opts: Any, steps: Optional[int] = None) -> dict:
    """``search:`` of an M2N2 config, checked, with defaults (``steps`` overrides ``search.steps``)."""
    if not isinstance(opts, dict):
        raise SearchConfigError("m2n2: search: expected a mapping")
    unknown = sorted(set(opts) - M2N2_KEYS)
    if unknown:
        raise SearchConfigError(f"m2n2: search: unknown key(s) {unknown}; expected some of {sorted(M2N2_KEYS)}")

    def integer(key, default, least):
        v = opts.get(key, default)
        if v is None and default is None:
            return None
        if not isinstance(v, int) or isinstance(v, bool) or v < least:
            raise SearchConfigError(f"m2n2: search.{key}: expected an integer >= {least}, got {v!r}")
        return v

    out = {"steps": integer("steps", 50, 1), "batch_size": integer("batch_size", 1, 1),
           "seed": integer("seed", 0, 0), "archive_size": integer("archive_size", None, 2)}
    if steps is not None:
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise SearchConfigError(f"m2n2: --steps: expected an integer >= 1, got {steps!r}")
        out["steps"] = steps
    alpha = opts.get("alpha", 1.0)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not alpha >= 0:
        raise SearchConfigError(f"m2n2: search.alpha: expected a number >= 0, got {alpha!r}")
    out["alpha"] = float(alpha)
    for key in ("matchmaker", "split_point"):
        if not isinstance(opts.get(key, True), bool):
            raise SearchConfigError(f"m2n2: search.{key}: expected true or false")
        out[key] = opts.get(key, True)
    save_at = opts.get("save_best_at") or []
    if not isinstance(save_at, list) or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1
                                                for n in save_at):
        raise SearchConfigError("m2n2: search.save_best_at: expected a list of evaluation counts")
    out["save_best_at"] = save_at
    best_by = opts.get("best_by", "pooled")
    if best_by not in BEST_BY:
        raise SearchConfigError(f"m2n2: search.best_by: expected one of {list(BEST_BY)}, got {best_by!r}")
    out["best_by"] = best_by
    return out


def propose(rng: np.random.Generator, f: np.ndarray, Sh: np.ndarray, D: int, opts: dict) -> tuple:
    """One child's ``(p1, p2, split, w)``: the parents (competition, attraction) and the crossover's draws."""
    p1 = _pick(rng, f)
    a = attraction(Sh, p1) if opts["matchmaker"] else f.copy()
    a[p1] = 0.0
    if a.sum() <= 0:
        a = np.ones(len(a))
        a[p1] = 0.0
    p2 = _pick(rng, a)
    split = int(rng.integers(0, D)) if opts["split_point"] else D
    w = float(rng.uniform(0.0, 1.0))
    return p1, p2, split, w


def replay(seeds: List[torch.Tensor], steps: list) -> List[torch.Tensor]:
    """The archive after the recorded ``steps``: each round's children made from the archive at the round's
    start, then inserted in order, as :func:`run_m2n2` did."""
    archive = list(seeds)
    for _, group in itertools.groupby(steps, key=lambda s: s["round"]):
        group = list(group)
        children = [crossover(archive[s["parents"][0]], archive[s["parents"][1]], s["split"], s["w"])
                    for s in group]
        for s, child in zip(group, children):
            if s["replaced"] is None:
                archive.append(child)
            elif isinstance(s["replaced"], int):
                archive[s["replaced"]] = child
    return archive


def _fingerprint(cfg, opts: dict) -> str:
    """What a run's state held before it stored its config (:func:`~mergelab.search.evolve.check_resume`)."""
    search = {k: v for k, v in opts.items() if k not in MAY_CHANGE}
    blob = {"genome": cfg.data["genome"], "fitness": cfg.fitness.describe(), "search": search}
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()


def _read(config: Any) -> tuple:
    """``(config data or None, its search: mapping)``; read_config reports a missing or broken file."""
    import yaml

    if isinstance(config, dict):
        return config, dict(config.get("search") or {})
    try:
        data = yaml.safe_load(Path(config).read_text(encoding="utf-8")) if Path(config).is_file() else None
    except yaml.YAMLError:
        data = None
    if not isinstance(data, dict):
        read_config(config)  # raises the config's own error
    opts = data.get("search") or {}
    return data, opts


def run_m2n2(config: Any, out: Path, *, workers: Optional[int] = None, ray_address: Optional[str] = None,
             threads: int = 1, resume: bool = False, overwrite: bool = False, steps: Optional[int] = None,
             use_ray: Optional[bool] = None, log: Callable[[str], None] = print,
             on_round: Optional[Callable[[int], None]] = None) -> dict:
    """Run (or ``resume``) M2N2 for ``config`` into ``out`` (see the module doc); returns the history.

    Members are scored on the pool of :func:`mergelab.search.pool.make_pool` (Ray when ``ray_address`` is
    given, ``workers > 1`` or ``use_ray``); ``steps`` overrides ``search.steps``; ``on_round(r)`` is called
    after round ``r``'s state is written (tests stop a run there)."""
    from mergelab.llmmix.run import _state
    from mergelab.search.fitness import make_scorer, scorer_class
    from mergelab.search.pool import LocalPool, check_ray_address, connect, make_pool

    data, raw = _read(config)
    opts = read_options(raw, steps)
    cfg = read_config({**data, "search": {"seed": opts["seed"]}})
    if isinstance(config, (str, Path)):
        cfg.path = Path(config)
    if ray_address:
        check_ray_address(ray_address)
    if workers is not None and workers < 1:
        raise MergeLabError(f"--workers must be at least 1, got {workers}")
    if threads < 1:
        raise MergeLabError(f"--threads must be at least 1, got {threads}")
    out = Path(out)
    # the budget, the snapshots and what ranks them may change on resume
    same = resumable(cfg, {k: v for k, v in opts.items() if k not in MAY_CHANGE})
    state = None
    if resume and (out / STATE).is_file():
        with open(out / STATE, "rb") as fh:
            state = pickle.load(fh)
        check_resume(out, state, "m2n2", same, _fingerprint(cfg, opts))
    if ray_address or use_ray or (workers or 1) > 1:
        connect(ray_address, workers or 1)  # a cluster that cannot be joined fails before OUT is touched
    prepare_out(out, resume, overwrite)

    keep = scorer_class(cfg.fitness).keep
    states = [{k: v for k, v in _state(Path(m)).items() if keep(k)} for m in cfg.genome.models]
    flat = Flat(states[0])
    seeds: List[torch.Tensor] = [flat.flatten(s) for s in states]
    del states
    size = opts["archive_size"] or len(seeds)
    alpha, save_at, total = opts["alpha"], opts["save_best_at"], opts["steps"]
    counts = cfg.fitness.example_counts()

    def ranked(rows: list) -> tuple:
        """``(best member, pooled means, task means)`` of the archive, best by ``search.best_by``."""
        pooled = [float(np.mean(r)) for r in rows]
        by_task = [cfg.fitness.task_mean(r, counts) for r in rows]
        return int(np.argmax(pooled if opts["best_by"] == "pooled" else by_task)), pooled, by_task
    pool = make_pool({"config": cfg.data, "layout": flat}, workers, ray_address, threads, use_ray, MemberEvaluator)
    saver = [pool.evaluator.scorer] if isinstance(pool, LocalPool) else []

    def save(vec: torch.Tensor, folder: Path) -> None:
        if not saver:
            saver.append(make_scorer(cfg.fitness))
        saver[0].save(flat.unflatten(vec), folder)

    def snapshot() -> None:
        n = len(history["evaluations"])
        if n in save_at:
            k, pooled, by_task = ranked(rows)
            save(archive[k], out / f"best-at-{n}")
            history.setdefault("best_at", {})[str(n)] = {"member": k, "mean_score": pooled[k],
                                                         "task_mean": by_task[k], "by": opts["best_by"]}

    def write_state() -> None:
        blob = {"algorithm": "m2n2", "config": same, "rng": rng.bit_generator.state,
                "rows": rows, "digests": digests, "history": history}
        write_atomic(out / STATE, pickle.dumps(blob))
        write_json(out / "history.json", history)
        plot_history(out / "history.png", history["evaluations"], f"M2N2, alpha {alpha:g}, batch {opts['batch_size']}")

    t_start = time.perf_counter()
    try:
        if state is not None:
            rng = np.random.default_rng(opts["seed"])
            rng.bit_generator.state = state["rng"]
            history, rows, digests = state["history"], list(state["rows"]), list(state["digests"])
            archive = replay(seeds, history["steps"])
            if [member_digest(v) for v in archive] != digests:
                raise SearchStateError(f"--resume: the archive rebuilt from the models and the crossovers recorded "
                                       f"in '{out}' differs from the one saved (were the models changed?)")
            log(f"resumed after round {history['rounds']} ({len(history['evaluations'])} evaluations)")
        else:
            rng = np.random.default_rng(opts["seed"])
            archive = list(seeds)
            rows = [r["scores"] for r in pool.map(archive)]
            digests = [member_digest(v) for v in archive]
            history = {"algorithm": "m2n2", "config": str(cfg.path) if cfg.path else None, "alpha": alpha,
                       "seed": opts["seed"], "archive_size": size, "batch_size": opts["batch_size"], "rounds": 0,
                       "steps": [], "fitness": cfg.fitness.describe(),
                       "evaluations": [{"eval": i + 1, "kind": "seed", "fitness": float(np.mean(s)),
                                        "task_mean": cfg.fitness.task_mean(s, counts)} for i, s in enumerate(rows)]}
            snapshot()
            write_state()
        history["workers"] = pool.size
        evals = history["evaluations"]
        D = archive[0].numel()
        while len(history["steps"]) < total:
            rnd = history["rounds"] + 1
            f, Sh = shared_fitness(np.array(rows), alpha)
            batch = min(opts["batch_size"], total - len(history["steps"]))
            picks = [propose(rng, f, Sh, D, opts) for _ in range(batch)]
            children = [crossover(archive[p1], archive[p2], split, w) for p1, p2, split, w in picks]
            t0 = time.perf_counter()
            results = pool.map(children)
            wall = time.perf_counter() - t0
            for (p1, p2, split, w), child, r in zip(picks, children, results):
                s = np.asarray(r["scores"], dtype=float)
                evals.append({"eval": len(evals) + 1, "kind": "child", "fitness": float(np.mean(s)),
                              "task_mean": cfg.fitness.task_mean(s, counts), "seconds": r["seconds"]})
                f_all, _ = shared_fitness(np.vstack([np.array(rows), s[None]]), alpha)
                worst = int(np.argmin(f_all[:-1]))
                if len(archive) < size:
                    archive.append(child)
                    rows.append(s)
                    digests.append(member_digest(child))
                    replaced = None
                elif f_all[-1] > f_all[worst]:
                    archive[worst], rows[worst], digests[worst] = child, s, member_digest(child)
                    replaced = worst
                else:
                    replaced = "child is the weakest"
                step = len(history["steps"]) + 1
                history["steps"].append({"step": step, "round": rnd, "parents": [p1, p2], "split": split, "w": w,
                                         "child_mean_score": float(np.mean(s)), "replaced": replaced})
                snapshot()
                log(f"m2n2 step {step}/{total}: parents {p1},{p2} split {split}/{D} w {w:.3f}: child "
                    f"{np.mean(s):.4f}, replaced {replaced}")
            history["rounds"] = rnd
            history.setdefault("round_seconds", []).append(round(wall, 3))
            write_state()
            if len(picks) > 1:
                log(f"m2n2 round {rnd}: {len(picks)} children in {wall:.1f} s ({wall / len(picks):.2f} s/evaluation)")
            if on_round is not None:
                on_round(rnd)
        best, means, by_task = ranked(rows)
        history["archive_mean_scores"] = means
        history["archive_task_means"] = by_task
        history["best"] = {"member": best, "mean_score": means[best], "task_mean": by_task[best],
                           "by": opts["best_by"]}
        history["seconds_this_run"] = round(time.perf_counter() - t_start, 2)
        history["seconds"] = round(history.get("seconds", 0.0) + history["seconds_this_run"], 2)
        save(archive[best], out / "best")
        write_state()
    finally:
        pool.close()
    return history
