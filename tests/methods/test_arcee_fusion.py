"""arcee_fusion: a hand-checkable example against a numpy oracle, and structural properties."""

import numpy as np
import pytest
import torch

import mergelab
from mergelab.methods.arcee_fusion import fusion_threshold, importance_scores, quantile_ranks
from mergelab.methods.registry import TensorSource, get_method
from tests.methods.mergekit_family_util import inputs, run


def oracle(base: torch.Tensor, model: torch.Tensor) -> torch.Tensor:
    """float64: importance = |d| * row KL(softmax(model) || softmax(base)); keep >= median + 1.5 IQR."""
    b, m = base.double().numpy(), model.double().numpy()

    def softmax(x):
        e = np.exp(x - x.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)

    p, q = softmax(m) + 1e-8, softmax(b) + 1e-8
    kl = (p * np.log(p / q)).sum(axis=-1, keepdims=True)
    imp = np.abs(m - b) * kl
    s = np.sort(imp.reshape(-1))
    n = s.size
    q1, med, q3 = (s[int(f * (n - 1))] for f in (0.25, 0.5, 0.75))
    keep = imp >= med + 1.5 * (q3 - q1)
    return torch.from_numpy(np.where(keep, m, b)), keep


def test_only_the_row_whose_distribution_moved_is_taken():
    base = torch.zeros(4, 5)
    step = torch.tensor([0.02, -0.01, 0.03, -0.02, 0.01])
    model = base + step  # every row changes a little, the same way
    model[2, 3] = 2.0  # one large change that reshapes row 2's distribution
    out = run("arcee_fusion", base, [model])
    expected, keep = oracle(base, model)
    torch.testing.assert_close(out.double(), expected)
    # Rows 0, 1, 3 shift alike (same small KL); row 2's KL is far larger, so its whole row is taken.
    taken = torch.zeros(4, 5, dtype=torch.bool)
    taken[2] = True
    assert torch.equal(torch.from_numpy(keep), taken)
    assert torch.equal(out[2], model[2]) and torch.equal(out[[0, 1, 3]], base[[0, 1, 3]])


def test_mostly_unchanged_tensor_takes_every_change():
    # With more than 3/4 of the entries unchanged the quartiles are 0, so the threshold is 0 and every
    # changed entry (importance >= 0) is taken: mergekit's rule, reproduced.
    base = torch.zeros(4, 5)
    model = base.clone()
    model[1, 2], model[3, 0] = 0.7, -0.2
    assert torch.equal(run("arcee_fusion", base, [model]), model)


def test_random_tensors_match_oracle_and_take_values_from_one_side():
    g = torch.Generator().manual_seed(4)
    for shape in [(16, 24), (50,), (3, 4, 6)]:
        base = torch.randn(*shape, generator=g)
        model = base + 0.3 * torch.randn(*shape, generator=g)
        out = run("arcee_fusion", base, [model])
        expected, keep = oracle(base, model)
        assert torch.equal((out == model) & (out != base), torch.from_numpy(keep) & (model != base))
        torch.testing.assert_close(out.double(), expected)
        assert keep.mean() < 0.5
        if len(shape) == 2:
            assert keep.sum() > 0


# --------------------------------------------------------------------------- row chunks
def _fused(base: dict, model: dict, chunk_elements=None) -> dict:
    return mergelab.merge_state_dicts(base, [model], "arcee_fusion", chunk_elements=chunk_elements)


def _assert_chunking_changes_nothing(base: dict, model: dict, sizes) -> dict:
    whole = _fused(base, model)
    for name in base:  # the default keeps these small tensors whole: the reference computation
        imp = importance_scores(model[name], base[name])
        keep = imp >= fusion_threshold(imp)
        assert torch.equal(whole[name], base[name] + (model[name] - base[name]) * keep.float())
    for size in sizes:
        chunked = _fused(base, model, chunk_elements=size)
        for name in base:
            assert torch.equal(chunked[name], whole[name]), (name, size)
    return whole


def test_row_chunks_give_the_whole_tensor_result_exactly():
    g = torch.Generator().manual_seed(11)
    base = {
        "wide": torch.randn(64, 48, generator=g),
        "cube": torch.randn(10, 7, 12, generator=g),
        "bias": torch.randn(300, generator=g),  # 1-D: never chunked
        "odd": torch.randn(37, 5, generator=g),
    }
    model = {k: v + 0.3 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    # 1 row per chunk, a few rows per chunk with a short last chunk, and chunks larger than the tensor.
    _assert_chunking_changes_nothing(base, model, [1, 100, 48 * 5 + 7, 2000, 10_000])


def test_row_chunks_with_tied_importance():
    # Every row is the same small step pattern, so every row has the same KL and the importance takes
    # only a handful of distinct values: the quartiles (and the threshold) fall on long runs of ties.
    g = torch.Generator().manual_seed(12)
    base = {"w": torch.zeros(120, 16)}
    steps = torch.tensor([0.0, 0.25, -0.5, 1.0])[torch.randint(0, 4, (16,), generator=g)]
    model = {"w": base["w"] + steps}
    model["w"][::7, 3] += 2.0  # a few rows move further: a second KL value
    imp = importance_scores(model["w"], base["w"])
    assert imp.unique().numel() <= 8
    whole = _assert_chunking_changes_nothing(base, model, [16, 16 * 7, 16 * 50])
    kept = whole["w"] != base["w"]
    assert kept.any() and not kept.all()


def test_row_chunks_when_most_rows_barely_change_the_distribution():
    # Rows shifted by a constant keep their softmax up to rounding: KL ~ 0, sometimes slightly
    # negative, so most importance scores sit at or just around zero, on both sides of it.
    g = torch.Generator().manual_seed(13)
    base = {"w": torch.randn(200, 32, generator=g)}
    model = {"w": base["w"] + 0.5}
    model["w"][:40] = base["w"][:40]  # identical rows: importance exactly 0
    moved = torch.arange(40, 200, 9)
    model["w"][moved] += 0.8 * torch.randn(moved.numel(), 32, generator=g)
    imp = importance_scores(model["w"], base["w"])
    assert (imp < 0).any() and (imp == 0).sum() >= 40 * 32
    whole = _assert_chunking_changes_nothing(base, model, [32, 32 * 3, 32 * 64])
    assert torch.equal(whole["w"][:40], base["w"][:40])
    assert not torch.equal(whole["w"], base["w"])


def test_single_long_rows_per_chunk_match_the_whole_tensor():
    # Rows longer than PyTorch's parallel grain: a one-row chunk must still sum its KL row by row.
    g = torch.Generator().manual_seed(14)
    base = {"w": torch.randn(3, 40_000, generator=g)}
    model = {"w": base["w"] + 0.05 * torch.randn(3, 40_000, generator=g)}
    _assert_chunking_changes_nothing(base, model, [40_000])


def test_prepare_tensor_streams_exact_quantiles_and_leaves_whole_tensors_to_merge():
    m = get_method("arcee_fusion")
    assert m.chunkable
    g = torch.Generator().manual_seed(15)
    base = torch.randn(9, 13, generator=g)
    model = base + 0.2 * torch.randn(9, 13, generator=g)
    x = inputs("arcee_fusion", base, [model])
    assert m.prepare_tensor(TensorSource("t", (9, 13), x.params, x.model_params, 1, 1, lambda: iter([x]))) is None
    for chunks in (2, 4, 9):
        assert torch.equal(run("arcee_fusion", base, [model], chunks=chunks), run("arcee_fusion", base, [model]))
    # The streamed threshold is the whole tensor's: sorted importance at the quartile ranks.
    imp = importance_scores(model, base)
    s = imp.reshape(-1).sort().values
    q1, med, q3 = (s[k - 1] for k in quantile_ranks(imp.numel()))
    rows = [(0, 4), (4, 5), (5, 9)]

    def chunks():
        for a, b in rows:
            yield inputs("arcee_fusion", base[a:b], [model[a:b]])

    got = m.prepare_tensor(TensorSource("t", (9, 13), x.params, x.model_params, 1, len(rows), chunks))
    assert got.dtype == torch.float32 and got.dim() == 0
    assert torch.equal(got, med + 1.5 * (q3 - q1)) and torch.equal(got, fusion_threshold(imp))


def test_a_chunk_without_statistics_is_refused():
    base = torch.zeros(6, 4)
    x = inputs("arcee_fusion", base[:3], [base[:3] + 1])
    x.shape = (6, 4)
    with pytest.raises(RuntimeError, match="statistics"):
        get_method("arcee_fusion").merge(x)


def test_quantile_ranks_match_the_float32_index_of_whole_tensors():
    for n in [1, 2, 3, 4, 5, 7, 1000, 4_194_304, 5_592_409]:
        assert quantile_ranks(n) == [i + 1 for i in (torch.tensor([0.25, 0.5, 0.75]) * (n - 1)).long().tolist()]
