"""sce: a hand-worked example, identical task vectors, convexity, selection, the two semantics, chunking."""

import pytest
import torch

from tests.methods.mergekit_family_util import run


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


BASE = rand(10, 12, seed=1)
MODELS = [BASE + rand(10, 12, seed=s) for s in (2, 3, 4)]  # task vectors of scale 1


def test_by_hand():
    base = torch.zeros(4)
    a = torch.tensor([1.0, -2.0, 0.0, 1.0])
    b = torch.tensor([3.0, 2.0, -1.0, 0.0])
    # energies mean(a^2) = 1.5, mean(b^2) = 3.5 -> weights 0.3, 0.7
    # sums 4, 0, -1, 1 -> signs +, + (tie), -, +; zeros never agree; agreeing entries, renormalised:
    # [ (.3*1 + .7*3)/1, (.7*2)/.7, (.7*-1)/.7, (.3*1)/.3 ] = [2.4, 2, -1, 1]
    for semantics in ("mergekit", "paper"):
        out = run("sce", base, [a, b], {"semantics": semantics})
        torch.testing.assert_close(out, torch.tensor([2.4, 2.0, -1.0, 1.0]))


def test_identical_task_vectors_give_base_plus_that_vector():
    tau = MODELS[0] - BASE
    for semantics in ("mergekit", "paper"):
        out = run("sce", BASE, [BASE + tau] * 3, {"semantics": semantics, "select_topk": 0.3})
        if semantics == "paper":  # zero variance everywhere: nothing selected, uniform weights
            torch.testing.assert_close(out, BASE + tau)
        else:  # mergekit masks the (unselected) task vectors themselves: back to the base
            torch.testing.assert_close(out, BASE)
    torch.testing.assert_close(run("sce", BASE, [BASE + tau] * 3), BASE + tau)


def test_each_coordinate_is_a_convex_combination_of_the_agreeing_task_vectors():
    out = run("sce", BASE, MODELS, {"select_topk": 0.5, "semantics": "paper"})
    taus = torch.stack([m - BASE for m in MODELS])
    sign = torch.where(taus.sum(0) >= 0, 1.0, -1.0)
    agree = torch.sign(taus) == sign
    hi = torch.where(agree, taus, torch.full_like(taus, -float("inf"))).amax(0)
    lo = torch.where(agree, taus, torch.full_like(taus, float("inf"))).amin(0)
    delta = out - BASE
    assert torch.all((delta <= hi + 1e-6) & (delta >= lo - 1e-6))


def test_semantics_agree_without_selection_and_differ_with_it():
    a = run("sce", BASE, MODELS, {"semantics": "mergekit"})
    torch.testing.assert_close(run("sce", BASE, MODELS, {"semantics": "paper"}), a, rtol=0, atol=0)
    mk = run("sce", BASE, MODELS, {"semantics": "mergekit", "select_topk": 0.2})
    paper = run("sce", BASE, MODELS, {"semantics": "paper", "select_topk": 0.2})
    assert int((mk != BASE).sum()) == int(0.2 * BASE.numel())  # only selected positions move
    assert int((paper != BASE).sum()) > 0.9 * BASE.numel()  # selection only sets the weights


def test_zero_variance_positions_are_never_selected():
    base = torch.zeros(3, 4)
    taus = [rand(3, 4, seed=s) for s in (5, 6)]
    taus[1][0] = taus[0][0]  # row 0: all models agree exactly, variance 0
    out = run("sce", base, [base + t for t in taus], {"select_topk": 0.99})
    assert torch.equal(out[0], base[0])  # never selected, so masked out (mergekit semantics)
    assert int((out[1:] != 0).sum()) == int(8 * 0.99)  # k counts only positions that vary


def test_weights_follow_energy_with_paper_but_fall_back_to_uniform_with_mergekit_for_small_vectors():
    base = torch.zeros(50)
    a = torch.full((50,), 1e-4)
    b = torch.full((50,), 3e-4)
    # energies 1e-8 and 9e-8 sum below mergekit's 1e-6 cutoff: uniform weights, plain mean
    torch.testing.assert_close(run("sce", base, [a, b]), torch.full((50,), 2e-4))
    # paper: weights 0.1 / 0.9 -> 0.1 * 1e-4 + 0.9 * 3e-4
    torch.testing.assert_close(run("sce", base, [a, b], {"semantics": "paper"}), torch.full((50,), 2.8e-4))


@pytest.mark.parametrize("semantics", ["mergekit", "paper"])
@pytest.mark.parametrize("shape", [(10, 12), (60,), (4, 3, 5)])
def test_row_chunks_agree(semantics, shape):
    base = rand(*shape, seed=7)
    models = [base + rand(*shape, seed=s) for s in (8, 9, 10)]
    p = {"semantics": semantics, "select_topk": 0.4}
    whole = run("sce", base, models, p)
    torch.testing.assert_close(run("sce", base, models, p, chunks=3), whole, rtol=1e-6, atol=1e-6)


def test_fast_variance_is_torch_var_bit_for_bit():
    from mergelab.methods.sce import _variance

    g = torch.Generator().manual_seed(0)
    for n in (2, 3, 5, 8):
        d = (torch.randn(n, 20000, generator=g) * 0.01).bfloat16().float()
        assert torch.equal(_variance(d), torch.var(d, dim=0, unbiased=False))
