"""FW-Merging (tune/fw_merging.py): irrelevance robustness, step schedule, convex hull, flat memory."""

import weakref

import numpy as np
import torch
from scipy.optimize import nnls

from mergelab.tune.functional import ModelPool
from mergelab.tune.fw_merging import FWConfig, fw_merging
from tests.tune import toy


def _pool(k_irrelevant, d=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = {"a": torch.randn(d // 2, generator=g), "b": torch.randn(d // 2, generator=g)}
    relevant = {k: v + torch.randn(v.shape, generator=g) for k, v in base.items()}
    irrelevant = [{k: v + 5 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(16)]
    return base, relevant, irrelevant[:k_irrelevant]


def test_quadratic_selects_the_relevant_model_and_ignores_irrelevant_ones():
    runs = []
    for k in (8, 16):
        base, rel, irr = _pool(k)
        target = {n: v.clone() for n, v in rel.items()}

        def objective(theta):
            return sum(((theta[n] - target[n]) ** 2).sum() for n in theta)

        res = fw_merging(None, base, ModelPool([rel] + irr, names=["relevant"] + [f"irr{i}" for i in range(k)]), [],
                         FWConfig(iterations=8, step_size=0.5, scaling_factor=1.0, init="base",
                                  lmo="inner_product"), objective=objective)
        assert [h["selected"] for h in res.history] == ["relevant"] * 8
        losses = [h["loss"] for h in res.history] + [res.info["final_loss"]]
        assert all(b < a for a, b in zip(losses, losses[1:]))
        runs.append(res)
    for n in runs[0].state:  # more irrelevant models change nothing
        torch.testing.assert_close(runs[0].state[n], runs[1].state[n])


def test_step_schedule_starts_at_the_step_size():
    model = toy.ToyTasks()
    base = toy.state(model)
    res = fw_merging(model, base, ModelPool(toy.experts(base, 3)), toy.batches(2),
                     FWConfig(iterations=3, step_size=0.4, scaling_factor=0.5))
    steps = [h["step"] for h in res.history]
    assert steps[0] == 0.5 * 0.4
    assert steps == [0.5 * 0.4 * 2 / (t + 2) for t in range(3)]


def _in_hull(point, vertices):
    """Residual of the best convex combination (NNLS with a heavily weighted sum-to-one row)."""
    v = np.stack([x.double().numpy().reshape(-1) for x in vertices], 1)
    a = np.vstack([v, 1e3 * np.ones((1, v.shape[1]))])
    b = np.concatenate([point.double().numpy().reshape(-1), [1e3]])
    w, res = nnls(a, b)
    return res, w


def test_iterates_never_leave_the_convex_hull():
    model = toy.ToyTasks()
    base = toy.state(model)
    experts = toy.experts(base, 4, scale=1.0)
    data = toy.batches(2)
    for granularity in ("task", "layer"):
        for lmo in ("cosine_raw", "inner_product"):
            res = fw_merging(model, base, ModelPool(experts), data,
                             FWConfig(iterations=6, step_size=1.0, scaling_factor=1.0, init="average", lmo=lmo,
                                      granularity=granularity))
            for k, v in res.state.items():  # per tensor (layer granularity picks per tensor)
                resid, _ = _in_hull(v, [e[k] for e in experts])
                assert resid < 1e-4, (granularity, lmo, k, resid)
            if granularity == "task":
                w = res.coefficients
                assert min(w.values()) >= 0 and abs(sum(w.values()) - 1) < 1e-9
                init = {k: sum(e[k] for e in experts) / 4 for k in base}
                for k, v in res.state.items():
                    recon = w["initial"] * init[k] + sum(w[f"model_{i}"] * experts[i][k] for i in range(4))
                    torch.testing.assert_close(v, recon.float(), atol=1e-5, rtol=1e-5)
    # task arithmetic init is outside the pool's hull but inside hull(pool + initial), which the reference uses
    res = fw_merging(model, base, ModelPool(experts), data, FWConfig(iterations=4))
    assert abs(sum(res.coefficients.values()) - 1) < 1e-9 and res.coefficients["initial"] > 0


class _CountingPool(ModelPool):
    """Records how many loaded candidates are alive at once."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.alive = 0
        self.peak = 0

    def load(self, i, keys=None):
        out = _Tracked(super().load(i, keys))
        self.alive += 1
        self.peak = max(self.peak, self.alive)
        weakref.finalize(out, self._gone)
        return out

    def _gone(self):
        self.alive -= 1


class _Tracked(dict):
    pass


def test_memory_is_constant_in_the_pool_size():
    model = toy.ToyTasks()
    base = toy.state(model)
    peaks = []
    for k in (3, 12):
        pool = _CountingPool(toy.experts(base, k))
        for granularity in ("task", "layer"):
            fw_merging(model, base, pool, toy.batches(1), FWConfig(iterations=3, granularity=granularity))
        peaks.append(pool.peak)
    assert peaks[0] == peaks[1] <= 2
