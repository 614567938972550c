"""WIDEN: against a test oracle written from MergeLLM's widen_merging math, hand-worked cases, invariants."""

import math

import numpy as np
import pytest
import torch

import mergelab
from mergelab.errors import RecipeError
from mergelab.methods.widen import column_weights
from tests.methods.papers_support import merge_one, rand


# ----------------------------------------------------------------------------- test oracle
# Written from the math of yule-BUAA/MergeLLM ``widen_merging`` (float64 numpy, explicit steps):
# column norms, direction = W / norm, cosine of directions, stable-argsort ranks / in_dim, softmax over
# models, above-average calibration, omega = mean of the magnitude and direction scores.
def _softmax0(x):
    e = np.exp(x - x.max(0, keepdims=True))
    return e / e.sum(0, keepdims=True)


def _scores(sig, ratio=1.0, calib=1.0):
    s = _softmax0(sig)
    mask = sig > sig.mean(1, keepdims=True) * ratio
    s[mask] = calib
    return s


def _rank_scores(diff, ratio=1.0, calib=1.0):
    # Ranks pos / k; "above average" compares integer positions with the exact mean position (k-1)/2
    # (the reference's float32 mean makes the middle position's test depend on rounding).
    n, k = diff.shape
    pos = np.zeros(diff.shape, dtype=np.int64)
    for t in range(n):
        order = np.argsort(diff[t], kind="stable")
        for p, j in enumerate(order):
            pos[t, j] = p
    s = _softmax0(pos / k)
    s[2 * pos > ratio * (k - 1)] = calib
    return s


def widen_oracle(base, models, transpose=False, ratio=1.0, calib=1.0, zero_distances=(0.0, 1.0)):
    b = base.numpy().astype(np.float64)
    ms = [m.numpy().astype(np.float64) for m in models]
    if b.ndim == 1:
        deltas = np.stack([m - b for m in ms])
        s = _scores(np.abs(deltas), ratio, calib)
        return b + (s * deltas).sum(0)
    if transpose:
        b, ms = b.T, [m.T for m in ms]
    mag0 = np.linalg.norm(b, axis=0)
    dm, dd = [], []
    for m in ms:
        mag = np.linalg.norm(m, axis=0)
        dm.append(np.abs(mag - mag0))
        # 1 - cosine of the column directions; a zero column has no direction: distance 0 to another
        # zero column, 1 to a non-zero one (the edge cases the reference leaves as NaN).
        dist = np.empty(mag.shape)
        for j in range(len(mag)):
            if mag[j] == 0 and mag0[j] == 0:
                dist[j] = zero_distances[0]
            elif mag[j] == 0 or mag0[j] == 0:
                dist[j] = zero_distances[1]
            else:
                u, v = m[:, j] / mag[j], b[:, j] / mag0[j]
                dist[j] = 1.0 - (u * v).sum() / (np.linalg.norm(u) * np.linalg.norm(v))
        dd.append(dist)
    omega = 0.5 * (_rank_scores(np.stack(dm), ratio, calib) + _rank_scores(np.stack(dd), ratio, calib))
    deltas = np.stack([m - b for m in ms])
    out = b + (deltas * omega[:, None, :]).sum(0)
    return out.T if transpose else out


BASE = rand(6, 9, seed=1)
MODELS = [BASE + 0.2 * rand(6, 9, seed=s) for s in (2, 3, 4)]


@pytest.mark.parametrize("chunk_rows", [None, 4])
def test_matrix_matches_reference_oracle(chunk_rows):
    out = merge_one("widen", BASE, MODELS, name="model.layers.0.mlp.down_proj.weight", chunk_rows=chunk_rows)
    np.testing.assert_allclose(out.numpy(), widen_oracle(BASE, MODELS), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk_rows", [None, 2])
def test_token_embedding_is_transposed_like_the_reference(chunk_rows):
    # vocab 7 x hidden 4: a "column" is a token (a row of the stored tensor).
    base = rand(7, 4, seed=5)
    models = [base + 0.3 * rand(7, 4, seed=s) for s in (6, 7)]
    out = merge_one("widen", base, models, name="model.embed_tokens.weight", chunk_rows=chunk_rows)
    np.testing.assert_allclose(out.numpy(), widen_oracle(base, models, transpose=True), rtol=1e-5, atol=1e-6)
    # lm_head is a Linear in the reference: not transposed.
    head = merge_one("widen", base, models, name="lm_head.weight")
    np.testing.assert_allclose(head.numpy(), widen_oracle(base, models), rtol=1e-5, atol=1e-6)


def test_vector_matches_reference_oracle_with_options():
    base = rand(10, seed=8)
    models = [base + 0.1 * rand(10, seed=s) for s in (9, 10, 11)]
    out = merge_one("widen", base, models, name="model.norm.weight", above_average_ratio=0.8, calibration=0.7)
    np.testing.assert_allclose(out.numpy(), widen_oracle(base, models, ratio=0.8, calib=0.7), rtol=1e-5, atol=1e-6)


def test_vector_by_hand():
    # Significance |delta|: model 1 [1,0,0,0] (mean 0.25), model 2 [0,0,2,0] (mean 0.5). Entry 0 is above
    # average for model 1 only: score 1 (calibrated) for model 1, softmax(0, 1)[1] for model 2 whose
    # delta is 0 there. So entry 0 gets 1 * 1; entry 2 gets 1 * 2; untouched entries stay at the base.
    base = torch.zeros(4)
    m1, m2 = torch.tensor([1.0, 0, 0, 0]), torch.tensor([0, 0, 2.0, 0])
    assert merge_one("widen", base, [m1, m2], name="bias").tolist() == [1.0, 0.0, 2.0, 0.0]
    half = merge_one("widen", base, [m1, m2], name="bias", calibration=0.5)
    assert half.tolist() == [0.5, 0.0, 1.0, 0.0]
    # Below-average entries keep the softmax score: with ratio 10 nothing is calibrated.
    soft = merge_one("widen", base, [m1, m2], name="bias", above_average_ratio=10.0)
    assert soft[0].item() == pytest.approx(math.e / (1 + math.e), rel=1e-6)
    assert soft[2].item() == pytest.approx(2 * math.exp(2) / (1 + math.exp(2)), rel=1e-6)


def test_one_model_gives_it_back():
    for name, base, m in [("w", BASE, MODELS[0]), ("b", BASE[0], MODELS[0][0])]:
        torch.testing.assert_close(merge_one("widen", base, [m], name=name), m, rtol=0, atol=1e-6)


def test_permuting_models_permutes_nothing_in_the_output():
    out = merge_one("widen", BASE, MODELS)
    out2 = merge_one("widen", BASE, MODELS[::-1])
    torch.testing.assert_close(out, out2, rtol=1e-6, atol=1e-6)


def test_duplicating_a_model_doubles_its_delta_on_columns_above_average_in_both():
    # Two identical copies have identical ranks: where a column is above average in magnitude and in
    # direction both copies score 1 (omega sums to 2); where below in both, softmax gives 1/2 each.
    d = MODELS[0] - BASE
    out = merge_one("widen", BASE, [MODELS[0], MODELS[0]]) - BASE
    glob = {"above_average_ratio": 1.0, "calibration": 1.0, "temperature": 1.0}
    b = BASE.double()
    m = MODELS[0].double()
    w = column_weights(torch.stack([(m * m).sum(0)] * 2), (b * b).sum(0), torch.stack([(m * b).sum(0)] * 2), glob)
    both_above = w[0] == 1.0  # 1/2 (1 + 1)
    both_below = w[0] == 0.5  # 1/2 (1/2 + 1/2)
    assert both_above.any() and both_below.any()
    torch.testing.assert_close(out[:, both_above], 2 * d[:, both_above], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[:, both_below], d[:, both_below], rtol=1e-5, atol=1e-6)


def test_weights_are_in_zero_one_with_calibration_one():
    b = BASE.double()
    ms = torch.stack([m.double() for m in MODELS])
    w = column_weights((ms * ms).sum(1), (b * b).sum(0), (ms * b).sum(1), {
        "above_average_ratio": 1.0, "calibration": 1.0, "temperature": 1.0})
    assert bool(((w > 0) & (w <= 1)).all())


@pytest.mark.parametrize("chunk_rows", [None, 2])
def test_zero_columns_take_their_defined_values(chunk_rows):
    # Column 0: zero in the base and in model 0 (direction distance 0 for model 0, 1 for the others).
    # Column 3: zero in model 1 only (distance 1 for model 1). Column 5: zero everywhere (stays zero).
    base = BASE.clone()
    base[:, 0] = 0
    base[:, 5] = 0
    models = [m.clone() for m in MODELS]
    models[0][:, 0] = 0
    models[1][:, 3] = 0
    for m in models:
        m[:, 5] = 0
    out = merge_one("widen", base, models, chunk_rows=chunk_rows)
    expected = widen_oracle(base, models)
    assert np.isfinite(expected).all()
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-6)
    assert bool((out[:, 5] == 0).all())
    # The edge-case rule matters here: other distances for zero columns give another merge.
    for other in [(1.0, 1.0), (0.0, 0.0), (0.5, 0.5)]:
        assert np.abs(widen_oracle(base, models, zero_distances=other) - expected).max() > 1e-3, other


def test_higher_dimensional_tensors_are_rejected():
    with pytest.raises(RecipeError, match="2-D"):
        merge_one("widen", torch.zeros(2, 2, 3), [torch.ones(2, 2, 3)], name="conv.weight")


def test_reachable_from_the_python_api():
    emb = "model.embed_tokens.weight"
    base = {"model.layers.0.w.weight": BASE, "model.norm.weight": BASE[0].clone(), emb: BASE.T.contiguous()}
    models = [{"model.layers.0.w.weight": m, "model.norm.weight": m[0].clone(), emb: m.T.contiguous()} for m in MODELS]
    out = mergelab.merge_state_dicts(base, models, "widen", chunk_elements=12)  # row chunks of 1-2 rows
    np.testing.assert_allclose(out[emb].numpy(), widen_oracle(BASE.T, [m.T for m in MODELS], transpose=True),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["model.layers.0.w.weight"].numpy(), widen_oracle(BASE, MODELS), rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(out["model.norm.weight"].numpy(), widen_oracle(BASE[0], [m[0] for m in MODELS]),
                               rtol=1e-5, atol=1e-6)
