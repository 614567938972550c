"""AdaMerging (tune/adamerging.py): gradients, the clamp bound, entropy decrease on tiny BERT experts."""

import pytest
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

        def total(theta):
            with torch.no_grad():
                return sum(float(entropy_objective(tm, theta, [b if t == i else None for i in range(2)]))
                           for t, d in enumerate(data) for b in d)

        assert total(res.state) < total(init), granularity
        floats = [n for n, v in base.items() if v.is_floating_point()]
        assert res.info["coefficients"] == 2 * (len(floats) if granularity == "layer" else 1)
        # the merged tensors are the formula at the reported coefficients
        for name in floats:
            lam = [res.coefficients[f"model_{k}"] for k in range(2)]
            lam = [c if granularity == "task" else c[name][0] for c in lam]
            want = base[name].double() + sum(c * (e[name].double() - base[name].double()) for c, e in zip(lam, experts))
            torch.testing.assert_close(res.state[name].double(), want, atol=1e-5, rtol=1e-5)


def _entropy(logits):
    p = torch.softmax(logits.double(), -1)
    return -(p * torch.log(p)).sum(-1).mean()


def test_first_steps_are_adam_on_the_entropy_gradient_from_the_prior():
    """Oracle from the reference (AdaMerging task-wise: lambda starts at 0.3, Adam lr 1e-3 betas 0.9/0.999,
    objective sum_t mean-row entropy of softmax(f_theta(x_t)), theta = theta_0 + sum_k lambda_k tau_k),
    differentiated here directly in lambda; Adam's update written out."""
    model = toy.ToyTasks()
    base = toy.state(model)
    ex = toy.experts(base, 2, scale=0.4, seed=3)
    data = [[b[0]] for b in toy.batches(2, n=8, per_batch=8)]  # one batch per task: no shuffling involved
    lr, steps = 0.01, 3
    res = adamerging(model, base, ModelPool(ex), data, AdaMergingConfig("task", lr=lr, steps=steps))

    lam = torch.full((2,), 0.3, dtype=torch.float64)
    m = torch.zeros(2, dtype=torch.float64)
    v = torch.zeros(2, dtype=torch.float64)
    history = []
    for step in range(1, steps + 1):
        var = lam.clone().requires_grad_(True)
        theta = {k: base[k].double() + sum(var[i] * (ex[i][k].double() - base[k].double()) for i in range(2))
                 for k in base}
        loss = sum(_entropy(model.rows(theta, data[t][0], t)) for t in range(2))
        (g,) = torch.autograd.grad(loss, var)
        history.append(float(loss.detach()))
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        lam = lam - lr * (m / (1 - 0.9 ** step)) / ((v / (1 - 0.999 ** step)).sqrt() + 1e-8)
    got = torch.tensor([res.coefficients["model_0"], res.coefficients["model_1"]], dtype=torch.float64)
    torch.testing.assert_close(got, lam.clamp(0, 1), atol=1e-5, rtol=0)
    assert [h["entropy"] for h in res.history] == pytest.approx(history, rel=1e-5)
    assert (got - 0.3).abs().min() > 0.5 * lr  # it moved: the check is not the prior against itself


def test_stream_storage_gives_the_same_coefficients(tmp_path):
    tm, base, experts, data = _bert_setup(tmp_path)
    cfg = AdaMergingConfig("layer", lr=0.01, steps=2)
    a = adamerging(tm, base, ModelPool(experts), data, cfg)
    pool = ModelPool(experts)
    b = adamerging(tm, base, pool, data, AdaMergingConfig("layer", lr=0.01, steps=2, storage="stream"))
    for k in a.state:
        torch.testing.assert_close(a.state[k], b.state[k], atol=1e-6, rtol=1e-5)
    assert pool.reads == 2 * (2 * 2 + 1)  # per step: assemble + gradient pass; plus the final assembly
