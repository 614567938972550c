"""Exact k-th largest magnitude: streaming radix select against a full sort."""

import math

import pytest
import torch

from mergelab.methods.select import kth_largest_abs, kth_largest_in_memory, stream_of


@pytest.mark.parametrize("k", [1, 2, 17, 500, 999])
def test_streaming_radix_select_equals_sort(k):
    g = torch.Generator().manual_seed(k)
    x = torch.randn(1000, generator=g) * torch.rand(1000, generator=g) ** 4
    chunks = [x[i:i + 137] for i in range(0, 1000, 137)]
    expected = x.abs().sort(descending=True).values[k - 1].item()
    got = kth_largest_abs(stream_of(c.unsqueeze(0) for c in chunks), [k])[0]
    assert got == expected
    assert kth_largest_in_memory(x, k) == expected


def test_several_models_at_once_and_edge_ks():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 300, generator=g)
    t = kth_largest_abs(stream_of([x[:, :100], x[:, 100:]]), [5, 0])
    assert t[0] == x[0].abs().sort(descending=True).values[4].item()
    assert t[1] == math.inf
    # k at or past the count keeps everything: threshold 0
    assert kth_largest_abs(stream_of([x]), [300, 10**6]) == [0.0, 0.0]
    assert kth_largest_in_memory(x[0], 300) == 0.0


def test_ties_at_threshold_and_zeros():
    x = torch.tensor([0.0, 0.5, 0.5, 0.5, 2.0, -2.0, 0.0])
    assert kth_largest_abs(stream_of([x.unsqueeze(0)]), [3])[0] == 0.5
    assert kth_largest_in_memory(x, 2) == 2.0


def _chunked_source(base, models, density, rows_per_chunk):
    from mergelab.methods.registry import TensorInputs, TensorSource

    mp = [{"density": density, "weight": 1.0} for _ in models]
    starts = list(range(0, base.shape[0], rows_per_chunk))

    def chunks():
        for c, r in enumerate(starts):
            sl = slice(r, r + rows_per_chunk)
            yield TensorInputs(name="w", shape=tuple(base.shape), base=base[sl], models=[m[sl] for m in models],
                               params={}, model_params=mp, chunk=c, rows=(r, min(base.shape[0], r + rows_per_chunk)))

    return TensorSource("w", tuple(base.shape), {}, mp, len(models), len(starts), chunks)


def test_bracketed_thresholds_are_exact_and_fall_back_when_the_first_chunk_misleads():
    from mergelab.methods.select import bracketed_cuts, keep_count
    from mergelab.methods.ties import tensor_cuts

    g = torch.Generator().manual_seed(0)
    base = torch.randn(512, 300, generator=g)
    models = [base + 0.01 * torch.randn(512, 300, generator=g) for _ in range(2)]
    k = keep_count(0.3, base.numel(), "mergekit")
    expected = [float((m - base).abs().flatten().sort(descending=True).values[k - 1]) for m in models]
    src = _chunked_source(base, models, 0.3, 64)
    pairs = lambda s: lambda: ((c.base, c.models) for c in s.chunks())  # noqa: E731
    assert [c.value for c in bracketed_cuts(pairs(src), [k, k], base.numel())] == expected  # one pass
    # A first chunk 100x smaller than the rest puts the bracket in the wrong place: None, and the
    # caller's two-pass radix select still gives the exact value.
    skewed = [m.clone() for m in models]
    for m in skewed:
        m[:64] = base[:64] + (m[:64] - base[:64]) / 100
    expected = [float((m - base).abs().flatten().sort(descending=True).values[k - 1]) for m in skewed]
    src = _chunked_source(base, skewed, 0.3, 64)
    assert bracketed_cuts(pairs(src), [k, k], base.numel()) is None
    assert [c.value for c in tensor_cuts(src)] == expected


# --------------------------------------------------------------------------- signed k-th smallest
def _split(x: torch.Tensor, size: int) -> list:
    flat = x.reshape(-1)
    return [flat[i:i + size] for i in range(0, flat.numel(), size)]


def _check_all_ranks(x: torch.Tensor, sizes, ks=None):
    from mergelab.methods.select import kth_smallest

    flat = x.reshape(-1)
    n = flat.numel()
    if ks is None:  # the ends, the quartiles and a spread of ranks between them
        ks = sorted({1, 2, n // 4 + 1, n // 2 + 1, (3 * n) // 4 + 1, n - 1, n} | set(range(1, n + 1, max(1, n // 23))))
        ks = [k for k in ks if 1 <= k <= n]
    expected = flat.sort().values
    for size in sizes:
        got = kth_smallest(stream_of(_split(x, size)), ks)
        want = [expected[k - 1].item() for k in ks]
        assert got == want, f"chunks of {size}"
        for k in ks[:: max(1, len(ks) // 7)]:
            assert got[ks.index(k)] == torch.kthvalue(flat, k).values.item()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kth_smallest_signed_equals_sort(seed):
    g = torch.Generator().manual_seed(seed)
    # Magnitudes over many binades, both signs, so both radix passes and the sign map are exercised.
    x = torch.randn(613, generator=g) * torch.exp(8 * torch.randn(613, generator=g))
    _check_all_ranks(x, [1, 7, 100, 613, 10_000])


def test_kth_smallest_ties_all_equal_negatives_and_zeros():
    g = torch.Generator().manual_seed(5)
    ties = torch.randint(-3, 4, (500,), generator=g).float() * 0.25
    _check_all_ranks(ties, [1, 33, 500])
    _check_all_ranks(torch.full((64,), -1.5), [1, 10, 64])
    _check_all_ranks(torch.full((64,), 2.0), [5, 64])
    negatives = -torch.rand(400, generator=g) * 10 - 1e-30
    _check_all_ranks(negatives, [3, 128])
    # Values that share the high 16 bits differ only in the second pass.
    close = -(1.0 + torch.arange(300).float() * 2 ** -23)
    _check_all_ranks(close[torch.randperm(300, generator=g)], [1, 41, 300])


def test_kth_smallest_mixed_zeros_compare_equal():
    from mergelab.methods.select import kth_smallest

    x = torch.tensor([0.0, -0.0, 1.0, -0.0, -2.0, 0.0, 3.0, -0.0])
    expected = [-2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 3.0]
    for size in (1, 3, 8):
        got = kth_smallest(stream_of(_split(x, size)), range(1, 9))
        assert got == expected  # -0.0 == 0.0: either zero is a correct answer
    only_zeros = torch.tensor([-0.0, 0.0, -0.0, 0.0])
    assert kth_smallest(stream_of([only_zeros]), [1, 2, 3, 4]) == [0.0] * 4


def test_kth_smallest_chunk_shapes_edge_ranks_and_callable_ks():
    from mergelab.methods.select import kth_smallest

    g = torch.Generator().manual_seed(9)
    x = torch.randn(40, 25, generator=g)
    s = x.reshape(-1).sort().values
    rows = [x[i:i + 6] for i in range(0, 40, 6)]  # 2-D row chunks: every entry counts once
    n = x.numel()
    assert kth_smallest(stream_of(rows), [1, n, 500]) == [s[0].item(), s[-1].item(), s[499].item()]
    assert kth_smallest(stream_of(rows), lambda total: [total // 2 + 1]) == [s[n // 2].item()]
    assert kth_smallest(stream_of(rows), [0, -3, n + 1]) == [-math.inf, -math.inf, math.inf]
    assert kth_smallest(stream_of([]), [1]) == [math.inf]
    assert kth_smallest(stream_of([x.double()]), [7]) == [s[6].item()]  # cast to float32
    extremes = torch.tensor([-3.4028235e38, 3.4028235e38, -1e-45, 1e-45, 0.0])
    assert kth_smallest(stream_of(_split(extremes, 2)), range(1, 6)) == extremes.sort().values.tolist()


def test_kth_smallest_reads_each_chunk_at_most_twice():
    from mergelab.methods.select import kth_smallest

    calls = []
    x = torch.randn(1000, generator=torch.Generator().manual_seed(3))

    def chunks():
        calls.append(1)
        return iter(_split(x, 128))

    assert kth_smallest(chunks, [250, 500, 750]) == [x.sort().values[k - 1].item() for k in (250, 500, 750)]
    assert len(calls) == 2
