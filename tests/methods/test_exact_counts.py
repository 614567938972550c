"""Exact selection counts under heavy ties (issue 14, point 1).

Real fine-tunes have rows that no token touched, moved only by weight decay: their task-vector entries
take a handful of values, and a trim threshold lands among hundreds of thousands of equal magnitudes.
Under ``semantics: mergekit`` every selection keeps exactly mergekit's count; among equal magnitudes
the lower flat index goes first. The oracle here is numpy's lexsort by ``(-|x|, index)``.
"""

import json
import math

import numpy as np
import pytest
import torch

import mergelab
from mergelab.methods import fused
from mergelab.methods.registry import TensorInputs, TensorSource
from mergelab.methods.select import (EVERY, Cut, cut_mask, cuts_in_memory, keep_count, rank_windows, stream_of,
                                     top_cuts, window_mask)
from tests.methods.mergekit_family_util import run

DECAY = 1.341e-6  # the value weight decay leaves on untouched rows (float32)


def oracle_mask(x: np.ndarray, k: int) -> np.ndarray:
    """The first k entries of ``|x|`` descending, ties by lower flat index (independent of mergelab)."""
    a = np.abs(x.reshape(-1).astype(np.float64))
    order = np.lexsort((np.arange(a.size), -a))
    mask = np.zeros(a.size, dtype=bool)
    mask[order[:k]] = True
    return mask.reshape(x.shape)


def decayed_family(rows=300, cols=64, n=2, seed=0, touched=0.2):
    """Base and fine-tunes where most rows moved only by a constant weight-decay step (exactly tied
    magnitudes: about 80% of the entries) and a few rows by real updates."""
    g = torch.Generator().manual_seed(seed)
    base = torch.zeros(rows, cols)
    models = []
    for _ in range(n):
        signs = torch.where(torch.rand(rows, cols, generator=g) < 0.5, -1.0, 1.0)
        delta = signs * DECAY
        live = torch.rand(rows, generator=g) < touched
        delta[live] = torch.randn(int(live.sum()), cols, generator=g) * 1e-3
        models.append(base + delta)
    return base, models


@pytest.fixture
def tensor_code(monkeypatch):
    """Run the tensor code instead of the fused kernels."""
    monkeypatch.setattr(fused, "_kernels", None)
    monkeypatch.setattr(fused, "_unavailable", True)
    assert fused.kernels() is None


def _kernels_or_not(request):
    if request.param == "tensor":
        request.getfixturevalue("tensor_code")
    elif fused.kernels() is None:
        pytest.skip("numba is not installed")
    return request.param


@pytest.fixture(params=["kernels", "tensor"])
def path(request):
    return _kernels_or_not(request)


# ------------------------------------------------------------------------------------------ the primitives
@pytest.mark.parametrize("k", [1, 17, 4000, 9000, 15000, 19199])
@pytest.mark.parametrize("chunk", [64 * 300, 64 * 7, 1000])
def test_top_cuts_keep_exactly_k_in_the_one_order(k, chunk):
    base, (model, other) = decayed_family()
    x = torch.stack([model - base, other - base]).reshape(2, -1)
    chunks = [x[:, a:a + chunk] for a in range(0, x.shape[1], chunk)]
    cuts = top_cuts(stream_of(chunks), [k, k])
    for i in range(2):
        want = oracle_mask(x[i].numpy(), k)
        got = cut_mask(x[i].abs(), cuts[i])
        assert int(got.sum()) == k == cuts[i].kept
        assert np.array_equal(got.numpy(), want)
        # Chunk by chunk, with the chunk's flat offset, the same mask.
        parts = [cut_mask(c[i].abs(), cuts[i], a) for a, c in zip(range(0, x.shape[1], chunk), chunks)]
        assert torch.equal(torch.cat(parts), got)
        assert cuts_in_memory(x[i], [k])[0] == cuts[i]


def test_ties_that_fit_need_no_tie_index_and_the_reference_rule_keeps_them_all():
    x = torch.tensor([3.0, 1.0, 2.0, 1.0, 2.0, 0.5, 1.0])
    assert cuts_in_memory(x, [3])[0] == Cut(2.0, EVERY, 3, 3)  # the two 2.0s fit: no index needed
    assert cuts_in_memory(x, [4])[0] == Cut(1.0, 2, 4, 4)  # one 1.0 of three: the one at index 1
    loose = cuts_in_memory(x, [4], exact=False)[0]
    assert (loose.value, loose.index, loose.kept, loose.asked) == (1.0, EVERY, 6, 4)
    assert top_cuts(stream_of([x[None, :4], x[None, 4:]]), [4]) == [Cut(1.0, 2, 4, 4)]


def test_rank_windows_keep_exact_counts_when_most_entries_tie():
    base, models = decayed_family(rows=50, cols=40)
    v = torch.stack([m - base for m in models])
    numel = v[0].numel()
    bounds = [(30, 1500), (0, 999)]
    for single, rows in ((True, [(0, 50)]), (False, [(0, 7), (7, 30), (30, 50)])):
        windows = rank_windows(lambda: ((a, v[:, a:b]) for a, b in rows), bounds, numel, single=single)
        mask = torch.cat([window_mask(v[:, a:b], a, windows) for a, b in rows], dim=1).reshape(2, -1)
        for i, (start, stop) in enumerate(bounds):
            want = oracle_mask(v[i].numpy(), stop) & ~oracle_mask(v[i].numpy(), start)
            assert np.array_equal(mask[i].numpy().astype(bool), want.reshape(-1))


def test_fused_cuts_equal_the_tensor_cuts():
    if fused.kernels() is None:
        pytest.skip("numba is not installed")
    base, models = decayed_family(rows=97, cols=33, n=3, seed=4)
    models = [m.to(torch.bfloat16).float() for m in models]
    numel = base.numel()
    ks = [keep_count(d, numel, "mergekit") for d in (0.05, 0.3, 0.7)]
    whole = fused.top_cuts_deltas(lambda: [(base, models)], ks, numel)
    chunks = [(base[a:a + 10], [m[a:a + 10] for m in models]) for a in range(0, 97, 10)]
    assert fused.top_cuts_deltas(lambda: iter(chunks), ks, numel) == whole
    assert top_cuts(stream_of([torch.stack([m - base for m in models])]), ks) == whole
    for i, k in enumerate(ks):
        assert whole[i].kept == k


# ------------------------------------------------------------------------------------------ TIES
def ties_oracle(base, models, weights, density):
    """mergekit's TIES in float64 with the exact-count trim above: trim, weigh, elect (+1 on a zero
    sum), divide by the agreeing weights."""
    b = base.double().numpy()
    taus = []
    for m, w in zip(models, weights):
        tau = m.double().numpy() - b
        k = max(1, int(density * tau.size))
        taus.append(w * tau * oracle_mask((m - base).numpy(), k))
    taus = np.stack(taus)
    sign = np.where(taus.sum(0) >= 0, 1.0, -1.0)
    agree = np.sign(taus) == sign
    wts = np.asarray(weights).reshape(-1, 1, 1)
    div = (wts * agree).sum(0)
    div[div == 0] = 1
    return b + (taus * agree).sum(0) / div


def test_ties_trim_keeps_exactly_mergekits_count_when_the_threshold_falls_among_ties(path):
    base, (model,) = decayed_family(n=1)
    k = max(1, int(0.4 * base.numel()))
    assert int(((model - base).abs() == DECAY).sum()) > base.numel() // 2  # the threshold lands among ties
    out = run("ties", base, [model], None, {"weight": 1.0, "density": 0.4})
    mask = torch.from_numpy(oracle_mask((model - base).numpy(), k))
    assert int((out != base).sum()) == k
    assert torch.equal(out, torch.where(mask, base + (model - base), base))


def test_ties_matches_the_exact_count_oracle_whole_chunked_with_and_without_kernels(path):
    base, models = decayed_family(n=3, seed=2)
    weights = [1.0, 0.6, 0.3]
    mp = [{"weight": w, "density": 0.4} for w in weights]
    whole = run("ties", base, models, None, mp)
    np.testing.assert_allclose(whole.double().numpy(), ties_oracle(base, models, weights, 0.4), rtol=1e-6,
                               atol=1e-12)
    assert torch.equal(run("ties", base, models, None, mp, chunks=7), whole)


def test_engine_row_chunks_and_kernels_give_the_same_bytes(monkeypatch):
    base, models = decayed_family(rows=256, cols=48, n=2, seed=3)
    sd = lambda t: {"w": t.to(torch.bfloat16)}  # noqa: E731
    params = dict(density=0.35, weight=[1.0, 0.5])
    results = {}
    for kernels in ("on", "off"):
        with monkeypatch.context() as m:
            if kernels == "off":
                m.setattr(fused, "_kernels", None)
                m.setattr(fused, "_unavailable", True)
            for chunk in (None, 48 * 20):
                results[kernels, chunk] = mergelab.merge_state_dicts(
                    sd(base), [sd(x) for x in models], "ties", chunk_elements=chunk, **params)["w"]
    first = next(iter(results.values()))
    for key, value in results.items():
        assert torch.equal(value.view(torch.int16), first.view(torch.int16)), key
    b = base.to(torch.bfloat16).float()
    ms = [x.to(torch.bfloat16).float() for x in models]
    want = torch.from_numpy(ties_oracle(b, ms, [1.0, 0.5], 0.35)).float().to(torch.bfloat16)
    assert (first.float() - want.float()).abs().max() <= 2 ** -8 * want.float().abs().max()


def test_ties_rescale_uses_the_exact_trim(path):
    base, (model,) = decayed_family(n=1, seed=5)
    out = run("ties", base, [model], {"rescale": True, "normalize": False}, {"weight": 1.0, "density": 0.4})
    tau = (model - base).double().numpy()
    mask = oracle_mask((model - base).numpy(), int(0.4 * tau.size))
    factor = np.abs(tau).sum() / np.abs(tau * mask).sum()
    np.testing.assert_allclose((out - base).double().numpy(), tau * mask * factor, rtol=1e-5, atol=1e-12)


def test_paper_semantics_keeps_every_tie_and_mergelab_json_records_kept_vs_asked(tmp_path):
    from mergelab.synthetic import write_checkpoint

    base, models = decayed_family(n=2, seed=6)
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "vocab_size": 300,
           "num_hidden_layers": 1}
    write_checkpoint(tmp_path / "base", {"model.embed_tokens.weight": base}, cfg)
    for i, m in enumerate(models):
        write_checkpoint(tmp_path / f"m{i}", {"model.embed_tokens.weight": m}, cfg)
    recipe = {"merge_method": "ties", "base_model": str(tmp_path / "base"), "parameters": {"semantics": "paper"},
              "models": [{"model": str(tmp_path / f"m{i}"), "parameters": {"weight": 1.0, "density": 0.4}}
                         for i in range(2)]}
    mergelab.merge(recipe, tmp_path / "out")
    report = json.loads((tmp_path / "out" / "mergelab.json").read_text())["reports"]["(whole model)"]["trim"]
    n = base.numel()
    asked = math.floor(0.4 * n) + 1
    assert report["asked"] == [asked, asked]
    for i, m in enumerate(models):
        a = (m - base).abs().reshape(-1)
        t = a.sort(descending=True).values[asked - 1]
        assert report["kept"][i] == int((a >= t).sum()) > asked * 1.001
    # mergekit semantics keeps exactly the asked count: nothing to record.
    recipe["parameters"] = {}
    mergelab.merge(recipe, tmp_path / "out2")
    assert "(whole model)" not in json.loads((tmp_path / "out2" / "mergelab.json").read_text())["reports"]


# ------------------------------------------------------------------------------------------ other selections
def test_breadcrumbs_keeps_exact_counts_among_decay_ties():
    base, (model,) = decayed_family(n=1, seed=7)
    n = base.numel()
    p = {"weight": 1.0, "density": 0.5, "gamma": 0.05}
    out = run("breadcrumbs", base, [model], None, p)
    target, n_top = int(0.5 * n), int(0.05 * n)
    want = oracle_mask((model - base).numpy(), n_top + target) & ~oracle_mask((model - base).numpy(), n_top)
    assert np.array_equal((out != base).numpy(), want)
    assert torch.equal(run("breadcrumbs", base, [model], None, p, chunks=9), out)


def test_sce_selects_exactly_k_positions_among_tied_variances():
    # Two models whose task vectors differ by a constant on most positions: the variances tie.
    base, (a,) = decayed_family(n=1, seed=8)
    b = base + (a - base) * -1.0
    b[:5] += 1e-3  # a few positions with another variance
    d = torch.stack([a - base, b - base])
    var = d.double().var(0, unbiased=False).float()
    nonzero = int((var != 0).sum())
    k = int(nonzero * 0.3)
    out = run("sce", base, [a, b], {"select_topk": 0.3})
    selected = torch.from_numpy(oracle_mask(var.numpy(), k))
    # Where a position is not selected, mergekit's SCE leaves the base there.
    assert torch.equal(out[~selected], base[~selected])
    assert int((out != base).sum()) <= k
    assert torch.equal(run("sce", base, [a, b], {"select_topk": 0.3}, chunks=6), out)


def test_doge_records_kept_vs_asked_of_its_reference_top_k_mask():
    from tests.methods.helpers import inputs_for

    base, models = decayed_family(n=2, seed=9)
    x = inputs_for("doge_ta", base, models, layer=0, num_layers=1, density=0.4, steps=0)
    report = x.model_stats.manifest_report()["top_k_mask"]
    asked = math.floor(0.4 * base.numel()) + 1
    assert report["asked"] == [asked, asked]
    for i, m in enumerate(models):
        a = (m - base).abs().reshape(-1)
        t = a.sort(descending=True).values[asked - 1]
        assert report["kept"][i] == int((a >= t).sum())
    x = inputs_for("doge_ta", base, [base + torch.randn(base.shape) for _ in range(2)], layer=0, num_layers=1,
                   density=0.4, steps=0)
    assert x.model_stats.manifest_report() is None  # no ties: kept == asked


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_zero_outside_keeps_what_the_cut_keeps_chunk_by_chunk(dtype):
    from mergelab.methods.select import zero_outside

    base, (model,) = decayed_family(rows=40, cols=25, n=1, seed=11)
    x = (model - base).to(dtype).reshape(-1)
    for k in (1, 200, 700, 999):
        cut = cuts_in_memory(x, [k])[0]
        want = torch.where(torch.from_numpy(oracle_mask(x.float().numpy(), k)), x, torch.zeros_like(x))
        for size in (x.numel(), 77, 250):
            parts = [zero_outside(x[a:a + size].clone(), cut, a) for a in range(0, x.numel(), size)]
            assert torch.equal(torch.cat(parts), want), (k, size)


def test_tie_index_search_block_by_block(monkeypatch):
    from mergelab.methods import select

    monkeypatch.setattr(select, "_BLOCK", 64)  # many blocks on a small tensor
    base, (model,) = decayed_family(rows=50, cols=37, n=1, seed=12)
    x = (model - base).reshape(-1)
    for k in (5, 333, 1200):
        want = oracle_mask(x.numpy(), k)
        assert np.array_equal(cut_mask(x.abs(), cuts_in_memory(x, [k])[0]).numpy(), want)
        chunks = [x[None, a:a + 300] for a in range(0, x.numel(), 300)]
        assert np.array_equal(cut_mask(x.abs(), top_cuts(stream_of(chunks), [k])[0]).numpy(), want)
    assert select.nth_equal(torch.tensor([1.0, 2.0, 1.0]), 1.0, 3) == (-1, 1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_give_the_cpu_cuts_and_merge():
    base, models = decayed_family(n=2, seed=13)
    x = torch.stack([m - base for m in models]).reshape(2, -1)
    ks = [4000, 9000]
    cpu = top_cuts(stream_of([x[:, :5000], x[:, 5000:]]), ks)
    gpu = top_cuts(stream_of([x[:, :5000].cuda(), x[:, 5000:].cuda()]), ks)
    assert gpu == cpu
    assert [cuts_in_memory(x[i].cuda(), [k])[0] for i, k in enumerate(ks)] == cpu
    for i in range(2):
        assert torch.equal(cut_mask(x[i].abs().cuda(), cpu[i]).cpu(), cut_mask(x[i].abs(), cpu[i]))
    mp = [{"weight": 1.0, "density": 0.4}, {"weight": 0.5, "density": 0.4}]
    want = run("ties", base, models, None, mp)
    got = run("ties", base.cuda(), [m.cuda() for m in models], None, mp)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-6, atol=1e-9)
