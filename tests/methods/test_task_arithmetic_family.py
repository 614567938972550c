"""linear, task_arithmetic, ties, dare_linear, dare_ties: identities, invariants, hand-worked examples."""

import math

import numpy as np
import pytest
import torch

from tests.methods.helpers import inputs_for, run
from mergelab.methods.registry import get_method


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


BASE = rand(6, 5, seed=1)
MODELS = [BASE + 0.1 * rand(6, 5, seed=s) for s in (2, 3, 4)]


# ----------------------------------------------------------------------------- linear
def test_linear_weighted_average_by_hand():
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0])
    assert run("linear", None, [a, b], weight=[1.0, 3.0]).tolist() == [2.5, 5.0]
    assert run("linear", None, [a, b], weight=[1.0, 3.0], normalize=False).tolist() == [10.0, 20.0]


def test_linear_one_model_gives_it_back_and_order_does_not_matter():
    assert torch.equal(run("linear", None, [MODELS[0]], weight=2.0), MODELS[0])
    w = [0.2, 0.5, 0.3]
    fwd = run("linear", None, MODELS, weight=w)
    rev = run("linear", None, MODELS[::-1], weight=w[::-1])
    assert torch.allclose(fwd, rev, atol=1e-6)


# ----------------------------------------------------------------------------- task arithmetic
def test_task_arithmetic_identities():
    assert torch.equal(run("task_arithmetic", BASE, MODELS, weight=1.0, **{"lambda": 0.0}), BASE)
    assert torch.allclose(run("task_arithmetic", BASE, MODELS[:1], weight=1.0), MODELS[0], atol=1e-6)
    mean = torch.stack(MODELS).mean(0)
    assert torch.allclose(run("task_arithmetic", BASE, MODELS, weight=1.0, **{"lambda": 1 / 3}), mean, atol=1e-6)


def test_task_arithmetic_is_linear_in_lambda():
    d = lambda lam: run("task_arithmetic", BASE, MODELS, weight=1.0, **{"lambda": lam}) - BASE
    assert torch.allclose(d(0.3) + d(0.5), d(0.8), atol=1e-6)


# ----------------------------------------------------------------------------- ties
def ties_oracle(base, models, density, weights, semantics="mergekit"):
    """TIES written out with numpy loops, from the paper / mergekit description."""
    b = base.numpy().astype(np.float64).ravel()
    taus = [m.numpy().astype(np.float64).ravel() - b for m in models]
    n = b.size
    trimmed = []
    for tau in taus:
        if density >= 1:
            trimmed.append(tau.copy())
            continue
        k = max(1, int(density * n)) if semantics == "mergekit" else math.floor(density * n) + 1
        thr = sorted(np.abs(tau), reverse=True)[k - 1]
        trimmed.append(np.where(np.abs(tau) >= thr, tau, 0.0))
    weighted = [w * t for w, t in zip(weights, trimmed)]
    sums = [sum(t[j] for t in weighted) for j in range(n)]
    # paper: a zero sum takes the sign of the total elected mass over the model (itself possibly 0);
    # tests/methods/test_ties_dare_paper.py builds data that reaches it (random data does not)
    majority = float(np.sign(sum(np.sign(s) for s in sums)))
    out = np.zeros(n)
    for j in range(n):
        s = sums[j]
        sign = 1.0 if s >= 0 else -1.0
        if semantics == "paper" and s == 0:
            sign = majority
        num = sum(t[j] for t in weighted if np.sign(t[j]) == sign)
        if semantics == "mergekit":
            den = sum(w for w, t in zip(weights, weighted) if np.sign(t[j]) == sign) or 1.0
        else:
            den = max(1, sum(1 for t in weighted if np.sign(t[j]) == sign))
        out[j] = num / den
    return torch.tensor(b + out, dtype=torch.float32).reshape(base.shape)


@pytest.mark.parametrize("density", [1.0, 0.5, 0.2])
@pytest.mark.parametrize("semantics", ["mergekit", "paper"])
def test_ties_matches_loop_oracle(density, semantics):
    w = [1.0, 0.5, 2.0] if semantics == "mergekit" else [1.0, 1.0, 1.0]
    got = run("ties", BASE, MODELS, weight=w, density=density, semantics=semantics)
    assert torch.allclose(got, ties_oracle(BASE, MODELS, density, w, semantics), atol=1e-6)


def test_ties_hand_example():
    base = torch.zeros(4)
    m1 = torch.tensor([3.0, -1.0, 0.5, 2.0])
    m2 = torch.tensor([1.0, 2.0, -4.0, -0.1])
    # density 0.5 keeps 2 of 4 per model: m1 -> [3, 0, 0, 2]; m2 -> [0, 2, -4, 0]
    # signs: [+, +, -, +]; disjoint mean: [3, 2, -4, 2]
    out = run("ties", base, [m1, m2], weight=1.0, density=0.5)
    assert out.tolist() == [3.0, 2.0, -4.0, 2.0]


def test_ties_one_model_density_one_equals_task_arithmetic():
    ties = run("ties", BASE, MODELS[:1], weight=1.0, density=1.0, **{"lambda": 0.7})
    ta = run("task_arithmetic", BASE, MODELS[:1], weight=1.0, **{"lambda": 0.7})
    assert torch.allclose(ties, ta, atol=1e-6)


def test_ties_agreeing_signs_no_trim_is_task_arithmetic_over_n():
    base = rand(10, seed=9)
    models = [base + torch.rand(10, generator=torch.Generator().manual_seed(s)) + 0.1 for s in range(3)]
    ties = run("ties", base, models, weight=1.0, density=1.0, semantics="paper")
    ta = run("task_arithmetic", base, models, weight=1.0, **{"lambda": 1 / 3})
    assert torch.allclose(ties, ta, atol=1e-6)


def test_ties_order_invariant_and_odd():
    fwd = run("ties", BASE, MODELS, weight=1.0, density=0.4, semantics="paper")
    rev = run("ties", BASE, MODELS[::-1], weight=1.0, density=0.4, semantics="paper")
    assert torch.allclose(fwd, rev, atol=1e-6)
    neg = run("ties", BASE, [2 * BASE - m for m in MODELS], weight=1.0, density=0.4, semantics="paper")
    assert torch.allclose(neg - BASE, -(fwd - BASE), atol=1e-6)


def test_ties_paper_keeps_floor_plus_one_and_mergekit_keeps_k():
    base = torch.zeros(10)
    m = torch.arange(1.0, 11.0)
    paper = run("ties", base, [m], weight=1.0, density=0.3, semantics="paper")
    mk = run("ties", base, [m], weight=1.0, density=0.3)
    assert int((paper != 0).sum()) == 4 and int((mk != 0).sum()) == 3


def test_ties_lambda_zero_gives_base():
    assert torch.equal(run("ties", BASE, MODELS, weight=1.0, density=0.5, **{"lambda": 0.0}), BASE)


# ----------------------------------------------------------------------------- dare
def test_dare_density_one_is_task_arithmetic():
    dl = run("dare_linear", BASE, MODELS, weight=1.0, density=1.0)
    ta = run("task_arithmetic", BASE, MODELS, weight=1.0)
    assert torch.allclose(dl, ta, atol=1e-6)


def test_dare_paper_is_unbiased_and_keeps_density():
    base = torch.zeros(200_000)
    model = torch.full((200_000,), 2.0)
    out = run("dare_linear", base, [model], weight=1.0, density=0.3, semantics="paper")
    kept = (out != 0).float().mean().item()
    assert abs(kept - 0.3) < 0.005
    values = out.unique().tolist()
    assert len(values) == 2 and values[0] == 0.0 and values[1] == pytest.approx(2.0 / 0.3)
    assert abs(out.mean().item() - 2.0) < 0.03


def test_dare_mergekit_l1_rescale_preserves_l1_norm():
    out = run("dare_linear", BASE, MODELS[:1], weight=1.0, density=0.4)
    tau = MODELS[0] - BASE
    assert (out - BASE).abs().sum().item() == pytest.approx(tau.abs().sum().item(), rel=1e-5)


def test_dare_same_seed_same_mask_different_seed_different_mask():
    a = run("dare_ties", BASE, MODELS, weight=1.0, density=0.5)
    b = run("dare_ties", BASE, MODELS, weight=1.0, density=0.5)
    x = inputs_for("dare_ties", BASE, MODELS, weight=1.0, density=0.5, seed=1)
    c = get_method("dare_ties").merge(x)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_dare_zero_density_gives_base():
    assert torch.equal(run("dare_ties", BASE, MODELS, weight=1.0, density=0.0), BASE)
    assert torch.equal(run("dare_linear", BASE, MODELS, weight=1.0, density=0.0, semantics="paper"), BASE)
