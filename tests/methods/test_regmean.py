"""RegMean (methods/regmean.py): the spec's identities, checked against independent least-squares oracles."""

import numpy as np
import pytest
import torch

from mergelab.errors import RecipeError
from mergelab.methods.registry import TensorInputs, get_method
from mergelab.methods.regmean import regmean_solve, shrink

torch.set_num_threads(1)


def gram(x):
    return (x.T @ x / x.shape[0]).float()


def merge(name, models, grams, **params):
    m = get_method("regmean")
    glob = {p.name: params.pop(p.name, p.default) for p in m.params}
    weights = params.pop("weight", [1.0] * len(models))
    assert not params
    x = TensorInputs(name=name, shape=tuple(models[0].shape), base=None, models=list(models), params=glob,
                     model_params=[{"statistics": "s", "weight": w} for w in weights],
                     rows=(0, models[0].shape[0] if models[0].dim() else 0), aux={"statistics": list(grams)})
    return m.merge(x)


def test_disjoint_input_subspaces_recover_both_solutions_exactly():
    g = torch.Generator().manual_seed(0)
    d_in, d_out, k, n = 10, 6, 4, 50
    x1 = torch.zeros(n, d_in, dtype=torch.float64)
    x1[:, :k] = torch.randn(n, k, generator=g, dtype=torch.float64)
    x2 = torch.zeros(n, d_in, dtype=torch.float64)
    x2[:, k:] = torch.randn(n, d_in - k, generator=g, dtype=torch.float64)
    w1 = torch.randn(d_out, d_in, generator=g)  # nn.Linear layout [d_out, d_in]
    w2 = torch.randn(d_out, d_in, generator=g)
    merged = merge("layer.weight", [w1, w2], [gram(x1), gram(x2)], alpha=1.0)
    # input coordinates 0..k-1 are model 1's, k..d-1 model 2's (columns of the nn.Linear weight)
    torch.testing.assert_close(merged[:, :k], w1[:, :k], atol=1e-5, rtol=0)
    torch.testing.assert_close(merged[:, k:], w2[:, k:], atol=1e-5, rtol=0)
    for x, w in ((x1, w1), (x2, w2)):
        residual = (x.float() @ merged.T - x.float() @ w.T).abs().max()
        assert residual < 1e-5


def test_matches_stacked_least_squares_oracle():
    """alpha = 1 with mean Grams minimises sum_i ||X_i W - X_i W_i||^2 / n_i: numpy lstsq on stacked data."""
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(n, 7, generator=g, dtype=torch.float64) * s for n, s in ((30, 1.0), (45, 2.0), (20, 0.5))]
    ws = [torch.randn(5, 7, generator=g) for _ in xs]
    merged = merge("w", ws, [gram(x) for x in xs], alpha=1.0)
    a = np.vstack([x.numpy() / np.sqrt(len(x)) for x in xs])
    b = np.vstack([(x.numpy() @ w.double().numpy().T) / np.sqrt(len(x)) for x, w in zip(xs, ws)])
    oracle = np.linalg.lstsq(a, b, rcond=None)[0].T
    np.testing.assert_allclose(merged.numpy(), oracle, atol=2e-5)


@pytest.mark.parametrize("alpha", [1.0, 0.5, 0.0])
def test_identical_models_give_themselves_back(alpha):
    g = torch.Generator().manual_seed(2)
    w = torch.randn(4, 6, generator=g)
    grams = [gram(torch.randn(20, 6, generator=g, dtype=torch.float64)) for _ in range(3)]
    torch.testing.assert_close(merge("w", [w, w.clone(), w.clone()], grams, alpha=alpha), w, atol=1e-5, rtol=1e-5)


def test_alpha_zero_is_rowwise_diagonal_weighted_mean():
    g = torch.Generator().manual_seed(3)
    ws = [torch.randn(3, 5, generator=g) for _ in range(2)]
    grams = [gram(torch.randn(15, 5, generator=g, dtype=torch.float64) * (i + 1)) for i in range(2)]
    merged = merge("w", ws, grams, alpha=0.0)
    d = [gr.diagonal() for gr in grams]
    expected = (d[0] * ws[0] + d[1] * ws[1]) / (d[0] + d[1])  # input coordinate j is column j
    torch.testing.assert_close(merged, expected, atol=1e-6, rtol=1e-5)


def test_shared_inputs_give_the_plain_average():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(40, 6, generator=g, dtype=torch.float64)
    ws = [torch.randn(4, 6, generator=g) for _ in range(3)]
    merged = merge("w", ws, [gram(x)] * 3, alpha=1.0)
    torch.testing.assert_close(merged, sum(ws) / 3, atol=1e-5, rtol=1e-5)


def test_shrinkage_scales_only_off_diagonal():
    gm = torch.arange(9.0).reshape(3, 3)
    s = shrink(gm, 0.25)
    assert torch.equal(s.diagonal(), gm.diagonal())
    off = ~torch.eye(3, dtype=torch.bool)
    torch.testing.assert_close(s[off], gm[off] * 0.25)


def test_model_weights_scale_the_grams():
    """c = (3/4, 1/4) equals duplicating model 1 three times with uniform weights."""
    g = torch.Generator().manual_seed(5)
    ws = [torch.randn(3, 4, generator=g) for _ in range(2)]
    grams = [gram(torch.randn(10, 4, generator=g, dtype=torch.float64)) for _ in range(2)]
    weighted = merge("w", ws, grams, alpha=0.7, weight=[3.0, 1.0])
    dup = merge("w", [ws[0]] * 3 + [ws[1]], [grams[0]] * 3 + [grams[1]], alpha=0.7)
    torch.testing.assert_close(weighted, dup, atol=1e-5, rtol=1e-5)


def test_non_linear_tensors_are_averaged():
    b = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0])]
    marker = [torch.tensor(10.0), torch.tensor(99.0)]  # 0-d entries: row counts, not weights
    torch.testing.assert_close(merge("layer.bias", b, marker), torch.tensor([2.0, 4.0]))
    torch.testing.assert_close(merge("layer.bias", b, marker, weight=[1.0, 3.0]), torch.tensor([2.5, 5.0]))


def test_conv1d_layout_is_the_regression_layout():
    """GPT-2 Conv1D stores [d_in, d_out]: the merge must equal the nn.Linear merge of the transposes."""
    g = torch.Generator().manual_seed(6)
    ws = [torch.randn(5, 5, generator=g) for _ in range(2)]  # square: layout decided by the name
    grams = [gram(torch.randn(12, 5, generator=g, dtype=torch.float64)) for _ in range(2)]
    as_conv = merge("h.0.attn.c_proj.weight", ws, grams, alpha=1.0)
    as_linear = merge("h.0.attn.other.weight", [w.T for w in ws], grams, alpha=1.0)
    torch.testing.assert_close(as_conv, as_linear.T, atol=1e-5, rtol=1e-5)
    forced = merge("anything.weight", ws, grams, alpha=1.0, layout="conv1d")
    torch.testing.assert_close(forced, as_conv)
    rect = [torch.randn(5, 8, generator=g) for _ in range(2)]  # [d_in=5, d_out=8]: found from the Gram size
    torch.testing.assert_close(merge("x.weight", rect, grams, alpha=1.0),
                               merge("y.weight", [w.T for w in rect], grams, alpha=1.0).T, atol=1e-5, rtol=1e-5)


def test_bad_statistics_are_explained():
    w = [torch.randn(3, 4), torch.randn(3, 4)]
    with pytest.raises(RecipeError, match="matches neither input dimension"):
        merge("w", w, [torch.eye(5), torch.eye(5)])
    with pytest.raises(RecipeError, match="for some models"):
        merge("w", w, [torch.eye(4), torch.tensor(3.0)])
    with pytest.raises(RecipeError, match="no statistics"):
        merge("w", w, [torch.eye(4)])


def test_singular_system_falls_back_to_pseudo_inverse():
    """A never-seen input coordinate (zero Gram row) must not blow up: pinv gives the min-norm solution."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(20, 4, generator=g, dtype=torch.float64)
    x[:, 3] = 0
    ws = [torch.randn(2, 4, generator=g) for _ in range(2)]
    merged = merge("w", ws, [gram(x), gram(x)], alpha=1.0)
    assert torch.isfinite(merged).all()
    torch.testing.assert_close(merged[:, :3], ((ws[0] + ws[1]) / 2)[:, :3], atol=1e-5, rtol=1e-5)
    assert merged[:, 3].abs().max() < 1e-6


def test_regmean_solve_streams_two_accumulators():
    g = torch.Generator().manual_seed(8)
    ws = [torch.randn(6, 3, generator=g, dtype=torch.float64) for _ in range(4)]
    gs = [gram(torch.randn(30, 6, generator=g, dtype=torch.float64)).double() for _ in range(4)]
    direct = torch.linalg.solve(sum(shrink(x, 0.3) for x in gs), sum(shrink(x, 0.3) @ w for x, w in zip(gs, ws)))
    torch.testing.assert_close(regmean_solve(ws, gs, 0.3), direct)
