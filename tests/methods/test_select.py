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
    from mergelab.methods.ties import bracketed_thresholds, keep_count, tensor_thresholds

    g = torch.Generator().manual_seed(0)
    base = torch.randn(512, 300, generator=g)
    models = [base + 0.01 * torch.randn(512, 300, generator=g) for _ in range(2)]
    k = keep_count(0.3, base.numel(), "mergekit")
    expected = [float((m - base).abs().flatten().sort(descending=True).values[k - 1]) for m in models]
    src = _chunked_source(base, models, 0.3, 64)
    assert bracketed_thresholds(src, [k, k]) == expected  # representative first chunk: one pass
    # A first chunk 100x smaller than the rest puts the bracket in the wrong place: None, and the
    # caller's two-pass radix select still gives the exact value.
    skewed = [m.clone() for m in models]
    for m in skewed:
        m[:64] = base[:64] + (m[:64] - base[:64]) / 100
    expected = [float((m - base).abs().flatten().sort(descending=True).values[k - 1]) for m in skewed]
    src = _chunked_source(base, skewed, 0.3, 64)
    assert bracketed_thresholds(src, [k, k]) is None
    assert tensor_thresholds(src) == expected
