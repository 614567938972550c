"""Fisher merging (methods/fisher.py): closed forms and the posterior-product optimality condition."""

import math

import pytest
import torch

from mergelab.errors import RecipeError
from mergelab.methods.registry import ModelScope, TensorInputs, get_method


def run(models, fishers, name="w", **params):
    m = get_method("fisher")
    glob = {p.name: params.pop(p.name, p.default) for p in m.params}
    weights = params.pop("weight", [1.0] * len(models))
    assert not params
    x = TensorInputs(name=name, shape=tuple(models[0].shape), base=None, models=list(models), params=glob,
                     model_params=[{"statistics": "s", "weight": w} for w in weights],
                     rows=(0, models[0].shape[0]), aux={"statistics": list(fishers)})
    x.model_stats = m.prepare_model(ModelScope(glob, x.model_params, len(models), lambda: iter([x])))
    return m.merge(x)


def test_equal_fishers_give_the_weighted_average():
    g = torch.Generator().manual_seed(0)
    ms = [torch.randn(4, 5, generator=g) for _ in range(3)]
    f = torch.rand(4, 5, generator=g) + 0.1
    for normalize in (True, False):
        out = run(ms, [f, f.clone(), f.clone()], weight=[1.0, 2.0, 5.0], normalize=normalize)
        torch.testing.assert_close(out, (ms[0] + 2 * ms[1] + 5 * ms[2]) / 8, atol=1e-6, rtol=1e-6)


def test_zero_fisher_coordinate_takes_the_informed_model():
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([5.0, 7.0])
    fa, fb = torch.tensor([0.0, 1.0]), torch.tensor([3.0, 1.0])
    out = run([a, b], [fa, fb], eps_mode="add_all", epsilon=1e-12, normalize=False)
    assert abs(float(out[0]) - 5.0) < 1e-9
    assert abs(float(out[1]) - 4.5) < 1e-6


def test_floor_target_falls_back_to_model_zero():
    """Reference favor_target_model: only model 0 is floored; where the others have no Fisher, model 0 wins."""
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([5.0, 7.0])
    out = run([a, b], [torch.zeros(2), torch.tensor([0.0, 1.0])], normalize=False)
    assert float(out[0]) == pytest.approx(1.0)
    assert float(out[1]) == pytest.approx((1e-6 * 2 + 7) / (1e-6 + 1), rel=1e-6)
    both = run([a, b], [torch.zeros(2), torch.tensor([0.0, 1.0])], normalize=False, eps_mode="floor_all")
    assert float(both[0]) == pytest.approx(3.0)


def test_merge_maximises_the_gaussian_posterior_product():
    """theta* = argmin sum_i c_i sum_j F_ij (theta_j - theta_ij)^2: the gradient vanishes and a perturbation raises it."""
    g = torch.Generator().manual_seed(1)
    ms = [torch.randn(30, generator=g, dtype=torch.float64).float() for _ in range(4)]
    fs = [torch.rand(30, generator=g) * 3 for _ in range(4)]
    c = [0.5, 1.0, 2.0, 0.25]
    out = run(ms, fs, weight=c, normalize=False, eps_mode="add_all", epsilon=1e-9).double()

    def objective(theta):
        return sum(ci * (f.double() * (theta - m.double()) ** 2).sum() for ci, f, m in zip(c, fs, ms))

    grad = sum(2 * ci * f.double() * (out - m.double()) for ci, f, m in zip(c, fs, ms))
    assert grad.abs().max() < 1e-5
    base = objective(out)
    for _ in range(5):
        assert objective(out + 1e-3 * torch.randn(30, generator=g, dtype=torch.float64)) > base


def test_normalize_divides_by_each_models_whole_fisher_norm():
    """Two tensors split over chunks: the norm is over every merged tensor, so scaling F_1 changes nothing."""
    a, b = torch.tensor([0.0, 0.0]), torch.tensor([1.0, 1.0])
    fa, fb = torch.tensor([1.0, 3.0]), torch.tensor([2.0, 1.0])
    out1 = run([a, b], [fa, fb])
    out2 = run([a, b], [fa * 1000, fb])
    torch.testing.assert_close(out1, out2)
    na, nb = math.sqrt(10.0), math.sqrt(5.0)
    expected = (fb / nb) / (fa / na + fb / nb)
    torch.testing.assert_close(out1, expected.float(), atol=1e-6, rtol=1e-6)


def test_bad_fishers_are_explained():
    a = torch.zeros(2, 3)
    with pytest.raises(RecipeError, match="has shape"):
        run([a, a], [torch.eye(3), torch.eye(3)])
    with pytest.raises(RecipeError, match="negative"):
        run([a, a], [-torch.ones(2, 3), torch.ones(2, 3)])
    with pytest.raises(RecipeError, match="zero on every merged tensor"):
        run([a, a], [torch.zeros(2, 3), torch.ones(2, 3)])


def test_normalize_uses_the_whole_model_norm_across_tensors_and_chunks():
    """Through the engine: several tensors, merged whole and in row chunks. The oracle (written from the
    paper / reference `normalize_fishers`) divides each model's coefficient by the L2 norm of its Fisher
    over every merged tensor together, then takes the floored (model 0 only) Fisher-weighted mean."""
    import mergelab

    g = torch.Generator().manual_seed(7)
    shapes = {"model.layers.0.w": (16, 6), "model.layers.1.w": (9, 5), "model.norm.weight": (6,)}
    models = [{k: torch.randn(s, generator=g) for k, s in shapes.items()} for _ in range(3)]
    # Fishers of very different sizes per tensor and per model, with exact zeros, so that per-tensor
    # norms and whole-model norms give different merges.
    scale = {"model.layers.0.w": [1.0, 50.0, 0.2], "model.layers.1.w": [30.0, 0.5, 4.0], "model.norm.weight": [2.0, 2.0, 90.0]}
    fishers = []
    for i in range(3):
        f = {}
        for k, s in shapes.items():
            v = torch.rand(s, generator=g) * scale[k][i]
            v[v < 0.1 * scale[k][i]] = 0.0
            f[k] = v
        fishers.append(f)
    weights = [1.0, 0.5, 2.0]
    eps = 1e-6

    norms = [math.sqrt(sum(float((f[k].double() ** 2).sum()) for k in shapes)) for f in fishers]

    def oracle(k, norm_of):
        num = torch.zeros(shapes[k], dtype=torch.float64)
        den = torch.zeros(shapes[k], dtype=torch.float64)
        for i in range(3):
            f = fishers[i][k].double()
            if i == 0:
                f = torch.where(f < eps, torch.full_like(f, eps), f)
            c = weights[i] / norm_of(i, k)
            num += c * f * models[i][k].double()
            den += c * f
        return num / den

    per_tensor = lambda i, k: math.sqrt(float((fishers[i][k].double() ** 2).sum()))  # noqa: E731
    for chunk in (None, 12):
        out = mergelab.merge_state_dicts(None, models, "fisher", weight=weights, chunk_elements=chunk,
                                         aux={"statistics": fishers})
        for k in shapes:
            expected = oracle(k, lambda i, _k: norms[i])
            torch.testing.assert_close(out[k].double(), expected, atol=1e-6, rtol=1e-5)
            # the per-tensor normalisation is a different merge here: the test can tell them apart
            assert (oracle(k, per_tensor) - expected).abs().max() > 1e-2
