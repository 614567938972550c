"""RoutedLinear's two exact paths for dense per-expert deltas against an oracle that forms each input's
weights ``W + sum_k w[b, k] D_k`` one input at a time (outputs and gradients)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from mergelab.errors import MergeLabError
from mergelab.routed.layers import Mixture, RoutedLinear


def make(i=12, o=7, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(i, o)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(o, i, generator=g))
        lin.bias.copy_(torch.randn(o, generator=g))
    ds = [torch.randn(o, i, generator=g) for _ in range(k)]
    bs = [torch.randn(o, generator=g) for _ in range(k)]
    mix = Mixture(k)
    return RoutedLinear(lin, mix, {"weight": ds, "bias": bs}), lin, ds, bs, mix


def oracle(lin, ds, bs, x, w):
    rows = []
    for b in range(x.shape[0]):
        weight = lin.weight + sum(w[b, k] * ds[k] for k in range(len(ds)))
        bias = lin.bias + sum(w[b, k] * bs[k] for k in range(len(bs)))
        rows.append(F.linear(x[b], weight, bias))
    return torch.stack(rows)


@pytest.mark.parametrize("t", [2, 5])
def test_formed_and_deltas_paths_are_the_oracle_with_its_gradients(t, monkeypatch):
    rl, lin, ds, bs, mix = make()
    g = torch.Generator().manual_seed(1)
    x0, w0 = torch.randn(4, t, 12, generator=g), torch.randn(4, 3, generator=g)
    probe = torch.randn(4, t, 7, generator=g)  # a loss that weighs every output differently

    def run(fn):
        x, w = x0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
        y = fn(x, w)
        (y * probe).sum().backward()
        return y.detach(), x.grad, w.grad

    want = run(lambda x, w: oracle(lin, ds, bs, x, w))
    for path in ("formed", "deltas"):
        monkeypatch.setattr(RoutedLinear, "path", path)

        def routed(x, w):
            mix.w = w
            return rl(x)

        got = run(routed)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)


def test_auto_takes_the_path_that_holds_fewer_numbers(monkeypatch):
    rl, *_ = make(i=12, k=3)
    assert rl._choose(torch.zeros(1, 3, 12)) == "deltas"  # T K = 9 < I = 12
    assert rl._choose(torch.zeros(1, 4, 12)) == "formed"  # 12, not fewer
    monkeypatch.setattr(RoutedLinear, "path", "sideways")
    with pytest.raises(MergeLabError, match="RoutedLinear.path"):
        rl._choose(torch.zeros(1, 3, 12))
