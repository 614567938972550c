"""RAM and RAM+ (tensor-local) against a float64 oracle written here from the spec's formulas.

Oracle (arXiv:2601.13572; mergekit 0.1.5 ``ram`` / ``ramplus_tl``), per entry with
``tau_i = theta_i - theta_0``, ``active_i = |tau_i| > eps``, ``c = sum_i active_i``:
``ram = theta_0 + sum_i active_i tau_i / max(c, 1)``; ``ramplus_tl`` scales the unique entries (c == 1)
of model i by ``1 + r * clip(shared_i / max(unique_i, eps), 0, alpha)``, counted over the tensor.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mergelab.errors import RecipeError
from mergelab.merge import merge_state_dicts
from tests.methods.mergekit_family_util import run


def oracle(base, models, eps=1e-5, plus=False, r=0.1, alpha=0.2, lambdas=None):
    b = np.asarray(base, dtype=np.float64)
    taus = [np.asarray(m, dtype=np.float64) - b for m in models]
    act = [np.abs(t) > eps for t in taus]
    c = np.sum(act, axis=0)
    out = b.copy()
    for i, t in enumerate(taus):
        lam = 1.0
        if lambdas is not None:
            lam = lambdas[i]
        elif plus:
            shared = int(np.sum(act[i] & (c > 1)))
            unique = int(np.sum(act[i] & (c == 1)))
            lam = 1 + r * min(max(shared / max(unique, eps), 0.0), alpha)
        for idx in np.ndindex(b.shape):
            if not act[i][idx]:
                continue
            out[idx] += t[idx] * lam if c[idx] == 1 else t[idx] / c[idx]
    return out


def family(seed=0, shape=(12, 10), n=3, zero=0.5):
    """A base and ``n`` models whose task vectors are zero on a random half of the entries: every
    entry count c = 0..n occurs."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(*shape, generator=g)
    models = []
    for _ in range(n):
        keep = torch.rand(*shape, generator=g) >= zero
        models.append(base + 0.05 * torch.randn(*shape, generator=g) * keep)
    return base, models


def close(a, b, tol=2e-6):
    np.testing.assert_allclose(a.double().numpy(), b, rtol=0, atol=tol)


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_ram_matches_oracle(n):
    base, models = family(seed=n, n=n)
    out = run("ram", base, models)
    close(out, oracle(base, models))
    c = sum(((m - base).abs() > 1e-5).int() for m in models)
    assert {0, 1}.issubset(set(c.unique().tolist()))  # the data reaches both cases
    if n > 1:
        assert int(c.max()) > 1


@pytest.mark.parametrize("n", [1, 2, 3])
def test_ramplus_tl_matches_oracle(n):
    base, models = family(seed=10 + n, n=n)
    for r, alpha in ((0.1, 0.2), (0.5, 3.0), (-0.2, 1.0)):
        out = run("ramplus_tl", base, models, {"r": r, "alpha": alpha})
        close(out, oracle(base, models, plus=True, r=r, alpha=alpha))


def test_disjoint_supports_is_task_arithmetic_and_identical_is_theta():
    base = torch.zeros(4, 6)
    a = torch.zeros(4, 6)
    b = torch.zeros(4, 6)
    a[:2] = 0.25
    b[2:] = -0.5
    ta = base + a + b  # task arithmetic with lambda 1
    assert torch.equal(run("ram", base, [base + a, base + b]), ta)
    # ramplus_tl: no shared entry, rho = 0, lambda = 1
    assert torch.equal(run("ramplus_tl", base, [base + a, base + b]), ta)
    same = base + a
    assert torch.equal(run("ram", base, [same, same, same]), same)


def test_epsilon_is_strict():
    eps32 = float(np.float32(1e-5))
    above = float(np.nextafter(np.float32(1e-5), np.float32(1)))
    base = torch.zeros(4)
    m0 = torch.tensor([eps32, above, 0.5, -eps32])
    m1 = torch.tensor([0.3, 0.3, 0.5, 0.0])
    out = run("ram", base, [m0, m1])
    # entry 0: only m1 active (m0's change equals epsilon) -> 0.3; entry 1: both -> mean; entry 3: none -> 0
    expected = torch.tensor([0.3, (above + 0.3) / 2, 0.5, 0.0], dtype=torch.float64)
    close(out, expected.numpy(), tol=1e-7)
    assert out[3].item() == 0.0
    out_eps0 = run("ram", base, [m0, m1], {"epsilon": 0.0})
    close(out_eps0, np.array([(eps32 + 0.3) / 2, (above + 0.3) / 2, 0.5, -eps32]), tol=1e-7)


def test_ramplus_r0_is_ram_and_lambda_reaches_cap():
    base, models = family(seed=3)
    assert torch.equal(run("ramplus_tl", base, models, {"r": 0.0}), run("ram", base, models))
    # Mostly shared supports: rho > alpha, so lambda = 1 + r * alpha exactly on unique entries.
    out = run("ramplus_tl", base, models, {"r": 0.5, "alpha": 0.2})
    close(out, oracle(base, models, lambdas=[1.1] * 3))


def test_model_without_unique_entries_is_finite():
    # Model 1 changes only entries model 0 also changes: shared_1 > 0, unique_1 = 0. The official
    # global RAM+ divides by zero here; rho = shared / epsilon is clamped to alpha instead.
    base = torch.zeros(2, 4)
    m0 = torch.tensor([[1.0, 2.0, 3.0, 0.0], [0.0, 0.0, 4.0, 0.0]])
    m1 = torch.tensor([[3.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    out = run("ramplus_tl", base, [m0, m1], {"r": 0.5, "alpha": 1.0})
    # model 0: shared 2 (entries 0, 2), unique 2 (1, 6) -> rho 1 -> lambda 1.5
    expected = np.array([[2.0, 3.0, 2.0, 0.0], [0.0, 0.0, 6.0, 0.0]])
    close(out, expected, tol=0)


def test_official_global_ramplus_on_one_tensor():
    """The official ``arm-r-v2`` (ram-main.py) written out: lambda_j = 1 + (R - 1) * min(1, rho_j),
    rho_j = overlap_j / (changed_j - overlap_j), counted over the model. On a one-tensor model it is
    ramplus_tl with r = R - 1 and alpha = 1."""
    base, models = family(seed=5, shape=(20, 10), n=3, zero=0.8)
    R = 1.2
    b = base.double().numpy()
    act = [np.abs(m.double().numpy() - b) > 1e-5 for m in models]
    c = np.sum(act, axis=0)
    lambdas = []
    for a in act:
        changed, overlap = int(a.sum()), int((a & (c >= 2)).sum())
        rho = overlap / (changed - overlap) if changed else 0.0
        lambdas.append(1 + (R - 1) * min(1.0, rho))
    out = run("ramplus_tl", base, models, {"r": R - 1, "alpha": 1.0})
    close(out, oracle(base, models, lambdas=lambdas))
    official = merge_state_dicts({"w": base}, [{"w": m} for m in models], "ramplus", rescale=R)["w"]
    close(official, oracle(base, models, lambdas=lambdas))
    assert min(lambdas) > 1 and max(lambdas) < R  # rho below 1: lambda depends on the counts


def official_counts(bases, models_per_tensor, eps=1e-5):
    """Whole-model (changed, overlap) per model, as ram-main.py sums them over the keys."""
    n = len(models_per_tensor[0])
    changed, overlap = [0] * n, [0] * n
    for b, ms in zip(bases, models_per_tensor):
        act = [np.abs(m.double().numpy() - b.double().numpy()) > eps for m in ms]
        c = np.sum(act, axis=0)
        for j, a in enumerate(act):
            changed[j] += int(a.sum())
            overlap[j] += int((a & (c >= 2)).sum())
    return changed, overlap


def test_ramplus_counts_over_the_whole_model():
    # Tensor "a": dense updates (mostly shared); tensor "b": sparse ones (mostly unique). The official
    # factor mixes both; the tensor-local one differs per tensor.
    ba, ma = family(seed=21, shape=(20, 8), n=3, zero=0.2)
    bb, mb = family(seed=22, shape=(30, 5), n=3, zero=0.9)
    R = 1.3
    changed, overlap = official_counts([ba, bb], [ma, mb])
    lambdas = [1 + (R - 1) * min(1.0, o / (c - o)) for c, o in zip(changed, overlap)]
    sds = [{"a": x, "b": y} for x, y in zip(ma, mb)]
    for chunk in (None, 24):
        out = merge_state_dicts({"a": ba, "b": bb}, sds, "ramplus", rescale=R, chunk_elements=chunk)
        close(out["a"], oracle(ba, ma, lambdas=lambdas))
        close(out["b"], oracle(bb, mb, lambdas=lambdas))
    local = merge_state_dicts({"a": ba, "b": bb}, sds, "ramplus_tl", r=R - 1, alpha=1.0)
    assert (local["b"] - out["b"]).abs().max() > 1e-4
    assert torch.equal(merge_state_dicts({"a": ba, "b": bb}, sds, "ramplus", rescale=1.0)["a"],
                       merge_state_dicts({"a": ba, "b": bb}, sds, "ram")["a"])


def test_ramplus_model_with_only_shared_changes():
    # ram-main.py raises ZeroDivisionError for model 1 (changed == overlap > 0); here lambda_1 = R, unused.
    base = torch.zeros(2, 4)
    m0 = torch.tensor([[1.0, 2.0, 3.0, 0.0], [0.0, 0.0, 4.0, 0.0]])
    m1 = torch.tensor([[3.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    out = merge_state_dicts({"w": base}, [{"w": m0}, {"w": m1}], "ramplus", rescale=1.5)["w"]
    # model 0: shared 2, unique 2 -> rho 1 -> lambda 1.5
    close(out, np.array([[2.0, 3.0, 2.0, 0.0], [0.0, 0.0, 6.0, 0.0]]), tol=0)


@pytest.mark.parametrize("method", ["ram", "ramplus_tl"])
def test_chunked_equals_whole(method):
    # alpha far above rho: lambda_i depends on the exact whole-tensor counts, which differ per chunk.
    base, models = family(seed=8, shape=(37, 11), n=3)
    params = {"r": 0.7, "alpha": 50.0} if method == "ramplus_tl" else None
    whole = run(method, base, models, params)
    if method == "ramplus_tl":
        close(whole, oracle(base, models, plus=True, r=0.7, alpha=50.0))
    for chunks in (2, 5, 37):
        part = run(method, base, models, params, chunks=chunks)
        assert torch.equal(whole, part), f"{method} in {chunks} chunks"


def test_engine_streams_ramplus_in_chunks():
    """Through the engine, with tensors split in row chunks: the same tensors as the oracle."""
    base, models = family(seed=9, shape=(64, 16), n=3)
    sd = lambda t: {"layers.0.mlp.weight": t, "norm.weight": t[0].clone()}  # noqa: E731
    for method, plus in (("ram", False), ("ramplus_tl", True)):
        out = merge_state_dicts(sd(base), [sd(m) for m in models], method, r=0.4, alpha=20.0,
                                chunk_elements=100) if plus else \
            merge_state_dicts(sd(base), [sd(m) for m in models], method, chunk_elements=100)
        close(out["layers.0.mlp.weight"], oracle(base, models, plus=plus, r=0.4, alpha=20.0))
        close(out["norm.weight"], oracle(base[0], [m[0] for m in models], plus=plus, r=0.4, alpha=20.0))


def test_bad_parameters():
    base, models = family()
    with pytest.raises(RecipeError, match="epsilon"):
        merge_state_dicts({"w": base}, [{"w": m} for m in models], "ramplus_tl", epsilon=0.0)
    with pytest.raises(RecipeError, match="alpha"):
        merge_state_dicts({"w": base}, [{"w": m} for m in models], "ramplus_tl", alpha=-1.0)
    with pytest.raises(RecipeError, match="rescale"):
        merge_state_dicts({"w": base}, [{"w": m} for m in models], "ramplus", rescale=0.9)
    with pytest.raises(RecipeError, match="rescale"):
        merge_state_dicts({"w": base}, [{"w": m} for m in models], "ramplus", rescale=[1.1, 1.2])
