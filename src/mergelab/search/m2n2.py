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

Evaluations run in this process (one child per step). ``OUT``: ``history.json`` (per step: parents, split,
w, the child's score, the replaced member), ``history.png`` and ``best/``, the archive member with the best
mean score, saved as a Hugging Face folder of ``fitness.model``'s architecture (for ``suite: textmix``
the merged encoder, without heads). ``search.save_best_at: [N, ...]`` also saves the best member after
N evaluations (seeds included) as ``best-at-N/``, to compare budgets from one run.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, List

import numpy as np
import torch

from mergelab.errors import MergeLabError
from mergelab.search.candidate import read_config
from mergelab.search.evolve import plot_history, prepare_out, write_json

M2N2_KEYS = {"steps", "alpha", "seed", "matchmaker", "split_point", "archive_size", "save_best_at"}


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
    """SLERP of flat vectors ``x``, ``y`` with per-coordinate weight ``w`` before ``split``, ``1 - w`` after."""
    v = torch.full_like(x, 1.0 - w)
    v[:split] = w
    xn, yn = x / x.norm(), y / y.norm()
    omega = torch.arccos(torch.clamp((xn * yn).sum(), -1.0, 1.0))
    so = torch.sin(omega)
    if float(so) <= 1e-6:
        return (1 - v) * x + v * y
    return torch.sin((1 - v) * omega) / so * x + torch.sin(v * omega) / so * y


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


def run_m2n2(config: Any, out: Path, *, overwrite: bool = False, log: Callable[[str], None] = print) -> dict:
    """Run M2N2 for ``config`` into ``out`` (see the module doc); returns the history."""
    import yaml

    from mergelab.llmmix.run import _state
    from mergelab.search.fitness import make_scorer

    data = yaml.safe_load(Path(config).read_text(encoding="utf-8")) if not isinstance(config, dict) else config
    opts = dict((data or {}).get("search") or {}) if isinstance(data, dict) else {}
    unknown = sorted(set(opts) - M2N2_KEYS)
    if unknown:
        raise MergeLabError(f"m2n2: search: unknown key(s) {unknown}; expected some of {sorted(M2N2_KEYS)}")
    steps, alpha = int(opts.get("steps", 50)), float(opts.get("alpha", 1.0))
    if steps < 1 or alpha < 0:
        raise MergeLabError("m2n2: search.steps must be >= 1 and search.alpha >= 0")
    save_at = opts.get("save_best_at") or []
    if not isinstance(save_at, list) or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1
                                                for n in save_at):
        raise MergeLabError("m2n2: search.save_best_at: expected a list of evaluation counts")
    seed = int(opts.get("seed", 0))
    cfg = read_config({**data, "search": {"seed": seed}})
    prepare_out(Path(out), False, overwrite)
    out = Path(out)
    rng = np.random.default_rng(seed)
    scorer = make_scorer(cfg.fitness)
    states = [{k: v for k, v in _state(Path(m)).items() if scorer.keep(k)} for m in cfg.genome.models]
    flat = Flat(states[0])
    archive: List[torch.Tensor] = [flat.flatten(s) for s in states]
    size = int(opts.get("archive_size", len(archive)))

    def snapshot() -> None:
        if len(evals) in save_at:
            means = [float(np.mean(r)) for r in rows]
            k = int(np.argmax(means))
            scorer.save(flat.unflatten(archive[k]), out / f"best-at-{len(evals)}")
            history.setdefault("best_at", {})[str(len(evals))] = {"member": k, "mean_score": means[k]}

    rows, evals, t_start = [], [], time.perf_counter()
    for vec in archive:
        s = scorer.example_scores(flat.unflatten(vec))
        rows.append(s)
        evals.append({"eval": len(evals) + 1, "kind": "seed", "fitness": float(np.mean(s))})
    history = {"algorithm": "m2n2", "alpha": alpha, "seed": seed, "archive_size": size, "steps": [],
               "evaluations": evals, "fitness": cfg.fitness.describe()}
    snapshot()
    for step in range(steps):
        S = np.array(rows)
        f, Sh = shared_fitness(S, alpha)
        p1 = _pick(rng, f)
        a = attraction(Sh, p1) if opts.get("matchmaker", True) else f.copy()
        a[p1] = 0.0
        if a.sum() <= 0:
            a = np.ones(len(a))
            a[p1] = 0.0
        p2 = _pick(rng, a)
        D = archive[0].numel()
        split = int(rng.integers(0, D)) if opts.get("split_point", True) else D
        w = float(rng.uniform(0.0, 1.0))
        child = crossover(archive[p1], archive[p2], split, w)
        t0 = time.perf_counter()
        s = scorer.example_scores(flat.unflatten(child))
        evals.append({"eval": len(evals) + 1, "kind": "child", "fitness": float(np.mean(s)),
                      "seconds": round(time.perf_counter() - t0, 3)})
        f_all, _ = shared_fitness(np.vstack([S, s[None]]), alpha)
        worst = int(np.argmin(f_all[:-1]))
        if len(archive) < size:
            archive.append(child)
            rows.append(s)
            replaced = None
        elif f_all[-1] > f_all[worst]:
            archive[worst], rows[worst] = child, s
            replaced = worst
        else:
            replaced = "child is the weakest"
        history["steps"].append({"step": step + 1, "parents": [p1, p2], "split": split, "w": w,
                                 "child_mean_score": float(np.mean(s)), "replaced": replaced})
        snapshot()
        log(f"m2n2 step {step + 1}/{steps}: parents {p1},{p2} split {split}/{D} w {w:.3f}: child {np.mean(s):.4f}, "
            f"replaced {replaced}")
    means = [float(np.mean(r)) for r in rows]
    best = int(np.argmax(means))
    history["archive_mean_scores"] = means
    history["best"] = {"member": best, "mean_score": means[best]}
    history["seconds"] = round(time.perf_counter() - t_start, 2)
    scorer.save(flat.unflatten(archive[best]), out / "best")
    write_json(out / "history.json", history)
    plot_history(out / "history.png", evals, f"M2N2, alpha {alpha:g}")
    return history
