"""Parity with mergekit 0.1.5 where most task-vector entries tie (issue 14, point 1).

Rows moved only by a constant weight-decay step give thousands of equal magnitudes, and the
thresholds of ``ties`` and ``breadcrumbs`` land among them. mergekit keeps exactly its count, picking
among the tied entries in ``torch.argsort``'s order; mergelab keeps the same count, picking the lower
flat indices. So: the same number of kept entries, and outputs that differ only at positions where
some model's magnitude equals one of its thresholds. (``MERGEKIT_PYTHON``: see
``mergekit_runner.py``.)
"""

from __future__ import annotations

import pytest
import torch

from tests.methods.mergekit_family_util import run
from tests.parity.mergekit_runner import NEEDS_MERGEKIT, merge_tensors

pytestmark = NEEDS_MERGEKIT

DECAY = 1.341e-6


def _family(n: int, seed: int, rows: int = 120, cols: int = 48, touched: float = 0.2, scale: float = 0.02):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(rows, cols, generator=g) * scale
    models = []
    for _ in range(n):
        delta = torch.where(torch.rand(rows, cols, generator=g) < 0.5, -DECAY, DECAY)
        live = torch.rand(rows, generator=g) < touched
        delta[live] = torch.randn(int(live.sum()), cols, generator=g) * 1e-3
        models.append(base + delta)
    return base, models


CASES = [
    # id, method, number of models, per-model parameters (the same for mergekit and mergelab)
    ("ties_one", "ties", 1, {"weight": 1.0, "density": 0.4}),
    ("ties_three", "ties", 3, {"weight": 1.0, "density": 0.4}),
    ("breadcrumbs_one", "breadcrumbs", 1, {"weight": 1.0, "density": 0.5, "gamma": 0.05}),
    ("breadcrumbs_ties_two", "breadcrumbs_ties", 2, {"weight": 1.0, "density": 0.3, "gamma": 0.02}),
    ("sce_three", "sce", 3, {}),  # select_topk 0.3: the variances of the decay rows tie
]
GLOBAL = {"sce_three": {"select_topk": 0.3}}
FAMILY = {"sce_three": {"touched": 0.05, "scale": 0.0}}  # a zero base: the decay deltas are exact


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tensors, cases = {}, []
    for j, (cid, method, n, mp) in enumerate(CASES):
        base, models = _family(n, seed=j, **FAMILY.get(cid, {}))
        tensors[f"{cid}.base"] = base
        for i, m in enumerate(models):
            tensors[f"{cid}.m{i}"] = m
        cases.append({"id": cid, "name": cid, "method": method,
                      "tensors": [f"{cid}.base"] + [f"{cid}.m{i}" for i in range(n)],
                      "parameters": {**{k: [v] * n for k, v in mp.items()}, **GLOBAL.get(cid, {})},
                      "base_index": 0})
    return tensors, merge_tensors(tensors, cases, tmp_path_factory.mktemp("tie_counts"))


def _tied_positions(base, models, ks_per_model) -> torch.Tensor:
    """Positions where some model's |tau| equals the magnitude at one of its cut ranks (1-based ks)."""
    tied = torch.zeros_like(base, dtype=torch.bool)
    for m, ks in zip(models, ks_per_model):
        a = (m - base).abs()
        s = a.reshape(-1).sort(descending=True).values
        for k in ks:
            if 0 < k <= s.numel():
                tied |= a == s[k - 1]
    return tied


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_same_counts_and_differences_only_at_tied_magnitudes(case, results):
    cid, method, n, mp = case
    tensors, out = results
    base = tensors[f"{cid}.base"]
    models = [tensors[f"{cid}.m{i}"] for i in range(n)]
    theirs = out[cid]
    ours = run(method, base, models, GLOBAL.get(cid), [dict(mp) for _ in range(n)])
    numel = base.numel()
    if method == "sce":
        # The selection ranks the positions by the variance of the task vectors across models.
        var = torch.var(torch.stack([m - base for m in models]), dim=0, unbiased=False)
        k = int(int((var != 0).sum()) * 0.3)
        kth = var.reshape(-1).sort(descending=True).values[k - 1]
        tied = var == kth
        assert int(tied.sum()) > k // 2
        differ = ours != theirs
        assert not (differ & ~tied).any(), f"{cid}: differs from mergekit away from tied variances"
        return
    if method == "ties":
        ks = [[max(1, int(mp["density"] * numel))]]
    else:
        target, top = int(mp["density"] * numel), int(mp["gamma"] * numel)
        ks = [[top, top + target]]
    tied = _tied_positions(base, models, ks * n)
    assert int(tied.sum()) > numel // 2  # the thresholds do land among the decay ties
    differ = ours != theirs
    assert not (differ & ~tied).any(), f"{cid}: differs from mergekit away from tied magnitudes"
    if n == 1:  # one model: the kept entries are the non-zero outputs minus the base
        kept = ks[0][-1] - (ks[0][0] if method != "ties" else 0)
        assert int((ours != base).sum()) == int((theirs != base).sum()) == kept
