"""nearswap: a hand-worked example, endpoints, and the bound |merged - base| <= t."""

import torch

from tests.methods.mergekit_family_util import run


def test_by_hand():
    base = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0])
    model = torch.tensor([0.05, -0.2, 1.0, 0.0, 0.75])
    # |d| = .05, .2, 1, 0, .25 -> w = clamp(0.1/|d|) = 1, .5, .1, 1, .4
    out = run("nearswap", base, [model], {"t": 0.1})
    torch.testing.assert_close(out, torch.tensor([0.05, -0.1, 0.1, 0.0, 0.9]))


def test_zero_t_is_the_base_and_large_t_is_the_model():
    g = torch.Generator().manual_seed(0)
    base, model = torch.randn(6, 7, generator=g), torch.randn(6, 7, generator=g)
    assert torch.equal(run("nearswap", base, [model], {"t": 0.0}), base)
    assert torch.equal(run("nearswap", base, [model], {"t": 100.0}), model)


def test_moves_at_most_t_toward_the_model_and_chunks_agree():
    g = torch.Generator().manual_seed(1)
    base, model = torch.randn(9, 5, generator=g), torch.randn(9, 5, generator=g)
    out = run("nearswap", base, [model], {"t": 0.3})
    assert float((out - base).abs().max()) <= 0.3 + 1e-6
    assert torch.all((out - base) * (model - base) >= 0)
    assert torch.equal(run("nearswap", base, [model], {"t": 0.3}, chunks=4), out)
