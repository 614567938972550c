"""PLeaS (arXiv 2407.02447) on MLPs: exact ensemble at full width, exact copy at one model's width for a
permuted copy, the paper's merged first layer worked out independently, and the command's errors."""

from __future__ import annotations

import pytest
import torch
import yaml

from mergelab.align.pleas import mlp_forward, pleas_mlp
from mergelab.align.spec import apply_permutations, chain_spec, random_permutations
from mergelab.errors import MergeLabError
from tests.align.conftest import mlp, run_cli


def _models():
    return mlp(0).state_dict(), mlp(1).state_dict(), torch.randn(300, 8, generator=torch.Generator().manual_seed(0))


def _relu_net(state, x):  # oracle forward, written independently of mlp_forward
    h = torch.relu(x @ state["0.weight"].T + state["0.bias"])
    h = torch.relu(h @ state["2.weight"].T + state["2.bias"])
    return h @ state["4.weight"].T + state["4.bias"]


def test_full_width_is_the_exact_ensemble():
    a, b, x = _models()
    test = torch.randn(40, 8)
    r = pleas_mlp(a, b, x, width=2.0)
    assert r.widths == {"P0": 32, "P1": 24} and r.merged_units == {"P0": 0, "P1": 0}
    assert tuple(r.state["2.weight"].shape) == (24, 32)
    ens = (_relu_net(a, test) + _relu_net(b, test)) / 2
    assert torch.allclose(_relu_net(r.state, test), ens, atol=1e-5)
    # the masked blocks: A-only units never read B-only units
    assert r.state["2.weight"][:12, 16:].abs().max() == 0 and r.state["2.weight"][12:, :16].abs().max() == 0
    rc = pleas_mlp(a, b, x, width={"default": 2.0}, heads="concat")
    assert torch.allclose(_relu_net(rc.state, test), torch.cat([_relu_net(a, test), _relu_net(b, test)], 1), atol=1e-5)


def test_permuted_copy_at_one_width_is_the_model():
    a, _, x = _models()
    spec = chain_spec({k: tuple(v.shape) for k, v in a.items()})
    b = apply_permutations(a, spec, random_permutations(spec, torch.Generator().manual_seed(3)))
    r = pleas_mlp(a, b, x, width=1.0)
    test = torch.randn(40, 8)
    assert torch.allclose(_relu_net(r.state, test), _relu_net(a, test), atol=1e-5)


def test_partial_width_first_layer_is_the_papers_merge():
    """The first layer's inputs are the shared inputs and its targets are linear in them, so its least
    squares solution is exact: merged rows (W_A + W_B')/2 on the most similar pairs, then W_A and W_B' on
    the rest (B' = B aligned to A); widths per group from a mapping (by group and by layer name)."""
    a, b, x = _models()
    r = pleas_mlp(a, b, x, width={"P0": 24, "2": 1.5})
    assert r.widths == {"P0": 24, "P1": 18} and r.merged_units == {"P0": 8, "P1": 6}
    bp = {k: v[r.perms["P0"]] if k.startswith("0.") else v for k, v in b.items()}
    ha = torch.relu(x @ a["0.weight"].T + a["0.bias"])
    hb = torch.relu(x @ bp["0.weight"].T + bp["0.bias"])
    sim = (ha.double() * hb.double()).sum(0)
    top = torch.argsort(sim, descending=True)[:8].sort().values
    rest = torch.tensor([i for i in range(16) if i not in set(top.tolist())])
    want = torch.cat([(a["0.weight"][top] + bp["0.weight"][top]) / 2, a["0.weight"][rest], bp["0.weight"][rest]])
    assert torch.allclose(r.state["0.weight"], want, atol=1e-5)
    # more width never hurts the fit to the ensemble here
    test = torch.randn(200, 8)
    ens = (_relu_net(a, test) + _relu_net(b, test)) / 2
    errs = [float(((mlp_forward(pleas_mlp(a, b, x, width=w).state, test) - ens) ** 2).mean()) for w in (1.0, 1.5, 2.0)]
    assert errs[0] > errs[1] > errs[2] and errs[2] < 1e-10



def test_partial_width_hidden_layer_is_the_masked_least_squares():
    """The paper's step 3 on a hidden layer, written out here: inputs [(i_A+i_B)/2 | i_A | i_B] and targets
    [(o_A+o_B)/2 | o_A | o_B] (each model's own features, B aligned, pairs merged by similarity), solved per
    output block by plain least squares with A-only outputs blind to B-only inputs and the reverse."""
    a, b, x = _models()
    r = pleas_mlp(a, b, x, width={"P0": 24, "P1": 18})
    spec = chain_spec({k: tuple(v.shape) for k, v in a.items()})
    bp = apply_permutations(b, spec, r.perms)
    d = {k: v.double() for k, v in a.items()}, {k: v.double() for k, v in bp.items()}
    xd = x.double()
    ha, hb = (torch.relu(xd @ s["0.weight"].T + s["0.bias"]) for s in d)
    oa, ob = (h @ s["2.weight"].T + s["2.bias"] for h, s in zip((ha, hb), d))

    def split(fa, fb, merged):
        order = torch.argsort((fa * fb).sum(0), descending=True)
        m, rest = order[:merged].sort().values, order[merged:].sort().values
        feats = torch.cat([(fa[:, m] + fb[:, m]) / 2, fa[:, rest], fb[:, rest]], 1)
        return feats, [0] * merged + [1] * len(rest) + [2] * len(rest)

    Z, zb = split(ha, hb, 8)
    yb = [0] * 6 + [1] * 6 + [2] * 6  # P1's pairs ranked by their post-activation similarity
    order = torch.argsort((torch.relu(oa) * torch.relu(ob)).sum(0), descending=True)
    m, rest = order[:6].sort().values, order[6:].sort().values
    Y = torch.cat([(oa[:, m] + ob[:, m]) / 2, oa[:, rest], ob[:, rest]], 1)
    W = torch.zeros(18, 24, dtype=torch.float64)
    bias = torch.zeros(18, dtype=torch.float64)
    for block, banned in ((0, None), (1, 2), (2, 1)):
        rows = [i for i, v in enumerate(yb) if v == block]
        cols = [j for j, v in enumerate(zb) if v != banned]
        X = torch.cat([Z[:, cols], torch.ones(len(Z), 1, dtype=torch.float64)], 1)
        sol = torch.linalg.lstsq(X, Y[:, rows], driver="gelsd").solution
        W[torch.tensor(rows)[:, None], torch.tensor(cols)[None, :]] = sol[:-1].T
        bias[rows] = sol[-1]
    got = r.state["2.weight"].double()
    assert got[:6].abs().max() > 0 and got[6:12, 16:].abs().max() == 0 and got[12:, 8:16].abs().max() == 0
    assert torch.allclose(got, W, atol=1e-4 * float(W.abs().max()))
    assert torch.allclose(r.state["2.bias"].double(), bias, atol=1e-4 * float(bias.abs().max()))

def test_width_out_of_range():
    a, b, x = _models()
    with pytest.raises(MergeLabError, match=r"width for layer '0' \(P0\) is 2.5 x 16 = 40 units, outside the allowed range \[16, 32\]"):
        pleas_mlp(a, b, x, width=2.5)
    with pytest.raises(MergeLabError, match=r"'2' \(P1\) is 11 units"):
        pleas_mlp(a, b, x, width={"P1": 11})


def test_pleas_command(tmp_path):
    a, b, x = _models()
    torch.save(a, tmp_path / "a.pt")
    torch.save(b, tmp_path / "b.pt")
    torch.save(x, tmp_path / "x.pt")
    recipe = {"merge_method": "pleas", "models": [{"model": str(tmp_path / "a.pt")}, {"model": str(tmp_path / "b.pt")}],
              "calibration": str(tmp_path / "x.pt"), "parameters": {"width": 1.5}}
    (tmp_path / "r.yml").write_text(yaml.safe_dump(recipe))
    r = run_cli("pleas", tmp_path / "r.yml", "-o", tmp_path / "m.pt")
    assert r.returncode == 0, r.stderr
    m = torch.load(tmp_path / "m.pt", weights_only=True)
    net = mlp(0, (8, 24, 18, 3))
    net.load_state_dict(m)  # a plain PyTorch MLP of the chosen widths
    assert torch.allclose(net(x[:5]), _relu_net(m, x[:5]), atol=1e-6)
    recipe["parameters"] = {"width": 0.5}
    (tmp_path / "bad.yml").write_text(yaml.safe_dump(recipe))
    recipe["parameters"] = {"widht": 1.5}
    (tmp_path / "typo.yml").write_text(yaml.safe_dump(recipe))
    before = set(tmp_path.iterdir())
    for name, needle in (("bad.yml", "outside the allowed range [16, 32]"), ("typo.yml", "unknown parameter(s) widht")):
        r = run_cli("pleas", tmp_path / name, "-o", tmp_path / "n.pt")
        assert r.returncode == 2 and "Traceback" not in r.stderr and needle in " ".join(r.stderr.split()), r.stderr
    assert set(tmp_path.iterdir()) == before


def test_conv_net_full_width_ensemble_and_permuted_copy():
    """Conv layers fitted on unfolded patches, BatchNorm folded in and written back as the identity,
    conv maps flattened into a linear layer: the same two identities as for MLPs."""
    from mergelab.align.pleas import pleas_conv
    from tests.align.conftest import ConvNet, convnet

    a, b = convnet(0), convnet(1)
    x = torch.randn(200, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    test = torch.randn(30, 1, 8, 8)
    r = pleas_conv(a, b, x, width=2.0)
    assert r.widths == {"P0": 12, "P1": 16, "P2": 20}
    wide = ConvNet(width=12)
    wide.conv2, wide.bn2 = torch.nn.Conv2d(12, 16, 3, stride=2, padding=1), torch.nn.BatchNorm2d(16)
    wide.fc1, wide.fc2 = torch.nn.Linear(16 * 16, 20), torch.nn.Linear(20, 3)
    wide.load_state_dict(r.state)
    with torch.no_grad():
        ens = (a(test) + b(test)) / 2
        assert torch.allclose(wide.eval()(test), ens, atol=1e-4 * float(ens.abs().max()))
        spec = chain_spec({k: tuple(v.shape) for k, v in a.state_dict().items()})
        c = convnet(5)
        c.load_state_dict(apply_permutations(a.state_dict(), spec, random_permutations(spec, torch.Generator().manual_seed(2))))
        m = convnet(7)
        m.load_state_dict(pleas_conv(a, c, x, width=1.0).state)
        assert torch.allclose(m.eval()(test), a(test), atol=1e-4 * float(a(test).abs().max()))
    assert pleas_conv(a, b, x, width=1.5).widths == {"P0": 9, "P1": 12, "P2": 15}


def test_models_of_different_depth_are_refused(tmp_path):
    """No policy pairs the layers of models of different depth: an MLP with a layer more or less, and a Llama
    with 3 layers against 2, are refused naming both files, with nothing written."""
    from tests.align.conftest import tiny_llama

    torch.save(mlp(0, (8, 16, 12, 3)).state_dict(), tmp_path / "a.pt")
    torch.save(mlp(1, (8, 16, 3)).state_dict(), tmp_path / "shallow.pt")
    torch.save(mlp(2, (8, 16, 12, 12, 3)).state_dict(), tmp_path / "deep.pt")
    torch.save(torch.randn(50, 8), tmp_path / "x.pt")
    tiny_llama(0, layers=2).save_pretrained(tmp_path / "llama2")
    tiny_llama(1, layers=3).save_pretrained(tmp_path / "llama3")
    (tmp_path / "texts.txt").write_text("one text\nanother text\n")
    cases = {"shallow": ("a.pt", "shallow.pt", "x.pt", ["tensor '4.weight' is in", "a.pt", "shallow.pt",
                                                         "different depth", "PLeaS needs the same tensors"]),
             "deep": ("a.pt", "deep.pt", "x.pt", ["tensor '6.weight' is in", "deep.pt", "a.pt", "different depth"]),
             "llama": ("llama2", "llama3", "texts.txt", ["model A", "llama2' has 2 layers but model B",
                                                         "llama3' has 3", "different depth"])}
    for name, (a, b, calib, needles) in cases.items():
        recipe = {"merge_method": "pleas", "models": [str(tmp_path / a), str(tmp_path / b)],
                  "calibration": str(tmp_path / calib), "parameters": {"width": 1.5}}
        (tmp_path / f"{name}.yml").write_text(yaml.safe_dump(recipe))
    before = set(tmp_path.iterdir())
    for name, (*_, needles) in cases.items():
        r = run_cli("pleas", tmp_path / f"{name}.yml", "-o", tmp_path / "merged")
        flat = " ".join(r.stderr.split())
        assert r.returncode == 2 and "Traceback" not in r.stderr and flat.startswith("error:"), (name, r.stderr)
        assert all(n in flat for n in needles), (name, needles, flat)
    assert set(tmp_path.iterdir()) == before
