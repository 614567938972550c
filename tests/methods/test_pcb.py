"""PCB-Merging: against a test oracle written from the reference's math, hand-worked cases, invariants."""

import numpy as np
import pytest
import torch

import mergelab
from mergelab.errors import RecipeError
from mergelab.methods.pcb import order_statistics, pcb_statistics, pcb_weights
from tests.methods.papers_support import merge_model, merge_one, rand, resolve


# ----------------------------------------------------------------------------- test oracle
# Written from the math of duguodong7/pcb-merging ``PCB_merge`` (sort-based clamp, min-max
# normalisation over each task row, exp(n N^2) * tanh(cross), clamp at the (1-ratio) order statistic,
# normalise, weighted mean), in float64 numpy on the whole flattened [n, d] matrix.
def pcb_oracle(flat, ratio=0.1, clip=1e-4, inter="sum", lams=None):
    flat = np.asarray(flat, dtype=np.float64)
    n, d = flat.shape
    mag = np.abs(flat)
    srt = np.sort(mag, axis=1)
    lo = srt[:, int(d * clip)][:, None]
    hi = srt[:, int(d * (1 - clip) - 1)][:, None]
    a = np.minimum(np.maximum(mag, lo), hi)
    clipped = np.sign(flat) * a
    norm = (a - a.min(1, keepdims=True)) / (a.max(1, keepdims=True) - a.min(1, keepdims=True))
    intra = np.exp(n * norm ** 2)
    if inter == "sum":
        cross = flat * flat.sum(0, keepdims=True)
    else:
        cross = flat * (np.sign(flat) * norm).sum(0, keepdims=True)
    beta = intra * np.tanh(cross)
    sb = np.sort(beta, axis=1)
    q = sb[:, int(d * (1 - ratio))][:, None]
    top = sb[:, d - 1][:, None]
    cb = np.minimum(np.maximum(beta, q), top)
    w = (cb - cb.min(1, keepdims=True)) / (cb.max(1, keepdims=True) - cb.min(1, keepdims=True))
    lam = np.ones((n, 1)) if lams is None else np.asarray(lams, dtype=np.float64)[:, None]
    return (lam * clipped * w).sum(0) / np.maximum(w.sum(0), 1e-12), w


def two_tensor_model(n=3, seed=0):
    base_a, base_b = rand(7, 5, seed=seed), rand(11, seed=seed + 1)
    models_a = [base_a + 0.05 * rand(7, 5, seed=seed + 10 + i) for i in range(n)]
    models_b = [base_b + 0.05 * rand(11, seed=seed + 20 + i) for i in range(n)]
    tensors = {"a": {"base": base_a, "models": models_a}, "b": {"base": base_b, "models": models_b}}
    flat = np.stack([np.concatenate([(ma - base_a).numpy().ravel(), (mb - base_b).numpy().ravel()])
                     for ma, mb in zip(models_a, models_b)])
    return tensors, flat


@pytest.mark.parametrize("inter", ["sum", "normalized"])
@pytest.mark.parametrize("chunk_rows", [None, 3])
def test_whole_model_matches_reference_oracle(inter, chunk_rows):
    tensors, flat = two_tensor_model()
    out = merge_model("pcb", tensors, chunk_rows=chunk_rows, ratio=0.3, clip=0.05, inter=inter, **{"lambda": 1.5})
    expect, _ = pcb_oracle(flat, ratio=0.3, clip=0.05, inter=inter)
    got = np.concatenate([(out["a"] - tensors["a"]["base"]).numpy().ravel(),
                          (out["b"] - tensors["b"]["base"]).numpy().ravel()])
    np.testing.assert_allclose(got, 1.5 * expect, rtol=1e-4, atol=1e-6)


def test_per_task_weights_in_numerator_as_reference_lams():
    tensors, flat = two_tensor_model(n=2, seed=5)
    out = merge_model("pcb", tensors, ratio=0.5, weight=[1.2, 0.8])
    expect, _ = pcb_oracle(flat, ratio=0.5, lams=[1.2, 0.8])
    got = (out["a"] - tensors["a"]["base"]).numpy().ravel()
    np.testing.assert_allclose(got, expect[:35], rtol=1e-4, atol=1e-6)


def test_tensor_granularity_is_the_oracle_per_tensor():
    tensors, _ = two_tensor_model(seed=3)
    out = merge_model("pcb", tensors, granularity="tensor", ratio=0.4, chunk_rows=2)
    for name, spec in tensors.items():
        flat = np.stack([(m - spec["base"]).numpy().ravel() for m in spec["models"]])
        expect, _ = pcb_oracle(flat, ratio=0.4)
        np.testing.assert_allclose((out[name] - spec["base"]).numpy().ravel(), expect, rtol=1e-4, atol=1e-6)


def test_one_model_by_hand():
    # d = 10, ratio 0.3: the drop keeps entries with beta above the sorted position int(10*0.7) = 7, i.e.
    # the two largest |tau| (beta is increasing in |tau| for n = 1). The clip's upper bound is the sorted
    # position int(10*(1-1e-4) - 1) = 8, so the largest |tau| (1.0) is clipped to 0.9.
    tau = torch.tensor([0.1, -0.2, 0.3, -0.4, 0.5, -0.6, 0.7, -0.8, 0.9, -1.0])
    base = torch.zeros(10)
    out = merge_one("pcb", base, [base + tau], ratio=0.3)
    expect = torch.zeros(10)
    expect[8], expect[9] = 0.9, -0.9
    torch.testing.assert_close(out, expect, rtol=0, atol=1e-7)


def test_merged_entries_are_convex_combinations_of_kept_clipped_entries():
    tensors, _ = two_tensor_model(n=4, seed=7)
    spec = tensors["a"]
    glob, per_model = resolve("pcb", 4, {"ratio": 0.5, "granularity": "tensor"})
    from mergelab.methods.registry import TensorInputs

    x = TensorInputs("a", (7, 5), spec["base"], spec["models"], glob, per_model, rows=(0, 7))
    stats = pcb_statistics(lambda: iter([x]), glob["clip"], glob["ratio"], glob["inter"])
    clipped, w = pcb_weights(x, stats)
    merged = merge_one("pcb", spec["base"], spec["models"], ratio=0.5, granularity="tensor") - spec["base"]
    kept = w > 0
    big = torch.where(kept, clipped, torch.full_like(clipped, -1e9)).max(0).values
    small = torch.where(kept, clipped, torch.full_like(clipped, 1e9)).min(0).values
    any_kept = kept.any(0)
    assert any_kept.any()
    assert bool((merged[any_kept] <= big[any_kept] + 1e-6).all())
    assert bool((merged[any_kept] >= small[any_kept] - 1e-6).all())
    assert bool((merged[~any_kept] == 0).all())
    # Each task keeps at most ceil(ratio * d) entries (no ties in random data).
    assert all(int(k.sum()) <= int(np.ceil(0.5 * 35)) for k in kept)


def test_permuting_models_does_not_change_the_result():
    tensors, _ = two_tensor_model(n=3, seed=11)
    out = merge_model("pcb", tensors, ratio=0.2)
    perm = {k: {"base": v["base"], "models": v["models"][::-1]} for k, v in tensors.items()}
    out2 = merge_model("pcb", perm, ratio=0.2)
    for k in out:
        torch.testing.assert_close(out[k], out2[k], rtol=1e-6, atol=1e-7)


def test_a_zero_task_vector_gets_no_weight_instead_of_nan():
    base = rand(20, seed=1)
    other = base + 0.1 * rand(20, seed=2)
    out = merge_one("pcb", base, [base.clone(), other], ratio=0.5)
    alone = merge_one("pcb", base, [other], ratio=0.5)
    assert torch.isfinite(out).all()
    # The zero task has w = 0; the other's weights are its own, but n = 2 changes intra-balancing
    # (exp(2 N^2)) and inter-balancing sums include the zero task, so compare supports only.
    assert torch.equal((out != base), (alone != base))


def test_bad_parameters_raise_recipe_errors():
    with pytest.raises(RecipeError, match="ratio"):
        resolve_and_check("pcb", ratio=0.0)
    with pytest.raises(RecipeError, match="clip"):
        merge_one("pcb", torch.zeros(4), [torch.ones(4)], clip=0.5)


def resolve_and_check(method, **params):
    from mergelab.methods.registry import get_method

    m = get_method(method)
    for k, v in params.items():
        m.param(k).check(v, "test")


@pytest.mark.parametrize("chunks", [1, 4])
def test_order_statistics_are_exact(chunks):
    g = torch.Generator().manual_seed(0)
    v = torch.randn(2, 203, generator=g)
    v[1, :50] = 0.0  # ties at zero and a mixed-sign row
    parts = torch.chunk(v, chunks, dim=1)
    pos = [0, 1, 17, 50, 101, 150, 201, 202]
    got = order_statistics(lambda: iter(parts), lambda total: pos)
    ref = np.sort(v.numpy(), axis=1)
    for i in range(2):
        assert got[i] == [float(ref[i, p]) for p in pos]


def test_reachable_from_the_python_api():
    tensors, flat = two_tensor_model(n=2, seed=21)
    base = {k: v["base"] for k, v in tensors.items()}
    models = [{k: v["models"][i] for k, v in tensors.items()} for i in range(2)]
    expect, _ = pcb_oracle(flat, ratio=0.25)
    for chunk_elements in (1 << 22, 10):  # whole tensors, and the executor's row chunks of 2 rows
        out = mergelab.merge_state_dicts(base, models, "pcb", ratio=0.25, chunk_elements=chunk_elements)
        got = np.concatenate([(out["a"] - base["a"]).numpy().ravel(), (out["b"] - base["b"]).numpy().ravel()])
        np.testing.assert_allclose(got, expect, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- paper-form oracle
def pcb_paper_form(taus, ratio, clip, lams=None):
    """PCB from the paper's steps (arXiv:2410.02396, Sec. 3; spec methods-data-free.md section 4), float64:
    intra-balancing as the paper's softmax over a task's parameters of n * Norm(a)^2 (the code's exp
    without the per-task denominator), inter-balancing tanh(tau_t * sum_j tau_j), drop + rescale by the
    min-max normalisation of max(beta, q), and the weighted mean of the clipped task vectors."""
    t = torch.stack([x.double().reshape(-1) for x in taus])
    n, d = t.shape
    lams = torch.ones(n, dtype=torch.float64) if lams is None else torch.tensor(lams, dtype=torch.float64)
    num = torch.zeros(d, dtype=torch.float64)
    den = torch.zeros(d, dtype=torch.float64)
    total = t.sum(0)
    for i in range(n):
        a = t[i].abs()
        srt = torch.sort(a).values
        a = a.clamp(float(srt[int(d * clip)]), float(srt[int(d * (1 - clip)) - 1]))
        clipped = torch.sign(t[i]) * a
        norm = (a - a.min()) / (a.max() - a.min())
        intra = torch.softmax(n * norm ** 2, dim=0)
        beta = intra * torch.tanh(t[i] * total)
        q = float(torch.sort(beta).values[int(d * (1 - ratio))])
        kept = beta.clamp_min(q)
        w = (kept - kept.min()) / (kept.max() - kept.min())
        num += lams[i] * w * clipped
        den += w
    return num / den.clamp_min(1e-12)


@pytest.mark.parametrize("chunk_rows", [None, 2])
def test_values_match_the_papers_formula(chunk_rows):
    g = torch.Generator().manual_seed(3)
    base = torch.randn(9, 8, generator=g)
    taus = [0.05 * torch.randn(9, 8, generator=g) for _ in range(3)]
    taus[1][:, 0] *= 20  # a few outliers for the clip to act on
    out = merge_one("pcb", base, [base + x for x in taus], name="w", chunk_rows=chunk_rows, ratio=0.3, clip=0.02,
                    weight=[1.0, 0.5, 2.0], **{"lambda": 1.3})
    expected = 1.3 * pcb_paper_form(taus, ratio=0.3, clip=0.02, lams=[1.0, 0.5, 2.0]).reshape(9, 8)
    torch.testing.assert_close((out - base).double(), expected, atol=2e-6, rtol=1e-4)
    # the drop keeps int(d*ratio) or so entries per task: some outputs are exactly the base
    assert 0 < int(((out - base) == 0).sum()) < 72


def test_a_zero_task_vector_leaves_the_others_kept_clipped_entries():
    # Task 0 is zero (degenerate row: w = 0). For task 1 alone in the mean, tau_m = w tau~ / w = tau~
    # where w > 0 (beta above its (1 - ratio) order statistic), 0 elsewhere; beta = exp(2 N(a)^2) *
    # tanh(tau * (0 + tau)) (n = 2 counts the zero task), worked out here from the formula.
    tau = torch.tensor([0.5, -0.1, 0.02, -0.7, 0.3, 0.0, -0.25, 0.9, 0.05, -0.4], dtype=torch.float64)
    d, ratio, clip = 10, 0.4, 0.1
    a = tau.abs()
    srt = torch.sort(a).values
    lo, hi = float(srt[int(d * clip)]), float(srt[int(d * (1 - clip)) - 1])  # 0.02 and 0.7
    assert (lo, hi) == (0.02, 0.7)
    a = a.clamp(lo, hi)
    beta = torch.exp(2 * ((a - a.min()) / (a.max() - a.min())) ** 2) * torch.tanh(tau * tau)
    q = torch.sort(beta).values[int(d * (1 - ratio))]
    expected = torch.where(beta > q, torch.sign(tau) * a, torch.zeros_like(tau))
    assert expected.tolist() == [0.5, 0, 0, -0.7, 0, 0, 0, 0.7, 0, 0]  # the 3 largest, 0.9 clipped to 0.7
    base = rand(10, seed=4)
    out = merge_one("pcb", base, [base.clone(), base + tau.float()], ratio=ratio, clip=clip)
    torch.testing.assert_close((out - base).double(), expected, atol=1e-6, rtol=0)
