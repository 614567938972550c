"""FW-Merging: Frank-Wolfe over the convex hull of a (possibly large, noisy) pool of checkpoints.

Chen et al., "FW-Merging: Scaling Model Merging with Frank-Wolfe Optimization", 2025 (arXiv:2503.12649).
Reference code: hmarkc/FW-Merging (``discriminative/merge.py::frank_wolfe_merge``) and FusionBench
(``fusion_bench/method/fw_merging/fw_hard.py``, ``config/method/fw_merging/fw_hard.yaml``); this module
implements **FW-Hard**.

    minimise f(theta) subject to theta in conv{theta_1, ..., theta_N}

with ``f`` a task loss on a small proxy set (``loss="cross_entropy"`` on labelled train examples, the
reference default; ``"entropy"`` for unlabelled data). Each iteration ``t``:

1. ``g = grad f(theta_t)`` (the loss summed over tasks, each a mean over its proxy examples);
2. linear minimisation oracle over the pool, streamed **one candidate at a time**:
   ``lmo="cosine_raw"`` (the reference's implementation): ``score_n = sum_p cos(g_p, theta_{n,p})``
   against the candidate's raw parameters; ``lmo="inner_product"`` (textbook FW):
   ``score_n = <g, theta_n>``. ``s_t = argmin_n score_n``; with ``granularity="layer"`` the argmin is
   taken per tensor;
3. ``theta_{t+1} = theta_t + sigma gamma_t (s_t - theta_t)``, ``gamma_t = step_size * 2 / (t + 2)``,
   ``sigma = scaling_factor`` (FusionBench's task-arithmetic update with base ``theta_t``). The
   official LLM/RoBERTa code TIES-trims the direction instead; that variant is not implemented.

While ``sigma gamma_t <= 1`` every iterate is a convex combination of the pool and the initial point.
Initialisations: ``task_arithmetic`` (FusionBench default, ``base + 0.3 sum_n (theta_n - base)``),
``base``, or ``average`` (the uniform average of the pool, itself in the hull); as in the reference
the initial point is added to the pool as the candidate "initial". The coefficients of the iterate
over {initial, pool} are tracked exactly (task granularity) and reported.

Memory is constant in the pool size: ``theta_t``, ``g`` and (layer granularity) the best tensor per
name so far, plus one candidate being read.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import torch

from mergelab.errors import MergeLabError
from mergelab.tune.functional import ModelPool, entropy, leaf_params, merge_keys
from mergelab.tune.result import TuneResult


@dataclass
class FWConfig:
    """FW-Hard settings; defaults are FusionBench's ``fw_hard.yaml`` (see the module docstring)."""

    iterations: int = 10
    step_size: float = 0.1
    scaling_factor: float = 0.3
    init: str = "task_arithmetic"  # or "base", "average"
    init_scaling: float = 0.3
    lmo: str = "cosine_raw"  # or "inner_product"
    granularity: str = "task"  # or "layer"
    loss: str = "cross_entropy"  # or "entropy"
    exclude: str = ""
    add_initial: bool = True


def proxy_gradient(task_model, theta: Mapping[str, torch.Tensor], data: Sequence[Sequence], kind: str,
                   with_grad: bool = True):
    """``(f(theta), grad f(theta))`` with ``f = sum_t mean over task t's proxy examples of the loss``.

    Batches are processed one at a time: the gradient is accumulated, activations are not kept.
    """
    if not with_grad:
        with torch.no_grad():
            return _value(task_model, theta, data, kind), None
    leaves = leaf_params(theta)
    names = list(leaves)
    grads = {k: torch.zeros_like(v) for k, v in leaves.items()}
    value = 0.0
    for t, batches in enumerate(data):
        n = sum(_size(b) for b in batches)
        if n == 0:
            continue
        for b in batches:
            loss = _batch_loss(task_model, leaves, b, t, n, kind)
            gs = torch.autograd.grad(loss, [leaves[k] for k in names], allow_unused=True)
            for k, g in zip(names, gs):
                if g is not None:
                    grads[k].add_(g)
            value += float(loss.detach())
    return value, grads


def _batch_loss(task_model, theta, b, t: int, n: int, kind: str) -> torch.Tensor:
    z = task_model.rows(theta, b, t)
    if kind == "cross_entropy":
        labels = b.labels if not isinstance(b, Mapping) else b.get("labels")
        if labels is None:
            raise MergeLabError("FW-Merging with loss cross_entropy needs labelled proxy batches")
        return torch.nn.functional.cross_entropy(z.float(), labels, reduction="sum") / n
    if kind == "entropy":
        return entropy(z) * (_size(b) / n)
    raise MergeLabError(f"FW-Merging loss must be cross_entropy or entropy, got '{kind}'")


def _value(task_model, theta, data, kind) -> float:
    value = 0.0
    for t, batches in enumerate(data):
        n = sum(_size(b) for b in batches)
        for b in batches:
            value += float(_batch_loss(task_model, theta, b, t, n, kind))
    return value


def _size(b) -> int:
    if isinstance(b, Mapping):
        return int(b["input_ids"].shape[0]) if "input_ids" in b else int(next(iter(b.values())).shape[0])
    return len(b)


def _score(g: torch.Tensor, t: torch.Tensor, lmo: str) -> float:
    if lmo == "inner_product":
        return float((g.double() * t.double()).sum())
    gn, tn = float(g.double().norm()), float(t.double().norm())
    if gn == 0.0 or tn == 0.0:
        return 0.0
    return float((g.double() * t.double()).sum()) / (gn * tn)


@torch.no_grad()
def _initial(base, pool: ModelPool, keys, config: FWConfig) -> Dict[str, torch.Tensor]:
    if config.init == "base":
        return {k: base[k].detach().float().clone() for k in keys}
    out = {k: torch.zeros_like(base[k], dtype=torch.float32) for k in keys}
    for i in range(len(pool)):
        theta = pool.load(i, keys)
        for k in keys:
            out[k].add_(theta[k])
        del theta
    if config.init == "average":
        return {k: v / len(pool) for k, v in out.items()}
    if config.init == "task_arithmetic":
        n = len(pool)
        return {k: base[k].float() + config.init_scaling * (out[k] - n * base[k].float()) for k in keys}
    raise MergeLabError(f"FW-Merging init must be task_arithmetic, base or average, got '{config.init}'")


def fw_merging(task_model, base: Mapping[str, torch.Tensor], pool: ModelPool, data: Sequence[Sequence],
               config: FWConfig = FWConfig(), progress: Optional[Callable[[int, float], None]] = None,
               objective: Optional[Callable[[Mapping[str, torch.Tensor]], torch.Tensor]] = None) -> TuneResult:
    """FW-Hard over ``pool`` starting from ``config.init``; ``data[t]`` are task ``t``'s proxy batches.

    ``objective(theta) -> scalar`` replaces the proxy loss (then ``task_model`` and ``data`` are unused).
    """
    if config.lmo not in ("cosine_raw", "inner_product"):
        raise MergeLabError(f"FW-Merging lmo must be cosine_raw or inner_product, got '{config.lmo}'")
    if config.granularity not in ("task", "layer"):
        raise MergeLabError(f"FW-Merging granularity must be task or layer, got '{config.granularity}'")
    if config.iterations < 0 or config.step_size < 0 or config.scaling_factor < 0:
        raise MergeLabError("FW-Merging iterations, step_size and scaling_factor must be >= 0")
    start = time.perf_counter()
    keys = merge_keys(base, pool, config.exclude)
    theta = _initial(base, pool, keys, config)
    initial = {k: v.clone() for k, v in theta.items()} if config.add_initial else None
    names = (["initial"] if initial is not None else []) + list(pool.names)
    # exact convex weights of theta over `names` (task granularity); the initial point is names[0]
    if initial is not None:
        weights = [1.0] + [0.0] * len(pool)
    else:
        weights = [1.0 / len(pool)] * len(pool) if config.init == "average" else None
    history: List[dict] = []

    def candidate(j: int) -> Dict[str, torch.Tensor]:
        if initial is not None:
            return initial if j == 0 else pool.load(j - 1, keys)
        return pool.load(j, keys)

    def value_and_grad(th, with_grad=True):
        if objective is None:
            return proxy_gradient(task_model, th, data, config.loss, with_grad)
        leaves = leaf_params(th)
        val = objective(leaves)
        if not with_grad:
            return float(val.detach()), None
        gs = torch.autograd.grad(val, list(leaves.values()), allow_unused=True)
        return float(val.detach()), {k: (g if g is not None else torch.zeros_like(leaves[k])) for k, g in zip(leaves, gs)}

    for t in range(config.iterations):
        value, g = value_and_grad(theta)
        step = config.scaling_factor * config.step_size * 2.0 / (t + 2)
        if config.granularity == "task":
            scores = []
            for j in range(len(names)):
                cand = candidate(j)
                if config.lmo == "inner_product":
                    scores.append(sum(_score(g[k], cand[k], "inner_product") for k in keys))
                else:
                    scores.append(sum(_score(g[k], cand[k], "cosine_raw") for k in keys))
                del cand
            best = min(range(len(names)), key=lambda j: scores[j])
            s = candidate(best)
            with torch.no_grad():
                for k in keys:
                    theta[k].add_(s[k] - theta[k], alpha=step)
            del s
            if weights is not None:
                weights = [w * (1 - step) for w in weights]
                weights[best] += step
            history.append({"iteration": t, "loss": value, "selected": names[best], "step": step,
                            "scores": {n: round(sc, 6) for n, sc in zip(names, scores)}})
        else:
            best_score = {k: float("inf") for k in keys}
            best_tensor: Dict[str, torch.Tensor] = {}
            chosen: Dict[str, str] = {}
            for j in range(len(names)):
                cand = candidate(j)
                for k in keys:
                    sc = _score(g[k], cand[k], config.lmo)
                    if sc < best_score[k]:
                        best_score[k], best_tensor[k], chosen[k] = sc, cand[k].clone(), names[j]
                del cand
            with torch.no_grad():
                for k in keys:
                    theta[k].add_(best_tensor[k] - theta[k], alpha=step)
            del best_tensor
            weights = None
            counts: Dict[str, int] = {}
            for v in chosen.values():
                counts[v] = counts.get(v, 0) + 1
            history.append({"iteration": t, "loss": value, "selected": counts, "step": step})
        if progress:
            progress(t, value)
    final, _ = value_and_grad(theta, with_grad=False)
    info = {"method": f"fw_hard_{config.granularity}", "pool": list(pool.names), "final_loss": final,
            "pool_reads": pool.reads, "config": dict(config.__dict__)}
    coeffs = {n: w for n, w in zip(names, weights)} if weights is not None else {}
    return TuneResult(theta, coeffs, history, time.perf_counter() - start, info)
