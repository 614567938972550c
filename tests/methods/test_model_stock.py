"""model_stock: identical models, orthogonal task vectors, t = 2c/(1+c), scale invariance, no clamp by default
(negative cosines extrapolate, under both semantics), clamp_t, chunking."""

import numpy as np
import pytest
import torch

from tests.methods.mergekit_family_util import run


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


BASE = rand(10, 8, seed=1)
SHARED = rand(10, 8, seed=2)
MODELS = [BASE + 0.1 * (SHARED + rand(10, 8, seed=s)) for s in (3, 4, 5)]  # positively correlated


def oracle(base, models, clamp=False):
    """float64: mean pairwise cosine of the task vectors, t = N c / (1 + (N-1) c)."""
    b = base.double().numpy().reshape(-1)
    taus = [m.double().numpy().reshape(-1) - b for m in models]
    n = len(taus)
    cos = [np.dot(taus[i], taus[j]) / (np.linalg.norm(taus[i]) * np.linalg.norm(taus[j]))
           for i in range(n) for j in range(i + 1, n)]
    c = float(np.mean(cos))
    t = n * c / (1 + (n - 1) * c)
    if clamp:
        t = min(1.0, max(0.0, t))
    avg = np.mean([m.double().numpy().reshape(-1) for m in models], axis=0)
    return torch.from_numpy((t * avg + (1 - t) * b).reshape(base.shape)), c, t


@pytest.mark.parametrize("n", [2, 3])
def test_matches_float64_oracle(n):
    expected, c, t = oracle(BASE, MODELS[:n])
    assert 0 < t < 1
    torch.testing.assert_close(run("model_stock", BASE, MODELS[:n]).double(), expected, rtol=1e-5, atol=1e-6)


def test_two_models_use_t_equal_two_c_over_one_plus_c():
    _, c, t = oracle(BASE, MODELS[:2])
    assert t == pytest.approx(2 * c / (1 + c))
    out = run("model_stock", BASE, MODELS[:2])
    avg = (MODELS[0] + MODELS[1]) / 2
    torch.testing.assert_close(out, BASE + (2 * c / (1 + c)) * (avg - BASE), rtol=1e-5, atol=1e-6)


def test_identical_models_give_that_model():
    torch.testing.assert_close(run("model_stock", BASE, [MODELS[0]] * 3), MODELS[0], rtol=1e-6, atol=1e-6)


def test_orthogonal_task_vectors_give_the_base():
    base = rand(6, 6, seed=9)
    e = torch.eye(6)
    models = [base + 0.5 * e[0].reshape(1, 6).expand(6, 6) * (torch.arange(6) == 0).float().reshape(6, 1),
              base + 0.3 * torch.diag(torch.tensor([0.0, 1, 0, 0, 0, 0])),
              base + 0.2 * torch.diag(torch.tensor([0.0, 0, 1, 0, 0, 0]))]
    assert torch.equal(run("model_stock", base, models), base)


def test_invariant_to_scaling_all_task_vectors():
    scaled = [BASE + 3.0 * (m - BASE) for m in MODELS]
    _, c1, _ = oracle(BASE, MODELS)
    _, c3, _ = oracle(BASE, scaled)
    assert c1 == pytest.approx(c3)
    out1 = run("model_stock", BASE, MODELS)
    out3 = run("model_stock", BASE, scaled)
    torch.testing.assert_close(out3 - BASE, 3.0 * (out1 - BASE), rtol=1e-4, atol=1e-5)


NEG_TAU = MODELS[0] - BASE
NEGATIVE = [BASE + NEG_TAU, BASE - 0.5 * NEG_TAU + 0.05 * rand(10, 8, seed=7)]  # mean cosine c < 0


@pytest.mark.parametrize("chunks", [1, 3])
@pytest.mark.parametrize("params", [{}, {"semantics": "paper"}, {"semantics": "mergekit"},
                                    {"semantics": "paper", "clamp_t": False}])
def test_negative_mean_cosine_extrapolates_without_a_clamp(params, chunks):
    """The paper's t = N c / (1 + (N-1) c) is not clamped (nor in mergekit or FusionBench): c < 0 gives
    t < 0, a step from the base away from the models' average, by default and under both semantics."""
    expected, c, t = oracle(BASE, NEGATIVE)
    assert c < 0 and t < -0.1
    out = run("model_stock", BASE, NEGATIVE, params, chunks=chunks)
    assert not torch.equal(out, BASE)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunks", [1, 3])
@pytest.mark.parametrize("semantics", ["paper", "mergekit"])
def test_clamp_t_gives_the_base_for_negative_cosines_and_changes_nothing_else(semantics, chunks):
    params = {"semantics": semantics, "clamp_t": True}
    assert torch.equal(run("model_stock", BASE, NEGATIVE, params, chunks=chunks), BASE)
    expected, _, t = oracle(BASE, MODELS)
    assert 0 < t < 1  # inside [0, 1] the clamp is the identity
    out = run("model_stock", BASE, MODELS, params, chunks=chunks)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(out, run("model_stock", BASE, MODELS, {"semantics": semantics}, chunks=chunks))


def test_three_models_with_negative_mean_cosine():
    """N = 3 and -1/2 < c < 0: t = 3c / (1 + 2c) < 0, per the float64 oracle."""
    a, b = rand(10, 8, seed=20), rand(10, 8, seed=21)
    models = [BASE + a, BASE - 0.8 * a + 0.3 * b, BASE + 0.2 * a - b]
    expected, c, t = oracle(BASE, models)
    assert -0.5 < c < 0 and t < 0
    assert t == pytest.approx(3 * c / (1 + 2 * c))
    torch.testing.assert_close(run("model_stock", BASE, models).double(), expected, rtol=1e-5, atol=1e-6)


def test_opposite_task_vectors_hit_the_singular_ratio_and_give_the_base():
    """N = 2, c = -1: 1 + c = 0, no finite t; the base comes back (mergekit's guard)."""
    models = [BASE + NEG_TAU, BASE - NEG_TAU]
    assert torch.equal(run("model_stock", BASE, models), BASE)


def test_defaults_are_mergekit_semantics_without_a_clamp():
    from mergelab.methods.registry import get_method

    m = get_method("model_stock")
    assert m.param("semantics").default == "mergekit"
    assert m.param("clamp_t").default is False


def test_filter_wise_is_per_row():
    out = run("model_stock", BASE, MODELS, {"filter_wise": True})
    for r in range(BASE.shape[0]):
        expected, _, _ = oracle(BASE[r], [m[r] for m in MODELS])
        torch.testing.assert_close(out[r].double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("filter_wise", [False, True])
@pytest.mark.parametrize("shape", [(10, 8), (30,), (4, 3, 5)])
def test_row_chunks_agree(filter_wise, shape):
    base = rand(*shape, seed=11)
    shared = rand(*shape, seed=12)
    models = [base + shared + rand(*shape, seed=s) for s in (13, 14)]
    whole = run("model_stock", base, models, {"filter_wise": filter_wise})
    torch.testing.assert_close(run("model_stock", base, models, {"filter_wise": filter_wise}, chunks=3), whole,
                               rtol=1e-6, atol=1e-6)
