"""breadcrumbs, breadcrumbs_ties: kept fractions, boundaries, tiny tensors, per-row paper masks, chunking."""

import numpy as np
import pytest
import torch

from mergelab.methods.select import rank_windows, window_mask
from tests.methods.mergekit_family_util import run


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


BASE = rand(12, 20, seed=1)
MODELS = [BASE + 0.1 * rand(12, 20, seed=s) for s in (2, 3, 4)]


def kept(out, base):
    return (out - base) != 0


def mergekit_mask_oracle(tau: np.ndarray, density: float, gamma: float) -> np.ndarray:
    """mergekit 0.1.5 magnitude_outliers, written independently: ascending sort, keep [n_bot, n_bot+target)."""
    flat = np.abs(tau.reshape(-1))
    n = flat.size
    if density >= 1:
        return np.ones_like(tau, dtype=bool)
    target = int(density * n)
    n_top = int(gamma * n)
    n_bot = max(0, n - target - n_top)
    order = np.argsort(flat, kind="stable")
    mask = np.zeros(n, dtype=bool)
    mask[order[n_bot:n_bot + target]] = True
    return mask.reshape(tau.shape)


@pytest.mark.parametrize("density,gamma", [(0.5, 0.1), (0.9, 0.01), (0.3, 0.0), (0.2, 0.9), (1.0, 0.3), (0.0, 0.1)])
def test_mergekit_semantics_matches_independent_oracle(density, gamma):
    w = [1.0, 0.5, 2.0]
    out = run("breadcrumbs", BASE, MODELS, {"lambda": 0.8},
              [{"weight": wi, "density": density, "gamma": gamma} for wi in w])
    b = BASE.double().numpy()
    merged = np.zeros_like(b)
    for wi, m in zip(w, MODELS):
        tau = m.double().numpy() - b
        merged += wi * tau * mergekit_mask_oracle(tau, density, gamma)
    np.testing.assert_allclose(out.double().numpy(), b + 0.8 * merged, rtol=1e-6, atol=1e-6)


def test_kept_fraction_is_floor_density_times_numel():
    for density in (0.1, 0.37, 0.5, 0.99):
        out = run("breadcrumbs", BASE, MODELS[:1], None, {"weight": 1.0, "density": density, "gamma": 0.05})
        assert int(kept(out, BASE).sum()) == int(density * BASE.numel())


def test_kept_magnitudes_lie_between_the_removed_tails():
    tau = MODELS[0] - BASE
    out = run("breadcrumbs", BASE, MODELS[:1], None, {"weight": 1.0, "density": 0.6, "gamma": 0.1})
    keep = kept(out, BASE)
    mag = tau.abs()
    removed_top = mag[~keep & (mag >= mag[keep].max())]
    removed_bottom = mag[~keep & (mag <= mag[keep].min())]
    assert removed_top.numel() == int(0.1 * mag.numel())
    assert removed_bottom.numel() == mag.numel() - int(0.6 * mag.numel()) - int(0.1 * mag.numel())
    assert mag[keep].min() >= removed_bottom.max() and mag[keep].max() <= removed_top.min()


def test_gamma_zero_is_magnitude_top_k():
    tau = (MODELS[1] - BASE).reshape(-1)
    out = run("breadcrumbs", BASE, MODELS[1:2], None, {"weight": 1.0, "density": 0.25, "gamma": 0.0})
    k = int(0.25 * tau.numel())
    top = torch.zeros_like(tau, dtype=torch.bool)
    top[tau.abs().topk(k).indices] = True
    assert torch.equal(kept(out, BASE).reshape(-1), top)


@pytest.mark.parametrize("semantics", ["mergekit", "paper"])
def test_tiny_tensor_keeps_its_density_not_nothing(semantics):
    # Regression: mergekit < 0.1.5 sliced [n_bot:-n_top] and dropped everything when int(gamma*n) == 0.
    base = torch.zeros(7)
    model = torch.tensor([0.5, -0.1, 0.3, -0.7, 0.2, 0.05, -0.4])
    out = run("breadcrumbs", base, [model], {"semantics": semantics}, {"weight": 1.0, "density": 0.5, "gamma": 0.01})
    assert out.tolist() == pytest.approx([0.5, 0.0, 0.0, -0.7, 0.0, 0.0, -0.4])  # the int(3.5) = 3 largest


def test_density_one_keeps_everything_with_mergekit_but_not_with_paper():
    p = {"weight": 1.0, "density": 1.0, "gamma": 0.1}
    assert torch.equal(run("breadcrumbs", BASE, MODELS[:1], None, p), MODELS[0])
    out = run("breadcrumbs", BASE, MODELS[:1], {"semantics": "paper"}, p)
    per_row_dropped = (~kept(out, BASE)).sum(dim=1)
    assert per_row_dropped.tolist() == [int(0.1 * 20)] * 12  # the top gamma of each row goes


def test_paper_semantics_is_per_row_remove_top_then_keep_largest():
    density, gamma = 0.4, 0.15
    out = run("breadcrumbs", BASE, MODELS[:2], {"semantics": "paper"},
              [{"weight": 1.0, "density": density, "gamma": gamma}] * 2)
    expected = BASE.double().clone()
    for m in MODELS[:2]:
        tau = (m - BASE).double()
        for r in range(tau.shape[0]):
            row = tau[r].tolist()
            order = sorted(range(len(row)), key=lambda j: -abs(row[j]))  # largest first
            n_top, keep = int(20 * gamma), int(20 * density)
            for j in order[n_top:n_top + keep]:
                expected[r, j] += row[j]
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-6)


def test_zero_dim_tensor_kept_by_paper_dropped_by_mergekit_below_density_one():
    base, model = torch.tensor(1.0), torch.tensor(1.5)
    p = {"weight": 1.0, "density": 0.9, "gamma": 0.01}
    assert float(run("breadcrumbs", base, [model], None, p)) == 1.0  # int(0.9 * 1) = 0 kept
    assert float(run("breadcrumbs", base, [model], {"semantics": "paper"}, p)) == 1.5


@pytest.mark.parametrize("shape", [(12, 20), (60,), (6, 4, 5)])
@pytest.mark.parametrize("semantics", ["mergekit", "paper"])
def test_row_chunks_give_the_same_tensor(shape, semantics):
    base = rand(*shape, seed=5)
    models = [base + rand(*shape, seed=s) for s in (6, 7)]
    mp = [{"weight": 1.0, "density": 0.45, "gamma": 0.1}, {"weight": 0.7, "density": 0.8, "gamma": 0.02}]
    whole = run("breadcrumbs_ties", base, models, {"semantics": semantics}, mp)
    assert torch.equal(run("breadcrumbs_ties", base, models, {"semantics": semantics}, mp, chunks=4), whole)


def test_magnitude_ties_keep_exact_counts_whole_and_chunked():
    # Many equal magnitudes straddle both boundaries; exactly int(d*n) entries survive, chunked or not.
    base = torch.zeros(10, 6)
    model = torch.tensor([1.0, -1.0, 2.0, 2.0, -2.0, 3.0] * 10).reshape(10, 6)
    p = {"weight": 1.0, "density": 0.5, "gamma": 0.2}
    whole = run("breadcrumbs", base, [model], None, p)
    assert int((whole != 0).sum()) == 30
    assert int((whole.abs() == 3.0).sum()) == 0 and int((whole.abs() == 2.0).sum()) == 28  # 12 threes dropped
    assert torch.equal(run("breadcrumbs", base, [model], None, p, chunks=10), whole)  # one row per chunk


@pytest.mark.parametrize("bounds", [[(5, 40), (0, 11)], [(62, 63), (3, 62)], [(0, 63), (20, 20)]])
@pytest.mark.parametrize("single", [False, True])
def test_rank_windows_match_a_sort_by_magnitude_then_position(bounds, single):
    g = torch.Generator().manual_seed(3)
    values = torch.randint(-4, 5, (2, 9, 7), generator=g).float()  # heavy ties, zeros included
    values[1, 8, 6] = 0.5  # a unique smallest non-zero magnitude
    flat = values.reshape(2, -1)
    chunks = [(0, 9)] if single else [(0, 4), (4, 5), (5, 9)]
    stream = lambda: ((r0, values[:, r0:r1]) for r0, r1 in chunks)  # noqa: E731
    windows = rank_windows(stream, bounds, flat.shape[1], single=single)
    mask = torch.cat([window_mask(values[:, r0:r1], r0, windows) for r0, r1 in chunks], dim=1).reshape(2, -1)
    for i, (start, stop) in enumerate(bounds):
        order = sorted(range(flat.shape[1]), key=lambda j: (-abs(float(flat[i, j])), j))
        expected = torch.zeros(flat.shape[1])
        expected[order[start:stop]] = 1
        assert torch.equal(mask[i], expected)


def test_breadcrumbs_ties_by_hand():
    base = torch.zeros(5)
    a = torch.tensor([0.5, -0.2, 0.0, 0.4, 9.0])
    b = torch.tensor([-0.3, -0.1, 0.2, 0.1, 8.0])
    p = [{"weight": 1.0, "density": 0.8, "gamma": 0.2}] * 2  # n=5: drop the 1 largest, keep 4
    # a keeps [0.5, -0.2, 0.0, 0.4, 0]; b keeps [-0.3, -0.1, 0.2, 0.1, 0]
    # signs: + , -, +, +, (0 -> +); agreeing sums: 0.5, -0.3, 0.2, 0.5, 0
    out = run("breadcrumbs_ties", base, [a, b], None, p)
    torch.testing.assert_close(out, torch.tensor([0.5, -0.3, 0.2, 0.5, 0.0]))
    out = run("breadcrumbs_ties", base, [a, b], {"normalize": True}, p)
    torch.testing.assert_close(out, torch.tensor([0.5, -0.15, 0.2, 0.25, 0.0]))


def test_rescale_restores_each_task_vectors_l1_norm():
    out = run("breadcrumbs", BASE, MODELS[:1], {"rescale": True}, {"weight": 1.0, "density": 0.3, "gamma": 0.05})
    torch.testing.assert_close((out - BASE).abs().sum(), (MODELS[0] - BASE).abs().sum(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
def test_rescale_cannot_be_honoured_by_paper_semantics(method):
    from mergelab.errors import RecipeError

    with pytest.raises(RecipeError, match=r"'rescale'.*semantics: paper"):
        run(method, BASE, MODELS[:2], {"rescale": True, "semantics": "paper"},
            {"weight": 1.0, "density": 0.3, "gamma": 0.05})


def test_merge_without_prepared_statistics_computes_them_for_a_whole_tensor_only():
    from mergelab.methods.registry import get_method
    from tests.methods.mergekit_family_util import inputs

    p = {"weight": 1.0, "density": 0.5, "gamma": 0.1}
    m = get_method("breadcrumbs")
    x = inputs("breadcrumbs", BASE, MODELS[:1], None, p)
    assert torch.equal(m.merge(x), run("breadcrumbs", BASE, MODELS[:1], None, p))
    chunk = inputs("breadcrumbs", BASE[:4], [MODELS[0][:4]], None, p)
    chunk.shape, chunk.rows = tuple(BASE.shape), (0, 4)
    with pytest.raises(RuntimeError, match="prepare_tensor"):
        m.merge(chunk)
