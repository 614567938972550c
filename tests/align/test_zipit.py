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


def _live_convnet(seed: int):
    """The conftest's conv net with BatchNorm statistics that keep every channel alive (a dead channel is
    constant, and constant features pair arbitrarily)."""
    from tests.align.conftest import convnet

    net = convnet(seed)
    with torch.no_grad():
        for bn in (net.bn1, net.bn2):
            bn.running_mean.normal_(0, 0.1)
            bn.bias.uniform_(0.5, 1.0)
        net.fc1.bias.uniform_(2.0, 3.0)
    return net


def test_conv_net_depth_zero_is_the_ensemble_and_permuted_copy_is_the_model():
    """ZipIt for a conv net with BatchNorm and a flatten: depth 0 is both nets side by side (the ensemble,
    averaged or both heads), a permuted copy zipped fully is the net, partial zipping has the widths it says."""
    from mergelab.align.zipit import zipit_conv
    from tests.align.conftest import ConvNet

    a, b = _live_convnet(0), _live_convnet(1)
    x = torch.randn(200, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    test = torch.randn(30, 1, 8, 8, generator=torch.Generator().manual_seed(2))

    def build(state):
        net = ConvNet(width=state["conv1.weight"].shape[0])
        net.conv2 = torch.nn.Conv2d(state["conv2.weight"].shape[1], state["conv2.weight"].shape[0], 3, stride=2,
                                    padding=1)
        net.bn2 = torch.nn.BatchNorm2d(state["conv2.weight"].shape[0])
        net.fc1 = torch.nn.Linear(state["fc1.weight"].shape[1], state["fc1.weight"].shape[0])
        net.fc2 = torch.nn.Linear(state["fc2.weight"].shape[1], state["fc2.weight"].shape[0])
        net.load_state_dict(state)
        return net.eval()

    with torch.no_grad():
        fa, fb = a(test), b(test)
        ens = build(zipit_conv(a, b, x, depth=0))
        assert ens.conv1.weight.shape[0] == 12 and ens.fc1.weight.shape == (20, 256)
        assert torch.allclose(ens(test), (fa + fb) / 2, atol=1e-4 * float(fa.abs().max()))
        both = build(zipit_conv(a, b, x, depth=0, heads="concat"))(test)
        assert torch.allclose(both, torch.cat([fa, fb], 1), atol=1e-4 * float(fa.abs().max()))
        spec = chain_spec({k: tuple(v.shape) for k, v in a.state_dict().items()})
        c = _live_convnet(5)
        c.load_state_dict(apply_permutations(a.state_dict(), spec, random_permutations(spec, torch.Generator().manual_seed(4))))
        full = build(zipit_conv(a, c, x))
        assert full.conv1.weight.shape == a.conv1.weight.shape and full.fc1.weight.shape == a.fc1.weight.shape
        assert torch.allclose(full(test), fa, atol=1e-4 * float(fa.abs().max()))
        part = zipit_conv(a, b, x, depth=1)  # conv1 zipped (6 channels); conv2 and fc1 side by side
        assert part["conv2.weight"].shape == (16, 6, 3, 3) and part["fc1.weight"].shape == (20, 256)
        assert not torch.allclose(build(zipit_conv(a, b, x))(test), (fa + fb) / 2, atol=1e-2)
    with pytest.raises(MergeLabError, match="outside"):
        zipit_conv(a, b, x, depth=4)
