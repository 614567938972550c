"""della, della_linear: MagPrune probabilities, epsilon = 0 is DARE, unbiasedness, keep rates, validation."""

import math

import numpy as np
import pytest
import torch

from mergelab.errors import RecipeError
from mergelab.methods.della import keep_probabilities
from tests.methods.mergekit_family_util import run


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


BASE = rand(10, 16, seed=1)
MODELS = [BASE + 0.1 * rand(10, 16, seed=s) for s in (2, 3, 4)]


def test_keep_probabilities_follow_the_rank_ramp():
    delta = rand(5, 9, seed=8)
    d, e = 0.6, 0.2
    p = keep_probabilities(delta, d, e)
    for r in range(5):
        row = delta[r].tolist()
        ascending = sorted(range(9), key=lambda j: abs(row[j]))
        for rank, j in enumerate(ascending):  # rank 0 is the smallest magnitude
            assert float(p[r, j]) == pytest.approx(d - e + 2 * e * rank / 8, abs=1e-6)
    assert float(p.min()) == pytest.approx(d - e) and float(p.max()) == pytest.approx(d + e)
    assert p.mean(dim=1).tolist() == pytest.approx([d] * 5, abs=1e-6)


def test_one_d_tensors_are_one_row_and_single_column_rows_get_the_density():
    v = torch.tensor([0.3, -0.1, 0.2])
    assert keep_probabilities(v, 0.5, 0.1).tolist() == pytest.approx([0.6, 0.4, 0.5])
    assert keep_probabilities(rand(7, 1), 0.5, 0.1).flatten().tolist() == pytest.approx([0.5] * 7)
    assert keep_probabilities(torch.tensor(2.0), 0.3, 0.1).item() == pytest.approx(0.3)


@pytest.mark.parametrize("semantics", ["mergekit", "paper"])
def test_epsilon_zero_is_dare(semantics, monkeypatch):
    w = [{"weight": x, "density": 0.6, "epsilon": 0.0} for x in (1.0, 0.5, 0.8)]
    dare_w = [{"weight": x["weight"], "density": 0.6} for x in w]
    if semantics == "mergekit":
        # DELLA is tensor code; DARE's fused CPU kernels sum the L1 norms of mergekit's rescale in
        # float64, which moves the last bits (see mergelab.methods.fused): compare with the tensor code.
        from mergelab.methods import fused

        monkeypatch.setattr(fused, "_kernels", None)
        monkeypatch.setattr(fused, "_unavailable", True)
    lin = run("della_linear", BASE, MODELS, {"semantics": semantics}, w, seed=11)
    dare = run("dare_linear", BASE, MODELS, {"semantics": semantics}, dare_w, seed=11)
    assert torch.equal(lin, dare)
    if semantics == "mergekit":  # same consensus as mergekit's dare_ties once normalize agrees
        ties = run("della", BASE, MODELS, {"normalize": False}, w, seed=11)
        dare_ties = run("dare_ties", BASE, MODELS, None, dare_w, seed=11)
        assert torch.equal(ties, dare_ties)


def _sampled(tau, density, epsilon, semantics, rows=20000, seed=0):
    """della_linear of one model on a zero base with every row equal to ``tau``: one draw per row."""
    tau_rows = tau.expand(rows, -1).contiguous()
    return run("della_linear", torch.zeros_like(tau_rows), [tau_rows], {"semantics": semantics},
               {"weight": 1.0, "density": density, "epsilon": epsilon}, seed=seed)


def test_paper_rescale_is_unbiased():
    tau = torch.tensor([0.05, -0.4, 1.0, -0.02, 0.3, 0.7, -0.9, 0.15])
    d, e = 0.5, 0.3
    out = _sampled(tau, d, e, "paper")
    p = keep_probabilities(tau, d, e)
    se = tau.abs() * torch.sqrt((1 - p) / p) / math.sqrt(out.shape[0])
    assert torch.all((out.mean(0) - tau).abs() <= 4 * se + 1e-7), (out.mean(0), tau)


def test_keep_rate_is_the_density_and_the_largest_entry_is_kept_with_density_plus_epsilon():
    tau = torch.tensor([0.05, -0.4, 1.0, -0.02, 0.3, 0.7, -0.9, 0.15])
    d, e = 0.4, 0.25
    kept = (_sampled(tau, d, e, "paper") != 0).float()
    n = kept.shape[0]
    assert float(kept.mean()) == pytest.approx(d, abs=4 * math.sqrt(d * (1 - d) / kept.numel()))
    largest, smallest = int(tau.abs().argmax()), int(tau.abs().argmin())
    for col, p in ((largest, d + e), (smallest, d - e)):
        assert float(kept[:, col].mean()) == pytest.approx(p, abs=4 * math.sqrt(p * (1 - p) / n))


def test_mergekit_rescale_keeps_each_task_vectors_l1_norm():
    out = run("della_linear", BASE, MODELS[:1], None, {"weight": 1.0, "density": 0.3, "epsilon": 0.2})
    tau = MODELS[0] - BASE
    assert int(((out - BASE) != 0).sum()) < 0.6 * tau.numel()
    torch.testing.assert_close((out - BASE).abs().sum(), tau.abs().sum(), rtol=1e-5, atol=0)


def test_paper_rescale_divides_each_kept_entry_by_its_probability():
    tau = MODELS[0] - BASE
    out = run("della_linear", BASE, MODELS[:1], {"semantics": "paper"}, {"weight": 1.0, "density": 0.5, "epsilon": 0.2})
    p = keep_probabilities(tau, 0.5, 0.2)
    keep = (out - BASE) != 0
    torch.testing.assert_close((out - BASE)[keep], (tau / p)[keep], rtol=1e-5, atol=1e-6)


def test_della_elects_signs_and_averages_agreeing_entries():
    # density 1 keeps everything: della is then TIES without a trim (weighted disjoint mean).
    base = torch.zeros(4)
    a, b = torch.tensor([1.0, -2.0, 0.5, 0.0]), torch.tensor([3.0, 1.0, -1.0, 2.0])
    p = [{"weight": 1.0, "density": 1.0}, {"weight": 1.0, "density": 1.0}]
    out = run("della", base, [a, b], {"lambda": 2.0}, p)
    # sums 4, -1, -0.5, 2 -> signs +, -, -, +; agreeing means 2, -2, -1, 2; times lambda 2
    assert out.tolist() == [4.0, -4.0, -2.0, 4.0]


def test_same_seed_same_masks_other_seed_other_masks():
    p = [{"weight": 1.0, "density": 0.5, "epsilon": 0.1}] * 3
    a = run("della", BASE, MODELS, None, p, seed=1)
    assert torch.equal(a, run("della", BASE, MODELS, None, p, seed=1))
    assert not torch.equal(a, run("della", BASE, MODELS, None, p, seed=2))


def test_chunked_one_d_tensor_ranks_the_whole_vector():
    # A 1-D tensor split in chunks still ramps probabilities over the whole vector: the keep rate of the
    # largest half of the entries is about density + epsilon/2.
    tau = torch.linspace(-1, 1, 4001)
    tau = tau[tau != 0]
    d, e = 0.5, 0.4
    rates = []
    for seed in range(40):
        out = run("della_linear", torch.zeros_like(tau), [tau], {"semantics": "paper"},
                  {"weight": 1.0, "density": d, "epsilon": e}, chunks=4, seed=seed)
        rates.append(((out != 0) & (tau.abs() > 0.5)).sum() / (tau.abs() > 0.5).sum())
    assert float(torch.stack(rates).mean()) == pytest.approx(d + e / 2, abs=0.01)


def test_without_randomness_chunks_agree():
    p = [{"weight": 1.0, "density": 1.0}, {"weight": 0.5, "density": 0.0}]
    assert torch.equal(run("della", BASE, MODELS[:2], None, p), run("della", BASE, MODELS[:2], None, p, chunks=3))


@pytest.mark.parametrize("density,epsilon", [(0.1, 0.1), (0.9, 0.15), (0.5, 0.5), (0.05, 0.2)])
def test_density_plus_minus_epsilon_outside_unit_interval_is_rejected(density, epsilon):
    with pytest.raises(RecipeError, match="epsilon"):
        run("della", BASE, MODELS[:1], None, {"weight": 1.0, "density": density, "epsilon": epsilon})


def test_density_one_or_zero_accepts_any_epsilon():
    assert torch.equal(run("della", BASE, MODELS[:1], None, {"weight": 1.0, "density": 1.0, "epsilon": 0.15}),
                       MODELS[0])
    assert torch.equal(run("della", BASE, MODELS[:1], None, {"weight": 1.0, "density": 0.0, "epsilon": 0.15}), BASE)


def test_ascending_order_is_the_selection_order_reversed():
    """Ranks along a row: ``|x|`` ascending, equal magnitudes higher column first, so the top of the one
    selection order (``|x|`` descending, lower index first) gets the highest rank; the CPU fast path and
    the device-agnostic path agree."""
    from mergelab.methods.della import ascending_order

    g = torch.Generator().manual_seed(0)
    for shape in [(7, 5), (64, 1000), (3, 2)]:
        x = torch.randint(-3, 4, shape, generator=g).float() * 0.5  # many equal magnitudes
        x += (torch.rand(shape, generator=g) < 0.3).float() * torch.randn(shape, generator=g)
        a = x.abs().numpy()
        cols = shape[1]
        oracle = np.stack([np.lexsort((-np.arange(cols), a[r])) for r in range(shape[0])])  # |x| asc, col desc
        assert torch.equal(ascending_order(x), torch.from_numpy(oracle))
        assert torch.equal(ascending_order(x.double()), torch.from_numpy(oracle))  # the torch path
