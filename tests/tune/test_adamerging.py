"""AdaMerging (tune/adamerging.py): gradients, the clamp bound, entropy decrease on tiny BERT experts."""

import torch

from mergelab.calibrate.data import CalibrationSet, tokenize_batches
from mergelab.tune.adamerging import AdaMergingConfig, adamerging, entropy_objective
from mergelab.tune.functional import CoefficientSpace, EncoderHeads, ModelPool
from tests.calibrate import tiny
from tests.tune import toy


def test_finite_difference_matches_the_coefficient_gradient():
    model = toy.ToyTasks()
    base = toy.state(model)
    ex = toy.experts(base, 2)
    data = [b[0] for b in toy.batches(2)]
    space = CoefficientSpace(base, ModelPool(ex), list(base), "tensor", init=0.3)

    def objective(w):
        theta = {k: v.double() for k, v in space.assemble(w).items()}
        return float(entropy_objective(model, theta, data))

    w = space.weights()
    theta = {k: v.detach().double().requires_grad_(True) for k, v in space.assemble(w).items()}
    grads = torch.autograd.grad(entropy_objective(model, theta, data), list(theta.values()))
    g = space.coefficient_grad({k: gr.float() for k, gr in zip(theta, grads)})
    eps = 1e-3
    for idx in [(0, 0), (1, 2), (0, 3), (1, 1)]:
        plus, minus = w.detach().clone(), w.detach().clone()
        plus[idx] += eps
        minus[idx] -= eps
        fd = (objective(plus) - objective(minus)) / (2 * eps)
        assert abs(fd - float(g[idx])) < 2e-3 * max(1.0, abs(fd)), (idx, fd, float(g[idx]))


class LinearSoftmax:
    """logits = x W^T: a task vector tau = W scales the logits by (1 + lambda)."""

    def rows(self, params, batch, task):
        return batch["x"].double() @ params["w"].double().T


def test_entropy_decreasing_in_lambda_runs_to_the_clamp_bound():
    """One task, tau = theta_0: entropy falls monotonically in lambda, so lambda runs to the clamp bound 1."""
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(3, 4, generator=g) * 0.3}
    expert = {"w": 2 * base["w"]}
    data = [[{"x": torch.randn(10, 4, generator=g)}]]
    res = adamerging(LinearSoftmax(), base, ModelPool([expert]), data, AdaMergingConfig("task", lr=0.05, steps=40))
    assert res.coefficients["model_0"] == 1.0  # the clamped forward value
    ent = [h["entropy"] for h in res.history]
    assert all(b <= a + 1e-12 for a, b in zip(ent, ent[1:]))  # monotone; flat once the clamp bound is reached
    assert ent[-1] < ent[0]
    unclamped = adamerging(LinearSoftmax(), base, ModelPool([expert]), data,
                           AdaMergingConfig("task", lr=0.05, steps=40, clamp=False))
    assert unclamped.coefficients["model_0"] > 1.5


def _bert_setup(tmp_path, k=2):
    from transformers import BertModel

    enc = []
    for i in range(k + 1):
        torch.manual_seed(i)
        enc.append(BertModel(tiny.bert_config(), add_pooling_layer=True).eval())
    base = {n: v.clone() for n, v in enc[0].state_dict().items()}
    # experts: the base plus a scaled random direction per tensor
    experts = []
    for i in range(1, k + 1):
        experts.append({n: (v + 0.5 * (enc[i].state_dict()[n] - v)) if v.is_floating_point() else v
                        for n, v in base.items()})
    g = torch.Generator().manual_seed(5)
    heads = [{"weight": torch.randn(3, 16, generator=g), "bias": torch.zeros(3)} for _ in range(k)]
    tok = tiny.tokenizer(tmp_path / "tok")
    data = [list(tokenize_batches(tok, CalibrationSet(tiny.texts(8, 13 * t)), 4, 16)) for t in range(k)]
    return EncoderHeads(enc[0], heads), base, experts, data


def test_learned_coefficients_lower_the_entropy_they_minimise(tmp_path):
    tm, base, experts, data = _bert_setup(tmp_path)
    for granularity in ("task", "layer"):
        cfg = AdaMergingConfig(granularity, lr=0.05, steps=6)
        res = adamerging(tm, base, ModelPool(experts), data, cfg)
        init = CoefficientSpace(base, ModelPool(experts), list(res.state), "task", init=0.3).assemble()
        full = [b for d in data for b in d]

        def total(theta):
            with torch.no_grad():
                return sum(float(entropy_objective(tm, theta, [b if t == i else None for i in range(2)]))
                           for t, d in enumerate(data) for b in d)

        assert total(res.state) < total(init), granularity
        assert len(full) == 4
        if granularity == "layer":
            floats = [n for n, v in base.items() if v.is_floating_point()]
            assert res.info["coefficients"] == 2 * len(floats)


def test_stream_storage_gives_the_same_coefficients(tmp_path):
    tm, base, experts, data = _bert_setup(tmp_path)
    cfg = AdaMergingConfig("layer", lr=0.01, steps=2)
    a = adamerging(tm, base, ModelPool(experts), data, cfg)
    pool = ModelPool(experts)
    b = adamerging(tm, base, pool, data, AdaMergingConfig("layer", lr=0.01, steps=2, storage="stream"))
    for k in a.state:
        torch.testing.assert_close(a.state[k], b.state[k], atol=1e-6, rtol=1e-5)
    assert pool.reads == 2 * (2 * 2 + 1)  # per step: assemble + gradient pass; plus the final assembly
