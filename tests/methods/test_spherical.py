"""slerp, nuslerp, multislerp, karcher: endpoints, symmetry, norms on the sphere, numpy oracles, chunking."""

import math

import numpy as np
import pytest
import torch

from mergelab.errors import RecipeError
from tests.methods.mergekit_family_util import run


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


A = rand(8, 12, seed=1)
B = rand(8, 12, seed=2)


def slerp_oracle(t, a, b):
    """float64 SLERP of the flattened tensors (Shoemake's formula on the normalised dot product)."""
    a64, b64 = a.double().numpy().reshape(-1), b.double().numpy().reshape(-1)
    cos = np.dot(a64 / np.linalg.norm(a64), b64 / np.linalg.norm(b64))
    if abs(cos) > 0.9995:
        out = (1 - t) * a64 + t * b64
    else:
        om = math.acos(cos)
        out = math.sin((1 - t) * om) / math.sin(om) * a64 + math.sin(t * om) / math.sin(om) * b64
    return torch.from_numpy(out.reshape(a.shape))


def direction(x):
    x = x.double().reshape(-1)
    return x / x.norm()


# ----------------------------------------------------------------------------- slerp
@pytest.mark.parametrize("t", [0.0, 0.25, 0.5, 0.9, 1.0])
def test_slerp_matches_float64_oracle(t):
    torch.testing.assert_close(run("slerp", A, [B], {"t": t}).double(), slerp_oracle(t, A, B), rtol=1e-5, atol=1e-5)


def test_slerp_endpoints_are_the_inputs():
    assert torch.equal(run("slerp", A, [B], {"t": 0.0}), A)
    assert torch.equal(run("slerp", A, [B], {"t": 1.0}), B)


def test_slerp_is_symmetric():
    for t in (0.2, 0.5, 0.7):
        torch.testing.assert_close(run("slerp", A, [B], {"t": t}), run("slerp", B, [A], {"t": 1 - t}),
                                   rtol=1e-5, atol=1e-6)


def test_slerp_of_orthogonal_unit_vectors_stays_on_the_unit_circle():
    e1, e2 = torch.zeros(64), torch.zeros(64)
    e1[3], e2[40] = 1.0, 1.0
    for t in np.linspace(0, 1, 11):
        out = run("slerp", e1, [e2], {"t": float(t)})
        assert float(out.norm()) == pytest.approx(1.0, abs=1e-6)
        assert float(out[3]) == pytest.approx(math.cos(t * math.pi / 2), abs=1e-6)


def test_slerp_of_colinear_tensors_is_lerp():
    out = run("slerp", A, [3 * A], {"t": 0.25})
    torch.testing.assert_close(out, 0.75 * A + 0.25 * 3 * A)


@pytest.mark.parametrize("shape", [(8, 12), (50,), (4, 3, 5)])
def test_slerp_row_chunks_agree(shape):
    a, b = rand(*shape, seed=3), rand(*shape, seed=4)
    whole = run("slerp", a, [b], {"t": 0.35})
    torch.testing.assert_close(run("slerp", a, [b], {"t": 0.35}, chunks=3), whole, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- nuslerp
def test_nuslerp_without_base_is_slerp_at_the_weight_ratio():
    out = run("nuslerp", None, [A, B], None, [{"weight": 1.0}, {"weight": 3.0}])
    torch.testing.assert_close(out.double(), slerp_oracle(0.75, A, B), rtol=1e-5, atol=1e-5)


def test_nuslerp_with_base_interpolates_task_vectors():
    base = rand(8, 12, seed=9)
    out = run("nuslerp", base, [base + A, base + B], None, [{"weight": 2.0}, {"weight": 2.0}])
    torch.testing.assert_close(out.double(), base.double() + slerp_oracle(0.5, A, B), rtol=1e-5, atol=1e-5)


def test_nuslerp_per_row_and_per_column():
    w = [{"weight": 1.0}, {"weight": 1.0}]
    rows = run("nuslerp", None, [A, B], {"nuslerp_flatten": False}, w)
    cols = run("nuslerp", None, [A, B], {"nuslerp_flatten": False, "nuslerp_row_wise": True}, w)
    for r in range(A.shape[0]):
        torch.testing.assert_close(rows[r].double(), slerp_oracle(0.5, A[r], B[r]), rtol=1e-5, atol=1e-5)
    for c in range(A.shape[1]):
        torch.testing.assert_close(cols[:, c].double(), slerp_oracle(0.5, A[:, c], B[:, c]), rtol=1e-5, atol=1e-5)


def test_nuslerp_zero_weight_sum_uses_the_midpoint():
    out = run("nuslerp", None, [A, B], None, [{"weight": 1.0}, {"weight": -1.0}])
    torch.testing.assert_close(out.double(), slerp_oracle(0.5, A, B), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("flatten,row_wise", [(True, False), (False, False), (False, True)])
@pytest.mark.parametrize("shape", [(9, 7), (40,), (5, 3, 4)])
def test_nuslerp_row_chunks_agree(flatten, row_wise, shape):
    base, a, b = rand(*shape, seed=10), rand(*shape, seed=11), rand(*shape, seed=12)
    p = {"nuslerp_flatten": flatten, "nuslerp_row_wise": row_wise}
    w = [{"weight": 0.4}, {"weight": 0.6}]
    whole = run("nuslerp", base, [a, b], p, w)
    torch.testing.assert_close(run("nuslerp", base, [a, b], p, w, chunks=4), whole, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- multislerp
def multislerp_oracle(xs, w, base=None):
    """float64: normalise, weighted mean direction, one exponential-map step, times the mean norm."""
    x = np.stack([t.double().numpy().reshape(-1) for t in xs])
    if base is not None:
        x = x - base.double().numpy().reshape(-1)
    w = np.asarray(w, dtype=np.float64)
    w = w / w.sum()
    norms = np.linalg.norm(x, axis=1)
    u = x / norms[:, None]
    m = (w[:, None] * u).sum(0)
    m /= np.linalg.norm(m)
    tangent = (w[:, None] * (u - (u @ m)[:, None] * m)).sum(0)
    tn = np.linalg.norm(tangent)
    out = (m * math.cos(tn) + tangent * math.sin(tn) / tn) * (w * norms).sum()
    if base is not None:
        out = out + base.double().numpy().reshape(-1)
    return torch.from_numpy(out.reshape(xs[0].shape))


def test_multislerp_matches_float64_oracle():
    c = rand(8, 12, seed=5)
    out = run("multislerp", None, [A, B, c], None, [{"weight": w} for w in (1.0, 2.0, 3.0)])
    torch.testing.assert_close(out.double(), multislerp_oracle([A, B, c], [1, 2, 3]), rtol=1e-5, atol=1e-5)
    base = rand(8, 12, seed=6)
    out = run("multislerp", base, [A, B, c], None, [{"weight": 1.0}] * 3)
    torch.testing.assert_close(out.double(), multislerp_oracle([A, B, c], [1, 1, 1], base), rtol=1e-5, atol=1e-5)


def test_multislerp_of_two_equal_weights_is_the_slerp_midpoint_direction():
    out = run("multislerp", None, [A, B], None, [{"weight": 1.0}, {"weight": 1.0}])
    torch.testing.assert_close(direction(out), direction(slerp_oracle(0.5, A / A.norm(), B / B.norm())),
                               rtol=1e-5, atol=1e-6)
    assert float(out.norm()) == pytest.approx((float(A.norm()) + float(B.norm())) / 2, rel=1e-5)


def test_multislerp_one_model_and_permutations():
    assert torch.equal(run("multislerp", None, [A], None, [{"weight": 1.0}]), A)
    c = rand(8, 12, seed=7)
    w = [{"weight": 0.2}, {"weight": 0.5}, {"weight": 0.3}]
    out = run("multislerp", None, [A, B, c], None, w)
    torch.testing.assert_close(run("multislerp", None, [c, A, B], None, [w[2], w[0], w[1]]), out,
                               rtol=1e-5, atol=1e-6)


def test_multislerp_antipodal_three_models_is_an_error_naming_the_weights():
    with pytest.raises(RecipeError, match="weight"):
        run("multislerp", None, [A, -A, 2 * A], None, [{"weight": 1.0}, {"weight": 2.0}, {"weight": 1.0}])


def test_multislerp_of_a_tensor_no_model_changed_is_the_base():
    # e.g. frozen embeddings: every task vector is zero, so there is no direction and the base comes back
    w = [{"weight": 1.0}] * 3
    assert torch.equal(run("multislerp", A, [A.clone(), A.clone(), A.clone()], None, w), A)
    assert torch.equal(run("multislerp", None, [torch.zeros(3, 4)] * 3, None, w), torch.zeros(3, 4))


# ----------------------------------------------------------------------------- karcher
@pytest.mark.parametrize("semantics", ["paper", "mergekit"])
def test_karcher_of_two_is_the_slerp_midpoint_with_the_mean_norm(semantics):
    out = run("karcher", None, [A, B], {"semantics": semantics, "max_iter": 50})
    torch.testing.assert_close(direction(out), direction(slerp_oracle(0.5, A / A.norm(), B / B.norm())),
                               rtol=1e-5, atol=1e-6)
    assert float(out.norm()) == pytest.approx((float(A.norm()) + float(B.norm())) / 2, rel=1e-5)


def test_weighted_karcher_of_two_is_slerp_at_the_weight_fraction():
    out = run("karcher", None, [A, B], {"max_iter": 100, "tol": 1e-7, "semantics": "paper"},
              [{"weight": 0.3}, {"weight": 0.7}])
    torch.testing.assert_close(direction(out), direction(slerp_oracle(0.7, A / A.norm(), B / B.norm())),
                               rtol=1e-4, atol=1e-5)
    assert float(out.norm()) == pytest.approx(0.3 * float(A.norm()) + 0.7 * float(B.norm()), rel=1e-5)


def test_mergekit_semantics_is_the_default_and_paper_equals_it_for_equal_weights():
    c = rand(8, 12, seed=8)
    mk = run("karcher", None, [A, B, c])
    assert torch.equal(mk, run("karcher", None, [A, B, c], {"semantics": "mergekit"}, [{"weight": 0.5}] * 3))
    assert torch.equal(mk, run("karcher", None, [A, B, c], {"semantics": "paper"}, [{"weight": 2.0}] * 3))
    weighted = run("karcher", None, [A, B, c], {"semantics": "paper"},
                   [{"weight": 5.0}, {"weight": 1.0}, {"weight": 1.0}])
    assert not torch.allclose(mk, weighted)


@pytest.mark.parametrize("params", [None, {"semantics": "mergekit"}])
def test_unequal_weights_are_an_error_under_mergekit_semantics(params):
    """mergekit 0.1.5 gives every model 1/N: weights it cannot honour are refused, not ignored."""
    with pytest.raises(RecipeError, match=r"'weight' = \[5.0, 1.0\].*semantics: mergekit.*semantics: paper"):
        run("karcher", None, [A, B], params, [{"weight": 5.0}, {"weight": 1.0}])


def test_karcher_identical_inputs_and_permutations():
    torch.testing.assert_close(run("karcher", None, [A, A, A]), A, rtol=1e-6, atol=1e-6)
    c = rand(8, 12, seed=9)
    torch.testing.assert_close(run("karcher", None, [c, A, B], {"max_iter": 50}), run("karcher", None, [A, B, c], {"max_iter": 50}),
                               rtol=1e-5, atol=1e-6)


def test_karcher_result_satisfies_the_mean_condition():
    xs = [rand(8, 12, seed=s) for s in (20, 21, 22, 23)]
    w = [0.1, 0.2, 0.3, 0.4]
    out = run("karcher", None, xs, {"max_iter": 100, "tol": 1e-7, "semantics": "paper"},
              [{"weight": x} for x in w])
    u = direction(out).numpy()
    grad = np.zeros_like(u)  # sum_i w_i log_u(u_i): zero at the weighted Karcher mean
    for wi, x in zip(w, xs):
        ui = direction(x).numpy()
        cos = float(np.clip(u @ ui, -1, 1))
        theta = math.acos(cos)
        grad += wi * theta / math.sin(theta) * (ui - cos * u)
    assert np.linalg.norm(grad) < 1e-5


def test_karcher_weight_sum_must_be_positive():
    with pytest.raises(RecipeError, match="weight"):
        run("karcher", None, [A, B], {"semantics": "paper"}, [{"weight": 0.0}, {"weight": 0.0}])


# ----------------------------------------------------------------------------- row chunks (Gram-matrix path)
MULTI = [rand(9, 7, seed=s) for s in (30, 31, 32)]


@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0), (0.5, 0.3, 0.2), (2.0, -0.5, 1.0)])
def test_multislerp_row_chunks_agree_with_the_whole_tensor(with_base, weights):
    base = rand(9, 7, seed=33) if with_base else None
    w = [{"weight": x} for x in weights]
    whole = run("multislerp", base, MULTI, None, w)
    for chunks in (2, 5):
        torch.testing.assert_close(run("multislerp", base, MULTI, None, w, chunks=chunks), whole, rtol=1e-5, atol=1e-6)


def test_multislerp_row_chunks_keep_the_edge_cases():
    w = [{"weight": 1.0}] * 3
    same = [MULTI[0].clone() for _ in range(3)]
    assert torch.equal(run("multislerp", MULTI[0], same, None, w, chunks=3), MULTI[0])  # nothing changed: base
    a = MULTI[0]
    pair = run("multislerp", None, [a, -a], None, [{"weight": 1.0}, {"weight": 1.0}], chunks=3)
    torch.testing.assert_close(pair, run("multislerp", None, [a, -a], None, [{"weight": 1.0}, {"weight": 1.0}]))
    with pytest.raises(RecipeError, match="weight"):
        run("multislerp", None, [a, -a, 2 * a], None, [{"weight": 1.0}, {"weight": 2.0}, {"weight": 1.0}], chunks=3)


@pytest.mark.parametrize("params,weights", [
    ({}, (1.0, 1.0, 1.0)),
    ({"semantics": "paper"}, (0.5, 0.3, 0.2)),
    ({"semantics": "paper"}, (5.0, 1.0, 1.0)),
    ({"max_iter": 0, "semantics": "paper"}, (0.2, 0.2, 0.6)),
])
def test_karcher_row_chunks_agree_with_the_whole_tensor(params, weights):
    w = [{"weight": x} for x in weights]
    whole = run("karcher", None, MULTI, params, w)
    for chunks in (2, 5):
        torch.testing.assert_close(run("karcher", None, MULTI, params, w, chunks=chunks), whole, rtol=1e-5, atol=1e-6)


def test_karcher_row_chunks_with_a_zero_input_and_identical_inputs():
    xs = [MULTI[0], torch.zeros(9, 7), MULTI[1]]
    torch.testing.assert_close(run("karcher", None, xs, chunks=3), run("karcher", None, xs), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(run("karcher", None, [MULTI[2]] * 3, chunks=3), MULTI[2], rtol=1e-6, atol=1e-6)
    assert torch.equal(run("karcher", None, [torch.zeros(9, 7)] * 2, chunks=3), torch.zeros(9, 7))


def test_cli_refuses_unequal_karcher_weights_without_semantics_paper(tmp_path, capsys):
    """A mergekit karcher config with unequal weights: mergekit would silently use 1/N; mergelab's default
    (mergekit semantics) says so and stops before writing anything; semantics: paper merges it."""
    import yaml

    from mergelab.synthetic import make_llama_family
    from tests.conftest import run_cli

    paths = make_llama_family(tmp_path / "fam", experts=2, hidden=16, layers=1, intermediate=32, vocab=32)
    recipe = {"merge_method": "karcher", "dtype": "float32",
              "models": [{"model": str(paths[1]), "parameters": {"weight": 1.0}},
                         {"model": str(paths[2]), "parameters": {"weight": 0.5}}]}
    path = tmp_path / "karcher.yml"
    path.write_text(yaml.safe_dump(recipe))
    code, out, err = run_cli(["merge", path, "-o", tmp_path / "out", "--quiet"], capsys)
    flat = " ".join(err.split())
    assert code == 2, (code, out, err)
    assert "'weight' = [1.0, 0.5]" in flat and "semantics: mergekit" in flat and "semantics: paper" in flat
    assert "Traceback" not in out + err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
    recipe["parameters"] = {"semantics": "paper"}
    path.write_text(yaml.safe_dump(recipe))
    code, out, err = run_cli(["merge", path, "-o", tmp_path / "out", "--quiet"], capsys)
    assert code == 0, err
    assert (tmp_path / "out" / "model.safetensors").exists()
