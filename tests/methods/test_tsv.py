"""TSV-M: against a test oracle written from the reference's math, and the spec's invariants."""

import numpy as np
import pytest
import torch

import mergelab
from mergelab.methods.registry import TensorInputs
from mergelab.methods.tsv import polar_factor, tsv_matrix, tsv_report
from tests.methods.papers_support import merge_one, rand, resolve


# ----------------------------------------------------------------------------- test oracle
# Written from the math of AntoAndGar/task_singular_vectors ``compute_and_sum_svd_mem_reduction``:
# per task thin SVD, the top floor(r/T) triplets placed into zero buffers of size r, polar factors of the
# concatenated U and V^T via their SVDs, product U_perp diag(s) V_perp^T (float64 numpy).
def tsv_oracle(deltas):
    t = len(deltas)
    rows, cols = deltas[0].shape
    r = min(rows, cols)
    k = int(r * (1 / t))
    su, ss, sv = np.zeros((rows, r)), np.zeros(r), np.zeros((r, cols))
    for i, d in enumerate(deltas):
        u, s, vh = np.linalg.svd(np.asarray(d, dtype=np.float64), full_matrices=False)
        su[:, i * k:(i + 1) * k] = u[:, :k]
        ss[i * k:(i + 1) * k] = s[:k]
        sv[i * k:(i + 1) * k, :] = vh[:k, :]
    uu, _, vu = np.linalg.svd(su, full_matrices=False)
    uv, _, vv = np.linalg.svd(sv, full_matrices=False)
    return uu @ vu @ np.diag(ss) @ uv @ vv


BASE = rand(8, 6, seed=1)
MODELS = [BASE + 0.5 * rand(8, 6, seed=s) for s in (2, 3, 4)]
DELTAS = [(m - BASE).numpy() for m in MODELS]


def test_matches_reference_oracle_float64_and_float32():
    out = merge_one("tsv", BASE, MODELS, svd_dtype="float64", **{"lambda": 0.7})
    np.testing.assert_allclose((out - BASE).numpy(), 0.7 * tsv_oracle(DELTAS), rtol=1e-5, atol=1e-6)
    out32 = merge_one("tsv", BASE, MODELS)
    np.testing.assert_allclose((out32 - BASE).numpy(), tsv_oracle(DELTAS), rtol=1e-3, atol=1e-4)


def test_per_model_weights_scale_before_the_svd():
    out = merge_one("tsv", BASE, MODELS, svd_dtype="float64", weight=[1.0, 0.5, 2.0])
    scaled = [w * d for w, d in zip([1.0, 0.5, 2.0], DELTAS)]
    np.testing.assert_allclose((out - BASE).numpy(), tsv_oracle(scaled), rtol=1e-5, atol=1e-6)


def test_one_task_gives_its_task_vector_back():
    out = merge_one("tsv", BASE, [MODELS[0]], svd_dtype="float64")
    torch.testing.assert_close(out, MODELS[0], rtol=0, atol=1e-5)


def test_non_matrix_and_excluded_tensors_get_lambda_times_the_mean():
    b = rand(5, seed=7)
    ms = [b + rand(5, seed=8 + i) for i in range(3)]
    out = merge_one("tsv", b, ms, name="bias", **{"lambda": 2.0})
    torch.testing.assert_close(out, b + 2.0 * torch.stack([m - b for m in ms]).mean(0))
    out = merge_one("tsv", BASE, MODELS, name="model.embed_tokens.weight")
    torch.testing.assert_close(out, BASE + torch.stack([m - BASE for m in MODELS]).mean(0))
    out = merge_one("tsv", BASE, MODELS, name="visual.text_projection", exclude="")
    assert not torch.allclose(out, BASE + torch.stack([m - BASE for m in MODELS]).mean(0))


def test_orthogonal_task_subspaces_give_the_sum_of_truncations():
    # Two tasks on disjoint left and right singular directions: the orthogonalisation changes nothing,
    # so TSV-M is the sum of each task's rank-k truncation (k = floor(6 / 2) = 3).
    g = torch.Generator().manual_seed(3)
    qu, _ = torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=torch.float64))
    qv, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    t1 = sum(s * torch.outer(qu[:, j], qv[:, j]) for s, j in [(5.0, 0), (4.0, 1), (3.0, 2)])
    t2 = sum(s * torch.outer(qu[:, j], qv[:, j]) for s, j in [(6.0, 3), (2.0, 4), (1.5, 5)])
    noise = 0.1 * torch.outer(qu[:, 6], qv[:, 4])  # a 4th, smaller direction of task 1: truncated away
    merged = tsv_matrix([t1 + noise, t2])
    torch.testing.assert_close(merged, t1 + t2, rtol=0, atol=1e-10)


def test_polar_factor_has_orthonormal_columns():
    a = rand(8, 5, seed=9).double()
    q = polar_factor(a)
    torch.testing.assert_close(q.T @ q, torch.eye(5, dtype=torch.float64), rtol=0, atol=1e-12)


def test_invariant_to_sign_flips_of_singular_pairs(monkeypatch):
    plain = tsv_matrix([torch.tensor(d) for d in DELTAS])
    svd = torch.linalg.svd

    def flipped(a, full_matrices=True):
        u, s, vh = svd(a, full_matrices=full_matrices)
        sign = torch.where(torch.arange(s.shape[0]) % 2 == 0, -1.0, 1.0).to(u.dtype)
        return u * sign, s, vh * sign[:, None]

    monkeypatch.setattr(torch.linalg, "svd", flipped)
    torch.testing.assert_close(tsv_matrix([torch.tensor(d) for d in DELTAS]), plain, rtol=0, atol=1e-10)


def test_rank_limit_permutation_invariance_and_report():
    four = [torch.tensor(d) for d in DELTAS] + [torch.tensor(DELTAS[0] - DELTAS[1])]
    merged = tsv_matrix(four)  # r = 6, T = 4: k = 1, so rank <= 4
    assert int(torch.linalg.matrix_rank(merged)) == 4
    torch.testing.assert_close(tsv_matrix(four[::-1]), merged, rtol=0, atol=1e-10)
    glob, per = resolve("tsv", 4, {})
    x = TensorInputs("w", (8, 6), BASE, [BASE] * 4, glob, per)
    assert tsv_report(x) == {"rank_per_task": 1, "rank": 4, "full_rank": 6}
    x7 = TensorInputs("w", (8, 6), BASE, [BASE] * 7, glob, per * 2)
    assert tsv_report(x7) == {"rank_per_task": 0, "rank": 0, "full_rank": 6}
    assert tsv_report(TensorInputs("b", (6,), BASE[0], [BASE[0]] * 4, glob, per)) == {"mean": True}


def test_more_tasks_than_rank_gives_zero_like_the_reference():
    ms = [BASE[:2] + rand(2, 6, seed=s) for s in range(3)]  # r = 2 < T = 3
    out = merge_one("tsv", BASE[:2], ms)
    torch.testing.assert_close(out, BASE[:2])


@pytest.mark.parametrize("name", ["model.layers.0.mlp.weight"])
def test_reachable_from_the_python_api(name):
    out = mergelab.merge_state_dicts({name: BASE}, [{name: m} for m in MODELS], "tsv", svd_dtype="float64")
    np.testing.assert_allclose((out[name] - BASE).numpy(), tsv_oracle(DELTAS), rtol=1e-5, atol=1e-6)
