"""The ResNet-style net: its spec through `mergelab align --spec` (residual stream shared by every block),
and PLeaS on it (full width = the ensemble, a permuted copy at one width = the model, width checked)."""

from __future__ import annotations

import pytest
import torch
import yaml

from mergelab.align.matching import weight_matching
from mergelab.align.resnet import ResNet, pleas_resnet, resnet_spec, spec_mapping
from mergelab.align.spec import apply_permutations, invert, random_permutations
from mergelab.errors import MergeLabError
from tests.align.conftest import close, run_cli


def resnet(seed: int, channels: int = 6, inner: int = 5, classes: int = 4) -> ResNet:
    torch.manual_seed(seed)
    net = ResNet(channels, inner, classes, blocks=2)
    with torch.no_grad():  # non-trivial BatchNorm statistics and affine parameters
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_()
                m.bias.normal_()
    return net.eval()


def images(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_spec_residual_stream_is_one_group_and_align_cli_recovers(tmp_path):
    net = resnet(0)
    spec = resnet_spec(net)
    assert sorted(spec.perms) == ["block0", "block1", "res"]
    stream = {k for k, _, _ in [(k, i, a) for k, i, a in spec.members("res")]}
    assert {"stem.weight", "blocks.0.conv1.weight", "blocks.1.conv2.weight", "blocks.1.bn2.running_var",
            "fc.weight"} <= stream
    # a chain spec cannot describe it: the first block's conv2 feeds the stream, not the next conv
    rp = random_permutations(spec, torch.Generator().manual_seed(3))
    sd = net.state_dict()
    permuted = apply_permutations(sd, spec, rp)
    x = images(5, 0)
    other = ResNet.from_state(permuted)
    with torch.no_grad():
        assert close(other(x), net(x))
    # permuting the stream in one block only breaks the function: the skip connection ties them
    broken = dict(sd)
    broken["blocks.0.conv2.weight"] = sd["blocks.0.conv2.weight"][rp["res"]]
    with torch.no_grad():
        assert not close(ResNet.from_state(broken)(x), net(x))
    (tmp_path / "spec.yml").write_text(yaml.safe_dump(spec_mapping(2)))
    torch.save(sd, tmp_path / "a.pt")
    torch.save(permuted, tmp_path / "b.pt")
    r = run_cli("align", tmp_path / "a.pt", tmp_path / "b.pt", "-o", tmp_path / "c.pt", "--spec", tmp_path / "spec.yml")
    assert r.returncode == 0, r.stderr
    c = torch.load(tmp_path / "c.pt", weights_only=True)
    assert all(torch.equal(c[k], sd[k]) for k in sd)
    # Two different nets. The state dict's shapes happen to chain (6 -> 5 -> 6 -> 5 -> 6): a chain spec would
    # permute the stream independently per block and break the skip connections. align recognises the layout
    # and takes the residual spec, so with or without --spec, by weight or by activation matching (on images),
    # the aligned net is B's function.
    from mergelab.align.spec import chain_spec, infer_spec

    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    assert sorted(infer_spec(None, shapes).perms) == ["block0", "block1", "res"]
    chain = chain_spec(shapes)
    with torch.no_grad():
        assert not close(ResNet.from_state(apply_permutations(sd, chain, random_permutations(
            chain, torch.Generator().manual_seed(5))))(x), net(x))
    torch.save(resnet(9).state_dict(), tmp_path / "b9.pt")
    torch.save(images(64, 7), tmp_path / "images.pt")
    runs = {"weight": [], "weight-spec": ["--spec", tmp_path / "spec.yml"],
            "activation": ["--method", "activation", "--calibration", tmp_path / "images.pt"]}
    for name, flags in runs.items():
        out = tmp_path / f"aligned-{name}.pt"
        r = run_cli("align", tmp_path / "a.pt", tmp_path / "b9.pt", "-o", out, *flags)
        assert r.returncode == 0, r.stderr
        aligned = torch.load(out, weights_only=True)
        assert not torch.equal(aligned["blocks.0.conv2.weight"], resnet(9).state_dict()["blocks.0.conv2.weight"])
        with torch.no_grad():
            assert close(ResNet.from_state(aligned)(x), resnet(9)(x)), name

def test_weight_matching_returns_inverse_permutation():
    net = resnet(1)
    spec = resnet_spec(net)
    rp = random_permutations(spec, torch.Generator().manual_seed(4))
    sd = net.state_dict()
    found = weight_matching(spec, sd, apply_permutations(sd, spec, rp))
    inv = invert(rp)
    assert all(torch.equal(found[g], inv[g]) for g in spec.perms)


def test_pleas_full_width_is_the_ensemble_and_permuted_copy_is_the_model():
    a, b = resnet(0), resnet(1)
    x, test = images(100, 1), images(20, 2)
    r = pleas_resnet(a, b, x, width=2.0)
    assert r.widths == {"res": 12, "block0": 10, "block1": 10} and set(r.merged_units.values()) == {0}
    wide = ResNet.from_state(r.state)
    assert wide.stem.weight.shape[0] == 12 and wide.blocks[1].conv1.weight.shape[0] == 10
    with torch.no_grad():
        ens = (a(test) + b(test)) / 2
        assert torch.allclose(wide(test), ens, atol=1e-4 * float(ens.abs().max()))
        r = pleas_resnet(a, b, x, width=2.0, heads="concat")
        both = torch.cat([a(test), b(test)], 1)
        assert torch.allclose(ResNet.from_state(r.state)(test), both, atol=1e-4 * float(both.abs().max()))
        spec = resnet_spec(a)
        c = ResNet.from_state(apply_permutations(a.state_dict(), spec,
                                                 random_permutations(spec, torch.Generator().manual_seed(2))))
        m = ResNet.from_state(pleas_resnet(a, c, x, width=1.0).state)
        assert torch.allclose(m(test), a(test), atol=1e-4 * float(a(test).abs().max()))
    r = pleas_resnet(a, b, x, width={"res": 9, "default": 1.0})
    assert r.widths == {"res": 9, "block0": 5, "block1": 5} and r.merged_units == {"res": 3, "block0": 5, "block1": 5}
    assert ResNet.from_state(r.state)(test).shape == (20, 4)


def test_pleas_width_out_of_range():
    a, b = resnet(0), resnet(1)
    with pytest.raises(MergeLabError, match=r"'stem' \(res\).*\[6, 12\]"):
        pleas_resnet(a, b, images(20, 0), width=2.5)
    with pytest.raises(MergeLabError, match="blocks.1.conv1"):
        pleas_resnet(a, b, images(20, 0), width={"block1": 4})


def test_pleas_recipe_on_trained_resnet_state_dicts(tmp_path):
    """`mergelab pleas` on two ResNets really trained on digits from different seeds (6 epochs each), given
    as plain state dicts: the layout is recognised from the keys, the calibration images may be flattened,
    width 2 is the ensemble (the nets' own forward passes average), a mapping of widths is honoured, and
    parameters a ResNet cannot honour, a wrong layout or wrong inputs are refused with nothing written."""
    from mergelab.align.bench import load_digits_data, train_resnet

    data = load_digits_data()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        nets = [train_resnet(data.x_train, data.y_train, 10, 6, seed, 6) for seed in (0, 1)]
    finally:
        torch.set_num_threads(threads)
    test = data.x_test.reshape(-1, 1, 8, 8)
    with torch.no_grad():
        logits = [n(test) for n in nets]
    assert all(float((lg.argmax(1) == data.y_test).float().mean()) > 0.5 for lg in logits)  # chance: 0.1
    for i, n in enumerate(nets):
        torch.save(n.state_dict(), tmp_path / f"r{i}.pt")
    torch.save(data.x_train[:400], tmp_path / "calib.pt")  # [400, 64]: flattened 8x8 images

    def recipe(name, **extra):
        path = tmp_path / f"{name}.yml"
        body = {"merge_method": "pleas", "models": [str(tmp_path / "r0.pt"), str(tmp_path / "r1.pt")],
                "calibration": str(tmp_path / "calib.pt"), **extra}
        path.write_text(yaml.safe_dump(body))
        return path

    r = run_cli("pleas", recipe("full", parameters={"width": 2.0}), "-o", tmp_path / "full.pt")
    assert r.returncode == 0, r.stderr
    wide = ResNet.from_state(torch.load(tmp_path / "full.pt", weights_only=True))
    assert wide.stem.weight.shape[0] == 12 and wide.blocks[0].conv1.weight.shape[0] == 12
    with torch.no_grad():
        ens = (logits[0] + logits[1]) / 2
        assert torch.allclose(wide(test), ens, atol=1e-4 * float(ens.abs().max()))
    r = run_cli("pleas", recipe("mixed", architecture="resnet", parameters={"width": {"res": 9, "default": 1.0}}),
                "-o", tmp_path / "mixed.pt")
    assert r.returncode == 0, r.stderr
    assert "res 9 (3 merged)" in r.stdout and "block1 6 (6 merged)" in r.stdout
    with torch.no_grad():
        out = ResNet.from_state(torch.load(tmp_path / "mixed.pt", weights_only=True))(test)
    assert out.shape == (len(test), 10)
    before = set(tmp_path.iterdir())
    torch.save(torch.randn(10, 3, 8, 8), tmp_path / "bad.pt")  # three channels; saved after `before`
    before.add(tmp_path / "bad.pt")
    for extra, needle in (({"parameters": {"activation": "gelu"}}, "do not apply to a ResNet"),
                          ({"architecture": "vgg"}, "architecture must be one of mlp, resnet"),
                          ({"calibration": str(tmp_path / "bad.pt")}, "the ResNet takes images [N, 1, H, W]"),
                          ({"parameters": {"width": 2.5}}, "outside the allowed range [6, 12]")):
        r = run_cli("pleas", recipe("bad", **extra), "-o", tmp_path / "bad-out.pt")
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert needle in " ".join(r.stderr.split()), r.stderr
        assert set(tmp_path.iterdir()) == before | {tmp_path / "bad.yml"}
