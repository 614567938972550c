"""Random methods (DARE, DELLA) on the real experts: invariants an independent oracle can check.

mergelab's masks come from its own counter-based streams, which an independent test cannot replay, so
these tests check what the methods' definitions fix whatever the stream: density 1 is the
deterministic limit (task arithmetic, TIES) exactly; with one model every output entry is the base's
value or the base plus the rescaled task-vector entry, the kept count per tensor lies within binomial
bounds of ``density * n`` (6 standard deviations), mergekit's L1 rescale factor
``|tau|_1 / |kept tau|_1`` is the one recomputed in float64 from the kept entries, and DELLA keeps
large-magnitude entries more often than small ones (its rank-dependent probabilities).
"""

from __future__ import annotations

import math

import pytest
import torch

from . import oracle as O
from .test_deterministic import RECIPES, TIES_3, _recipe, out_state

U = O.EPS32


def _with(recipe: dict, method: str, **params) -> dict:
    r = dict(recipe, merge_method=method)
    r["models"] = [dict(m, parameters=dict(m.get("parameters", {}), **params)) for m in recipe["models"]]
    return r


@pytest.mark.parametrize("method", ["dare_linear", "della_linear"])
def test_density_one_is_task_arithmetic(real_family, merged, method):
    ta = out_state(merged("task_arithmetic", RECIPES["task_arithmetic"](real_family)))
    got = out_state(merged(f"{method}_d1", _with(RECIPES["task_arithmetic"](real_family), method, density=1.0)))
    for name in ta:
        assert torch.equal(got[name], ta[name]), (method, name, float((got[name] - ta[name]).abs().max()))


@pytest.mark.parametrize("method", ["dare_ties", "della"])
def test_density_one_is_ties(real_family, merged, method):
    ties = _recipe("ties", real_family, 3, parameters={"lambda": TIES_3["lam"]}, weight=TIES_3["weights"],
                   density=1.0)
    ref = out_state(merged("ties_d1", ties))
    r = _with(ties, method)
    r["parameters"] = dict(r["parameters"], normalize=True)  # dare_ties' mergekit default is false
    got = out_state(merged(f"{method}_d1", r))
    for name in ref:
        assert torch.equal(got[name], ref[name]), (method, name, float((got[name] - ref[name]).abs().max()))


def _kept_and_factor(fam, out, name):
    """With one model of weight 1: the kept entries (those that moved; entries whose rescaled delta
    would round away, or whose tau is 0, are undetermined and returned separately), and mergekit's L1
    factor recomputed in float64 from them."""
    v0 = fam.state(fam.base)[name]
    tau = fam.tau(0, name)
    got = out[name]
    moved = got != v0
    undetermined = (tau == 0) | (tau.abs() < 4 * U * v0.double().abs())
    kept = moved & ~undetermined
    l1, l1k = float(tau.abs().sum()), float((tau * moved).abs().sum())
    factor = l1 / l1k if (l1 >= 1e-7 and l1k >= 1e-7) else 1.0
    return v0.double(), tau, got.double(), moved, kept, undetermined, factor


def _check_values(name, v0, tau, got, moved, factor):
    ref = torch.where(moved, v0 + factor * tau, v0)
    # the factor is a ratio of two L1 sums over the tensor (float64 in the fused kernels, blocked float32
    # in the tensor code): 1e-5 relative covers both
    bound = 8 * U * (v0.abs() + factor * tau.abs()) + 1e-5 * factor * tau.abs() + 1e-30
    O.compare(name, got, ref, bound)


def test_dare_linear_single_model_mask_and_rescale(real_family, merged):
    d = 0.3
    out = out_state(merged("dare_linear_one", _recipe("dare_linear", real_family, 1, weight=1.0, density=d)))
    for name in real_family.names:
        v0, tau, got, moved, kept, und, factor = _kept_and_factor(real_family, out, name)
        n = int((~und).sum())
        k = int(kept.sum())
        assert abs(k - d * n) <= 6 * math.sqrt(n * d * (1 - d)) + 1, (name, k, n)
        _check_values(name, v0, tau, got, moved, factor)


def test_della_linear_single_model_ranks_and_rescale(real_family, merged):
    d, eps = 0.5, 0.15
    out = out_state(merged("della_linear_one", _recipe("della_linear", real_family, 1, weight=1.0, density=d,
                                                       epsilon=eps)))
    for name in real_family.names:
        v0, tau, got, moved, kept, und, factor = _kept_and_factor(real_family, out, name)
        n = int((~und).sum())
        k = int(kept.sum())
        # each row's keep probabilities rise linearly from d - eps to d + eps over its ranks: they sum
        # to d per entry, with variance at most n / 4
        assert abs(k - d * n) <= 6 * math.sqrt(n / 4) + 1 + int(und.sum()), (name, k, n)
        _check_values(name, v0, tau, got, moved, factor)
        if tau.numel() >= 100_000:
            # large magnitudes (top half of each row) are kept more often than small ones: the expected
            # rates are d + eps / 2 and d - eps / 2
            rows = tau.view(tau.shape[0], -1) if tau.ndim > 1 else tau.view(1, -1)
            med = rows.abs().median(dim=1, keepdim=True).values
            big = (rows.abs() > med) & ~und.view_as(rows)
            small = (rows.abs() < med) & ~und.view_as(rows)
            kv = kept.view_as(rows)
            hi, lo = float(kv[big].double().mean()), float(kv[small].double().mean())
            assert hi - lo > eps / 2, (name, hi, lo)
