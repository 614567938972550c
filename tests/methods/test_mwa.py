"""MWA: weights by hand for the documented (unverified) formula, and the formula-independent invariants."""

import pytest
import torch

import mergelab
from mergelab.errors import RecipeError
from mergelab.methods.mwa import mwa_weights
from tests.methods.papers_support import merge_one, rand


def test_weights_by_hand():
    # loss: w ∝ (1/loss)^p; losses 1 and 2 with p = 1 -> 1 : 0.5 -> 2/3, 1/3.
    assert mwa_weights("loss", [1.0, 2.0], 1.0) == pytest.approx([2 / 3, 1 / 3])
    # step: w ∝ step^p; steps 100, 300 with p = 2 -> 1 : 9.
    assert mwa_weights("step", [100, 300], 2.0) == pytest.approx([0.1, 0.9])


def test_invariants_of_any_monotone_formula():
    losses = [0.9, 0.7, 0.8, 0.65]
    for p in (0.0, 0.5, 3.0):
        w = mwa_weights("loss", losses, p)
        assert sum(w) == pytest.approx(1.0)
        order = sorted(range(4), key=lambda i: losses[i])
        assert all(w[a] >= w[b] for a, b in zip(order, order[1:]))  # lower loss, more weight
    assert mwa_weights("loss", losses, 0.0) == pytest.approx([0.25] * 4)  # p = 0: uniform soup
    assert mwa_weights("step", [500] * 3, 4.0) == pytest.approx([1 / 3] * 3)  # equal metrics: uniform
    steps = [100, 200, 400]
    w = mwa_weights("step", steps, 1.5)
    assert w[0] <= w[1] <= w[2]
    # A large penalty concentrates the weight on the best checkpoint.
    assert mwa_weights("loss", losses, 200.0)[3] > 0.99


@pytest.mark.parametrize("chunk_rows", [None, 2])
def test_merge_is_the_weighted_average_and_ignores_the_base(chunk_rows):
    models = [rand(5, 3, seed=s) for s in (1, 2, 3)]
    out = merge_one("mwa", None, models, chunk_rows=chunk_rows, metric="step", step=[100, 200, 300], penalty=1.0)
    torch.testing.assert_close(out, (models[0] + 2 * models[1] + 3 * models[2]) / 6)
    with_base = merge_one("mwa", rand(5, 3, seed=9), models, metric="step", step=[100, 200, 300])
    torch.testing.assert_close(with_base, out)


def test_one_checkpoint_gives_it_back():
    m = rand(4, seed=5)
    assert torch.equal(merge_one("mwa", None, [m], loss=0.5), m)


def test_missing_metric_is_a_recipe_error():
    models = [rand(3, seed=s) for s in (1, 2)]
    with pytest.raises(RecipeError, match="loss"):
        merge_one("mwa", None, models, loss=[0.8, 0.0])
    with pytest.raises(RecipeError, match="step"):
        merge_one("mwa", None, models, metric="step", loss=[0.8, 0.9])


def test_reachable_from_the_python_api_with_per_model_losses():
    models = [{"w": rand(2, 2, seed=s)} for s in (1, 2)]
    out = mergelab.merge_state_dicts(None, models, "mwa", loss=[0.5, 1.0], penalty=2.0)
    torch.testing.assert_close(out["w"], 0.8 * models[0]["w"] + 0.2 * models[1]["w"])
