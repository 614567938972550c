"""PLeaS's choice of per-layer widths under a compute budget.

PLeaS (Nasery et al., CVPR 2025, arXiv 2407.02447; SewoongLab/PLeaS-Merging, ``partial_matching.py``
``qp_ratios``/``partial_merge_flops``) gives each hidden-unit group ``l`` with ``n_l`` units per model a
ratio ``r_l`` in [0, 1] of units kept separate: width ``n_l (1 + r_l)``, ``r = 0`` fully merged, ``r = 1``
both models side by side. The ratios solve

    maximise   sum_l w_l r_l
    subject to FLOPs(r) / FLOPs(0) <= budget,   0 <= r_l <= 1,

where a layer reading group ``l1`` and writing group ``l2`` costs ``c n1 n2 ((1+r1)(1+r2) - 2 r1 r2)``
(the A-only <-> B-only blocks are zero, so they are not counted), a layer with one grouped axis
``c n (1 + r)``, and ``w_l`` is a per-group benefit. The paper solves it with Gurobi as a non-convex
QP over continuous ``r``; here ``r_l = k_l / n_l`` with an integer number ``k_l`` of separate units, as a
checkpoint needs, and the problem is solved **exactly on that lattice**: every combination of the other
groups' ``k`` is enumerated and the largest group's ``k`` is the largest that fits (the cost is affine in
each ratio once the others are fixed, and the objective grows with it). When that enumeration would
exceed :data:`EXACT_LIMIT` points a greedy rule is used instead (one unit at a time to the group with the
best benefit per added FLOP), and the result says so.

**Benefits ``w_l``.** The paper's code measures, per group, the accuracy of two extra merges: ``R1_l``
with only group ``l`` kept separate (all others merged) and ``R0_l`` with only ``l`` merged (all others
separate), and sets ``w_l = (R1_l - R_merged)(2 - budget) - (R0_l - R_ensemble)(budget - 1)``: the gain
of separating ``l`` from the fully merged model, and the loss of merging ``l`` in the ensemble,
interpolated by where the budget lies in [1, 2]; weights are floored at ``1e-5``. mergelab uses the same
formula with a label-free score, ``-MSE`` between the merged model's outputs and the ensemble's targets
(averaged or side-by-side logits) on the calibration inputs (``weights: layerwise``, :func:`layerwise_weights`).
``weights: uniform`` sets every ``w_l = 1``; a mapping gives them per group.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

from mergelab.errors import MergeLabError

EXACT_LIMIT = 2_000_000
MIN_WEIGHT = 1e-5

#: one layer's cost: (coefficient, input group or None, output group or None)
Term = Tuple[float, Optional[str], Optional[str]]


@dataclass
class WidthChoice:
    """The widths a budget gave, and how: ``ratios`` ``k_l / n_l``, the ``weights`` used, the FLOPs
    ratio reached and whether the lattice search was ``exact``."""

    widths: Dict[str, int]
    ratios: Dict[str, float]
    weights: Dict[str, float]
    budget: float
    flops_ratio: float
    exact: bool
    scores: Dict[str, float] = field(default_factory=dict)

    def record(self) -> dict:
        return {"budget": self.budget, "flops_ratio": self.flops_ratio, "exact": self.exact,
                "weights": dict(self.weights), "widths": dict(self.widths),
                **({"scores": dict(self.scores)} if self.scores else {})}


def is_budget(width) -> bool:
    """Whether a ``width`` parameter asks for a budget (``{budget: B, weights: ...}``)."""
    return isinstance(width, Mapping) and "budget" in width


def parse_budget(width: Mapping, groups: Sequence[str]) -> Tuple[float, object]:
    """``(budget, weights)`` of a ``{budget: B, weights: layerwise | uniform | {group: w}}`` parameter."""
    extra = set(width) - {"budget", "weights"}
    if extra:
        raise MergeLabError(f"width: a budget chooses every group's width; it cannot be combined with "
                            f"{', '.join(sorted(map(str, extra)))} (give either widths or budget and weights)")
    b = width["budget"]
    if isinstance(b, bool) or not isinstance(b, (int, float)) or not 1.0 <= float(b) <= 2.0:
        raise MergeLabError(f"width budget must be a FLOPs ratio in [1.0, 2.0] (1: one model's compute, 2: the "
                            f"ensemble's), got {b!r}")
    w = width.get("weights", "layerwise")
    if isinstance(w, Mapping):
        missing = [g for g in groups if g not in w]
        unknown = [str(g) for g in w if g not in groups]
        if missing or unknown:
            raise MergeLabError(f"width weights must give a number for each group ({', '.join(groups)}); "
                                f"missing {missing}, unknown {unknown}")
        for g in groups:
            if isinstance(w[g], bool) or not isinstance(w[g], (int, float)):
                raise MergeLabError(f"width weights: group '{g}' needs a number, got {w[g]!r}")
    elif w not in ("layerwise", "uniform"):
        raise MergeLabError(f"width weights must be 'layerwise', 'uniform' or a mapping group -> number, got {w!r}")
    return float(b), w


def flops(terms: Sequence[Term], n: Mapping[str, int], ratios: Mapping[str, float]) -> float:
    """The paper's cost of a partially merged net (module docstring)."""
    total = 0.0
    for c, g1, g2 in terms:
        if g1 is not None and g2 is not None:
            r1, r2 = ratios[g1], ratios[g2]
            total += c * n[g1] * n[g2] * ((1 + r1) * (1 + r2) - 2 * r1 * r2)
        elif g1 is not None or g2 is not None:
            g = g1 if g1 is not None else g2
            total += c * n[g] * (1 + ratios[g])
        else:
            total += c
    return total


def choose_widths(n: Mapping[str, int], terms: Sequence[Term], budget: float, weights: Mapping[str, float],
                  exact_limit: int = EXACT_LIMIT) -> WidthChoice:
    """Maximise ``sum_l w_l k_l / n_l`` over integers ``0 <= k_l <= n_l`` subject to
    ``flops(k/n) <= budget * flops(0)`` (module docstring). Exact on the lattice unless it is too large."""
    groups = list(n)
    w = {g: max(float(weights[g]), MIN_WEIGHT) for g in groups}
    base = flops(terms, n, {g: 0.0 for g in groups})
    cap = budget * base * (1 + 1e-12)
    last = max(groups, key=lambda g: n[g])
    others = [g for g in groups if g != last]
    size = int(np.prod([n[g] + 1 for g in others])) if others else 1
    if size <= exact_limit:
        grids = np.meshgrid(*[np.arange(n[g] + 1) / n[g] for g in others], indexing="ij") if others else []
        R = {g: grid.ravel() for g, grid in zip(others, grids)}
        m = len(next(iter(R.values()))) if R else 1
        # cost = a + s * r_last, both arrays over the combinations of the other groups
        a, s = np.zeros(m), np.zeros(m)
        for c, g1, g2 in terms:
            gs = [g for g in (g1, g2) if g is not None]
            if len(gs) == 2:
                other = g2 if g1 == last else g1
                if last in gs and g1 == g2:
                    raise MergeLabError(f"a layer reads and writes the same group '{last}'")
                if last in gs:
                    ro = R[other] if other in R else 0.0
                    a += c * n[g1] * n[g2] * (1 + ro)
                    s += c * n[g1] * n[g2] * (1 - ro)
                else:
                    r1, r2 = R[g1], R[g2]
                    a += c * n[g1] * n[g2] * ((1 + r1) * (1 + r2) - 2 * r1 * r2)
            elif len(gs) == 1:
                if gs[0] == last:
                    a += c * n[last]
                    s += c * n[last]
                else:
                    a += c * n[gs[0]] * (1 + R[gs[0]])
            else:
                a += c
        with np.errstate(divide="ignore", invalid="ignore"):
            r_max = np.where(s > 0, (cap - a) / np.where(s > 0, s, 1), np.where(a <= cap, 1.0, -1.0))
        k_last = np.minimum(np.floor(np.clip(r_max, -1, 1) * n[last] + 1e-9), n[last])
        feasible = (a <= cap) & (k_last >= 0)
        obj = sum(w[g] * R[g] for g in others) + w[last] * np.maximum(k_last, 0) / n[last]
        obj = np.where(feasible, obj, -np.inf)
        best = int(np.argmax(obj))  # the first optimum in enumeration order
        k = {g: int(round(R[g][best] * n[g])) for g in others}
        k[last] = int(k_last[best])
        exact = True
    else:
        k = _greedy(n, terms, w, cap)
        exact = False
    ratios = {g: k[g] / n[g] for g in groups}
    return WidthChoice({g: n[g] + k[g] for g in groups}, ratios, w, budget, flops(terms, n, ratios) / base, exact)


def _greedy(n, terms, w, cap) -> Dict[str, int]:
    """One separate unit at a time to the group with the largest benefit per added FLOP that still fits."""
    k = {g: 0 for g in n}
    while True:
        now = flops(terms, n, {g: k[g] / n[g] for g in n})
        best, best_gain = None, 0.0
        for g in n:
            if k[g] == n[g]:
                continue
            trial = dict(k, **{g: k[g] + 1})
            cost = flops(terms, n, {h: trial[h] / n[h] for h in n})
            if cost > cap:
                continue
            gain = (w[g] / n[g]) / max(cost - now, 1e-12)
            if gain > best_gain:
                best, best_gain = g, gain
        if best is None:
            return k
        k[best] += 1


def layerwise_weights(groups: Sequence[str], n: Mapping[str, int], budget: float,
                      score: Callable[[Dict[str, int]], float]) -> Tuple[Dict[str, float], Dict[str, float]]:
    """The paper's per-group benefits from ``2 L + 2`` merges scored by ``score(widths)`` (higher is
    better): ``w_l = (R1_l - R_merged)(2 - budget) - (R0_l - R_ensemble)(budget - 1)``. Returns the
    weights and the scores (``merged``, ``ensemble``, ``R1:<group>``, ``R0:<group>``)."""
    scores = {"merged": score({g: n[g] for g in groups}), "ensemble": score({g: 2 * n[g] for g in groups})}
    w = {}
    for g in groups:
        scores[f"R1:{g}"] = score({h: (2 * n[h] if h == g else n[h]) for h in groups})
        scores[f"R0:{g}"] = score({h: (n[h] if h == g else 2 * n[h]) for h in groups})
        w[g] = ((scores[f"R1:{g}"] - scores["merged"]) * (2 - budget)
                - (scores[f"R0:{g}"] - scores["ensemble"]) * (budget - 1))
    return w, scores


def budget_widths(width: Mapping, n: Mapping[str, int], terms: Sequence[Term],
                  score: Callable[[Dict[str, int]], float]) -> WidthChoice:
    """The widths for a ``{budget, weights}`` parameter: weights resolved (``layerwise`` runs the merges
    through ``score``), then :func:`choose_widths`."""
    groups = list(n)
    budget, wspec = parse_budget(width, groups)
    scores: Dict[str, float] = {}
    if wspec == "uniform":
        weights = {g: 1.0 for g in groups}
    elif wspec == "layerwise":
        weights, scores = layerwise_weights(groups, n, budget, score)
    else:
        weights = {g: float(wspec[g]) for g in groups}
    choice = choose_widths(n, terms, budget, weights)
    choice.scores = scores
    return choice

