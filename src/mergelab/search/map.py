"""``mergelab map``: MAP, a Pareto front of task trade-offs from quadratic surrogates
(Li et al. 2024, "MAP: Low-compute Model Merging with Amortized Pareto Fronts via Quadratic
Approximation", arXiv 2406.07529; github luli-git/MAP).

The config is a search config (:mod:`mergelab.search.candidate`) whose genome gives one gene per model:
the scaling ``c_t`` of model ``t``'s task vector (``parameters: [weight]``, no layer groups or filters;
``task_arithmetic`` merges ``theta_0 + sum_t c_t tau_t``), and whose fitness tasks are the objectives.

1. **Sample** ``(T+1)(T+2)`` points of a regular grid in ``[0, 1]^T`` (11 values per axis, 5 when
   T > 4) without its one-hot, all-equal and sum-to-one points, drawn from ``search.seed``, plus the T
   one-hot points (plain MAP: no isotropic or perturbed extras).
2. **Evaluate** every task's score at every point (merged in memory; in parallel on Ray as for
   ``evolve``).
3. **Fit** one surrogate per task, ``act(sum_i a_i c_i^2 + sum_{i<j} b_ij c_i c_j + sum_i d_i c_i + e)``,
   ``(T+1)(T+2)/2`` coefficients, by nonlinear least squares from all-ones (SciPy): ``act`` is the
   sigmoid for accuracy; for ``metric: loss`` (scores are minus a loss) the score is ``-softplus(q)``.
4. **Front**: NSGA-II (pymoo; population 100, 25 generations as MAP's call, seeded) maximises every
   surrogate over the box ``[0, 1]^T`` (MAP's code searches ``[-3, 3]``, beyond its samples; here the
   surrogates are only trusted where they were fitted; ``search.bounds`` changes it).
5. **Choose** for each preference vector ``pi`` (L2-normalised; default each task alone and all equal) the
   front point maximising ``pi . M_hat``; its recipe is written, it is **evaluated for real** and the
   surrogate's error per task is reported.

``OUT``: ``samples.json``, ``front.json`` (front points, predicted scores, the surrogates' coefficients
and fit errors, chosen points with predicted and real scores), ``front.png`` (two or three tasks) and
``recipe-<k>.yaml`` per chosen point.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence

import numpy as np

from mergelab.errors import MergeLabError
from mergelab.search.candidate import read_config
from mergelab.search.evolve import prepare_out, write_json, write_recipe

MAP_SEARCH_KEYS = {"seed", "bounds", "preferences", "pop_size", "generations", "points"}


def features(c: np.ndarray) -> np.ndarray:
    """Quadratic features of points ``c`` [N, T]: ``c_i^2`` (i), ``c_i c_j`` (i<j), ``c_i`` (i), 1."""
    c = np.atleast_2d(np.asarray(c, dtype=float))
    T = c.shape[1]
    cols = [c[:, i] ** 2 for i in range(T)]
    cols += [c[:, i] * c[:, j] for i, j in itertools.combinations(range(T), 2)]
    cols += [c[:, i] for i in range(T)] + [np.ones(len(c))]
    return np.stack(cols, axis=1)


def _act(kind: str, q: np.ndarray) -> np.ndarray:
    if kind == "sigmoid":
        return 1.0 / (1.0 + np.exp(-q))
    return -np.logaddexp(0.0, q)  # minus softplus: a score that is minus a loss


def predict(coef: np.ndarray, kind: str, c: np.ndarray) -> np.ndarray:
    return _act(kind, features(c) @ coef)


def fit_surrogate(c: np.ndarray, y: np.ndarray, kind: str) -> np.ndarray:
    """Least-squares coefficients of the surrogate ``act(features(c) @ coef)`` to scores ``y``, from all ones."""
    from scipy.optimize import least_squares

    X = features(c)
    y = np.asarray(y, dtype=float)
    res = least_squares(lambda p: _act(kind, X @ p) - y, np.ones(X.shape[1]), method="lm" if len(y) >= X.shape[1]
                        else "trf", max_nfev=20000)
    return res.x


def sample_points(T: int, seed: int, n: Optional[int] = None) -> np.ndarray:
    """MAP's design: ``n`` (default ``(T+1)(T+2)``) grid points without one-hot, all-equal and
    sum-to-one points, drawn without replacement, then the T one-hot points."""
    levels = np.linspace(0.0, 1.0, 11 if T <= 4 else 5)
    grid = np.array(list(itertools.product(levels, repeat=T)))
    onehot = np.isclose(grid.sum(1), 1.0) & (np.isclose(grid, 1.0).sum(1) == 1)
    iso = np.all(np.isclose(grid, grid[:, :1]), axis=1)
    sum1 = np.isclose(grid.sum(1), 1.0)
    pool = grid[~(onehot | iso | sum1)]
    n = (T + 1) * (T + 2) if n is None else n
    if n > len(pool):
        raise MergeLabError(f"MAP: {n} sample points asked, the grid has {len(pool)}")
    pick = np.random.default_rng(seed).choice(len(pool), size=n, replace=False)
    return np.concatenate([pool[np.sort(pick)], np.eye(T)])


def pareto_front(coefs: Sequence[np.ndarray], kind: str, T: int, bounds=(0.0, 1.0), pop_size: int = 100,
                 generations: int = 25, seed: int = 0) -> tuple:
    """NSGA-II (pymoo) over the surrogates: ``(points [K, T], predicted scores [K, tasks])``, the
    non-dominated set of the final population, sorted by the first task's score."""
    from pymoo.algorithms.moo.nsga2 import NSGA2
    from pymoo.core.problem import Problem
    from pymoo.optimize import minimize

    class Surrogates(Problem):
        def __init__(self):
            super().__init__(n_var=T, n_obj=len(coefs), xl=np.full(T, bounds[0]), xu=np.full(T, bounds[1]))

        def _evaluate(self, x, out, *args, **kwargs):
            out["F"] = np.stack([-predict(c, kind, x) for c in coefs], axis=1)

    res = minimize(Surrogates(), NSGA2(pop_size=pop_size), ("n_gen", generations), seed=seed, verbose=False)
    X = np.atleast_2d(res.X)
    F = -np.atleast_2d(res.F)
    order = np.argsort(-F[:, 0], kind="stable")
    return X[order], F[order]


def non_dominated(F: np.ndarray) -> np.ndarray:
    """Mask of rows of ``F`` (maximised) that no other row dominates."""
    keep = np.ones(len(F), dtype=bool)
    for i in range(len(F)):
        dominated = np.all(F >= F[i], axis=1) & np.any(F > F[i], axis=1)
        keep[i] = not dominated.any()
    return keep


def choose(F: np.ndarray, preference: Sequence[float]) -> int:
    """Index of the front point maximising ``pi . F`` with ``pi`` the L2-normalised preference."""
    p = np.asarray(preference, dtype=float)
    p = p / np.linalg.norm(p)
    return int(np.argmax(F @ p))


def plot_front(path: Path, names: List[str], samples: np.ndarray, front: np.ndarray, chosen: list) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(6.4, 4.8))
    if len(names) == 2:
        ax = fig.add_subplot()
        ax.scatter(samples[:, 0], samples[:, 1], s=12, alpha=0.6, label="sampled merges (real)")
        ax.plot(front[:, 0], front[:, 1], ".-", ms=3, label="surrogate Pareto front")
        ax.set_xlabel(names[0])
        ax.set_ylabel(names[1])
    else:
        ax = fig.add_subplot(projection="3d")
        ax.scatter(samples[:, 0], samples[:, 1], samples[:, 2], s=10, alpha=0.6, label="sampled merges (real)")
        ax.scatter(front[:, 0], front[:, 1], front[:, 2], s=4, label="surrogate Pareto front")
        ax.set_xlabel(names[0])
        ax.set_ylabel(names[1])
        ax.set_zlabel(names[2])
    for ch in chosen:
        ax.scatter(*ch["real"], marker="*", s=120, label=f"chosen {ch['preference']} (real)")
    ax.legend(fontsize=7)
    ax.set_title("MAP: task trade-offs")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_map(config: Any, out: Path, *, workers: Optional[int] = None, ray_address: Optional[str] = None,
            threads: int = 1, overwrite: bool = False, log: Callable[[str], None] = print) -> dict:
    """Run MAP for ``config`` into ``out`` (see the module doc); returns ``front.json``'s content."""
    from mergelab.search.pool import check_ray_address, make_pool

    data = config
    if not isinstance(config, dict):
        import yaml

        data = yaml.safe_load(Path(config).read_text(encoding="utf-8")) if Path(config).is_file() else None
    opts = dict((data or {}).get("search") or {}) if isinstance(data, dict) else {}
    unknown = sorted(set(opts) - MAP_SEARCH_KEYS)
    if unknown:
        raise MergeLabError(f"{config}: search: unknown key(s) for map {unknown}; expected some of "
                            f"{sorted(MAP_SEARCH_KEYS)}")
    if isinstance(data, dict):
        data = {**data, "search": {"seed": opts.get("seed", 0)}}
    cfg = read_config(data if data is not None else config)
    g = cfg.genome
    if g.model_params != ("weight",) or g.global_params or g.groups != 1 or g.filters:
        raise MergeLabError("map: the genome must have one gene per model, its task vector's scaling "
                            "(parameters: [weight], no layer_granularity, no filters)")
    if g.base_model is None:
        raise MergeLabError("map: the genome needs a base_model (the task vectors are taken against it)")
    names = [t.name for t in cfg.fitness.tasks]
    T = len(g.models)
    bounds = tuple(opts.get("bounds", (0.0, 1.0)))
    prefs = opts.get("preferences") or [[float(v) for v in r] for r in np.eye(len(names))] + [[1.0] * len(names)]
    for p in prefs:
        if len(p) != len(names) or not all(isinstance(v, (int, float)) and v >= 0 for v in p) or not any(p):
            raise MergeLabError(f"map: preference {p} needs {len(names)} non-negative numbers, not all zero "
                                f"(tasks: {', '.join(names)})")
    if ray_address:
        check_ray_address(ray_address)
    if ray_address or (workers or 1) > 1:
        from mergelab.search.pool import connect

        connect(ray_address, workers or 1)  # a cluster that cannot be joined fails before OUT is touched
    prepare_out(Path(out), False, overwrite)
    out = Path(out)
    kind = "sigmoid" if cfg.fitness.metric == "accuracy" else "neg_softplus"
    seed = int(opts.get("seed", 0))
    pts = sample_points(T, seed, opts.get("points"))
    pool = make_pool(cfg.data, workers, ray_address, threads)
    try:
        log(f"MAP: evaluating {len(pts)} sample points ({T} task vectors, {len(names)} tasks)")
        res = pool.map(pts)
        Y = np.array([[r["tasks"].get(n, float("nan")) for n in names] for r in res])
        ok = np.all(np.isfinite(Y), axis=1)
        if ok.sum() < features(pts[:1]).shape[1]:
            raise MergeLabError(f"map: only {int(ok.sum())} sample points could be merged and scored")
        write_json(out / "samples.json", {"tasks": names, "points": pts.tolist(), "scores": Y.tolist(),
                                          "errors": [r.get("error") for r in res]})
        coefs, fit = [], {}
        for k, n in enumerate(names):
            coef = fit_surrogate(pts[ok], Y[ok, k], kind)
            coefs.append(coef)
            err = predict(coef, kind, pts[ok]) - Y[ok, k]
            fit[n] = {"rmse": float(np.sqrt(np.mean(err ** 2))), "max_abs_error": float(np.abs(err).max()),
                      "coefficients": coef.tolist()}
        X, F = pareto_front(coefs, kind, T, bounds, int(opts.get("pop_size", 100)), int(opts.get("generations", 25)),
                            seed)
        keep = non_dominated(F)
        X, F = X[keep], F[keep]
        picks = [choose(F, p) for p in prefs]
        log(f"MAP: front of {len(X)} points; evaluating {len(picks)} chosen trade-offs")
        real = pool.map([X[i] for i in picks])
        chosen = []
        for k, (p, i, r) in enumerate(zip(prefs, picks, real)):
            recipe = g.decode(X[i])
            write_recipe(out / f"recipe-{k}.yaml", recipe, f"mergelab map: preference {p} over {names}\n"
                         f"predicted {dict(zip(names, np.round(F[i], 6).tolist()))}; real {r['tasks']}")
            pred = dict(zip(names, F[i].tolist()))
            chosen.append({"preference": p, "point": X[i].tolist(), "predicted": pred, "real_tasks": r["tasks"],
                           "real": [r["tasks"].get(n, float("nan")) for n in names],
                           "surrogate_error": {n: pred[n] - r["tasks"].get(n, float("nan")) for n in names},
                           "recipe": f"recipe-{k}.yaml", "digest": r.get("digest")})
        abs_err = [abs(v) for ch in chosen for v in ch["surrogate_error"].values()]
        result = {"method": "MAP (plain), NSGA-II", "tasks": names, "models": g.models, "activation": kind,
                  "sample_points": len(pts), "evaluations": len(pts) + len(picks), "bounds": list(bounds),
                  "fit": fit, "front": {"points": X.tolist(), "predicted": F.tolist()}, "chosen": chosen,
                  "surrogate_error_at_chosen": {"mean_abs": float(np.mean(abs_err)), "max_abs": float(np.max(abs_err))}}
        write_json(out / "front.json", result)
        if len(names) in (2, 3):
            plot_front(out / "front.png", names, Y[ok], F, chosen)
        log(f"MAP: surrogate error at the chosen points: mean |error| {result['surrogate_error_at_chosen']['mean_abs']:.4g}, "
            f"max {result['surrogate_error_at_chosen']['max_abs']:.4g}")
        return result
    finally:
        pool.close()
