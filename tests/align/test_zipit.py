"""ZipIt-style merging of MLPs: greedy pairs may join two units of one model; depth 0 is the ensemble;
a permuted copy zipped fully is the model; partial zipping keeps the tail side by side."""

from __future__ import annotations

import pytest
import torch

from mergelab.align.pleas import mlp_forward
from mergelab.align.spec import apply_permutations, chain_spec, random_permutations
from mergelab.align.zipit import greedy_pairs, merge_unmerge, zipit_mlp
from mergelab.errors import MergeLabError
from tests.align.conftest import mlp


def _state(net):
    return {k: v.detach() for k, v in net.state_dict().items()}


def test_greedy_pairs_join_units_of_one_model():
    g = torch.Generator().manual_seed(0)
    x, y, z = (torch.randn(50, generator=g) for _ in range(3))
    # columns 0, 1 are "model A", 2, 3 "model B": A's two units are copies, B's unit 3 follows y
    f = torch.stack([x, 2 * x + 1, y, y + 0.01 * z], 1)
    assert sorted(greedy_pairs(f)) == [(0, 1), (2, 3)]
    M, U = merge_unmerge([(0, 1), (2, 3)], 4)
    assert torch.equal(M, torch.tensor([[0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5]], dtype=torch.float64))
    assert torch.equal(U, 2 * M.T)


def test_depth_zero_is_the_ensemble_and_permuted_copy_is_the_model():
    a, b = _state(mlp(0)), _state(mlp(1))
    x = torch.randn(300, 8, generator=torch.Generator().manual_seed(1))
    test = torch.randn(20, 8)
    ens = (mlp_forward(a, test) + mlp_forward(b, test)) / 2
    z = zipit_mlp(a, b, x, depth=0)
    assert z["0.weight"].shape == (32, 8) and z["2.weight"].shape == (24, 32)
    assert torch.allclose(mlp_forward(z, test), ens, atol=1e-5)
    both = zipit_mlp(a, b, x, depth=0, heads="concat")
    assert torch.allclose(mlp_forward(both, test), torch.cat([mlp_forward(a, test), mlp_forward(b, test)], 1),
                          atol=1e-5)
    spec = chain_spec({k: tuple(v.shape) for k, v in a.items()})
    c = apply_permutations(a, spec, random_permutations(spec, torch.Generator().manual_seed(3)))
    full = zipit_mlp(a, c, x)
    assert full["0.weight"].shape == a["0.weight"].shape and full["2.weight"].shape == a["2.weight"].shape
    assert torch.allclose(mlp_forward(full, test), mlp_forward(a, test), atol=1e-5)
    part = zipit_mlp(a, b, x, depth=1)  # first hidden layer zipped (16), second side by side (24)
    assert part["0.weight"].shape == (16, 8) and part["2.weight"].shape == (24, 16) and part["4.weight"].shape == (3, 24)
    with pytest.raises(MergeLabError, match="outside"):
        zipit_mlp(a, b, x, depth=3)
