"""VaRM (FuseChat 1.0): weights by hand and from loops written from the reference's analysis/merge math."""

import math

import pytest
import torch

import mergelab
from mergelab.errors import RecipeError
from mergelab.methods.varm import varm_weights
from tests.methods.papers_support import merge_model, merge_one, rand


def test_tensor_weights_by_hand():
    # u_1 = mean((1,1)^2) = 1, u_2 = mean((2,0)^2) = 2: weights 1/3, 2/3 of the full target weights.
    base = torch.zeros(2)
    m1, m2 = torch.tensor([1.0, 1.0]), torch.tensor([2.0, 0.0])
    out = merge_one("varm", base, [m1, m2])
    torch.testing.assert_close(out, torch.tensor([5 / 3, 1 / 3]))
    # abs: u = 1, 1 -> uniform; signed: |mean| = 1, 1 -> uniform.
    torch.testing.assert_close(merge_one("varm", base, [m1, m2], statistic="abs"), (m1 + m2) / 2)
    torch.testing.assert_close(merge_one("varm", base, [m1, m2], statistic="signed"), (m1 + m2) / 2)
    # softmax(u / temp) with temp 0.5: e^2 / (e^2 + e^4).
    w1 = math.exp(2) / (math.exp(2) + math.exp(4))
    out = merge_one("varm", base, [m1, m2], softmax=True, temperature=0.5)
    torch.testing.assert_close(out, w1 * m1 + (1 - w1) * m2)


def test_a_target_equal_to_the_pivot_gives_uniform_weights():
    base = rand(4, 3, seed=1)
    other = base + rand(4, 3, seed=2)
    torch.testing.assert_close(merge_one("varm", base, [base.clone(), other]), (base + other) / 2)


def loop_weights(base, models, granularity, names_layers=None):
    # Test oracle from FuseChat's analysis.py (key_to_params = sum((p2-p1)^2) / numel, layer sums of
    # key means, model = total sum / total numel) and merge.py (weights = u / sum u; uniform if any 0).
    def mean_sq(b, m):
        total = 0.0
        for x, y in zip(b.reshape(-1).tolist(), m.reshape(-1).tolist()):
            total += (y - x) ** 2
        return total / b.numel()

    def norm(u):
        return [1 / len(u)] * len(u) if any(v == 0 for v in u) else [v / sum(u) for v in u]

    if granularity == "model":
        tot = [sum(mean_sq(base[k], m[k]) * base[k].numel() for k in base) for m in models]
        count = sum(base[k].numel() for k in base)
        return {k: norm([t / count for t in tot]) for k in base}
    per_layer = {}
    for k, layer in names_layers.items():
        if layer is not None:
            per_layer.setdefault(layer, [0.0] * len(models))
            for i, m in enumerate(models):
                per_layer[layer][i] += mean_sq(base[k], m[k])
    return {k: (norm(per_layer[layer]) if layer is not None else [1 / len(models)] * len(models))
            for k, layer in names_layers.items()}


def _model(seed):
    base = {"model.layers.0.a": rand(4, 3, seed=seed), "model.layers.0.b": rand(5, seed=seed + 1),
            "model.layers.1.a": rand(4, 3, seed=seed + 2), "model.norm.weight": rand(3, seed=seed + 3)}
    layers = {"model.layers.0.a": 0, "model.layers.0.b": 0, "model.layers.1.a": 1, "model.norm.weight": None}
    models = [{k: v + s * rand(*v.shape, seed=seed + 10 * i + j) for j, (k, v) in enumerate(base.items())}
              for i, s in enumerate((0.1, 0.3, 0.2))]
    return base, models, layers


@pytest.mark.parametrize("granularity", ["model", "layer"])
@pytest.mark.parametrize("chunk_rows", [None, 2])
def test_model_and_layer_granularity_match_loops(granularity, chunk_rows):
    base, models, layers = _model(3)
    tensors = {k: {"base": base[k], "models": [m[k] for m in models], "layer": layers[k]} for k in base}
    out = merge_model("varm", tensors, num_layers=2, chunk_rows=chunk_rows, granularity=granularity)
    weights = loop_weights(base, models, granularity, layers)
    for k in base:
        expect = sum(w * m[k] for w, m in zip(weights[k], models))
        torch.testing.assert_close(out[k], expect, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk_rows", [None, 3])
def test_tensor_granularity_chunked_equals_whole(chunk_rows):
    base = rand(7, 4, seed=1)
    models = [base + s * rand(7, 4, seed=2 + i) for i, s in enumerate((0.1, 0.4))]
    u = [float(((m - base) ** 2).mean()) for m in models]
    expect = sum(w * m for w, m in zip([v / sum(u) for v in u], models))
    torch.testing.assert_close(merge_one("varm", base, models, chunk_rows=chunk_rows), expect)


def test_element_granularity_by_hand_and_untouched_entries_stay_at_the_pivot():
    base = torch.zeros(3)
    m1, m2 = torch.tensor([1.0, 0.0, 3.0]), torch.tensor([3.0, 0.0, 0.0])
    # entry 0: weights 1/10, 9/10 -> 0.1 + 2.7 = 2.8; entry 1: nobody moved -> pivot (0); entry 2: all m1.
    torch.testing.assert_close(merge_one("varm", base, [m1, m2], granularity="element"),
                               torch.tensor([2.8, 0.0, 3.0]))
    # abs: entry 0 weights 1/4, 3/4 -> 0.25 + 2.25 = 2.5.
    out = merge_one("varm", base, [m1, m2], granularity="element", statistic="abs")
    torch.testing.assert_close(out, torch.tensor([2.5, 0.0, 3.0]))


def test_weights_sum_to_one_and_output_is_within_the_targets():
    base = rand(6, 5, seed=4)
    models = [base + s * rand(6, 5, seed=5 + i) for i, s in enumerate((0.1, 0.5, 0.2))]
    for g in ("tensor", "element"):
        out = merge_one("varm", base, models, granularity=g)
        stack = torch.stack(models)
        assert bool((out <= stack.max(0).values + 1e-6).all()) and bool((out >= stack.min(0).values - 1e-6).all())
    w = varm_weights([0.3, 0.1, 0.6], False, 1.0)
    assert sum(w) == pytest.approx(1.0) and w == pytest.approx([0.3, 0.1, 0.6])
    assert sum(varm_weights([1e-8, 3e-8], True, 1.0)) == pytest.approx(1.0)


def test_bad_combinations_raise_recipe_errors():
    with pytest.raises(RecipeError, match="statistic"):
        merge_one("varm", torch.zeros(2), [torch.ones(2)], granularity="element", statistic="signed")
    with pytest.raises(RecipeError, match="softmax"):
        merge_one("varm", torch.zeros(2), [torch.ones(2)], granularity="element", softmax=True)


def test_reachable_from_the_python_api():
    base, models, layers = _model(7)
    out = mergelab.merge_state_dicts(base, models, "varm", granularity="layer")
    weights = loop_weights(base, models, "layer", layers)
    for k in base:
        torch.testing.assert_close(out[k], sum(w * m[k] for w, m in zip(weights[k], models)), rtol=1e-5, atol=1e-6)
