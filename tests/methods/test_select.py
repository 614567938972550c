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
