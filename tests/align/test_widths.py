"""PLeaS's per-layer widths under a FLOPs budget (arXiv 2407.02447; the reference code's ``qp_ratios``):
the lattice search against a brute force written here, the paper's cost formula and benefit weights
recomputed independently, the extremes of the budget, and the recipe's errors."""

from __future__ import annotations

import itertools

import pytest
import torch
import yaml

from mergelab.align.pleas import mlp_forward, pleas_mlp
from mergelab.align.resnet import ResNet, pleas_resnet
from mergelab.align.widths import choose_widths
from mergelab.errors import MergeLabError
from tests.align.conftest import mlp, run_cli


def _cost(terms, n, k):
    """The paper's FLOPs, written out: a layer between groups g1 -> g2 has its four kept blocks
    (merged/A/B in x merged/A/B minus the two cross blocks) = in*out - 2 * sep_in * sep_out."""
    total = 0.0
    for c, g1, g2 in terms:
        w_in = n[g1] + k[g1] if g1 else 1
        w_out = n[g2] + k[g2] if g2 else 1
        cross = 2 * (k[g1] if g1 else 0) * (k[g2] if g2 else 0)
        total += c * (w_in * w_out - cross)
    return total


def _brute(n, terms, budget, w):
    base = _cost(terms, n, {g: 0 for g in n})
    best = None
    for ks in itertools.product(*[range(n[g] + 1) for g in n]):
        k = dict(zip(n, ks))
        if _cost(terms, n, k) <= budget * base * (1 + 1e-12):
            obj = sum(w[g] * k[g] / n[g] for g in n)
            best = obj if best is None else max(best, obj)
    return best


@pytest.mark.parametrize("budget", [1.0, 1.13, 1.3, 1.5, 1.77, 1.95, 2.0])
def test_lattice_search_is_the_brute_force_optimum(budget):
    n = {"P0": 6, "P1": 4, "P2": 5}
    terms = [(8.0, None, "P0"), (1.0, "P0", "P1"), (2.0, "P1", "P2"), (3.0, "P2", None)]
    for w in ({"P0": 0.3, "P1": 1.0, "P2": 0.45}, {"P0": 2.0, "P1": 0.1, "P2": 0.7}, {"P0": 1, "P1": 1, "P2": 1}):
        c = choose_widths(n, terms, budget, w)
        k = {g: c.widths[g] - n[g] for g in n}
        base = _cost(terms, n, {g: 0 for g in n})
        assert _cost(terms, n, k) <= budget * base * (1 + 1e-12)
        assert c.flops_ratio == pytest.approx(_cost(terms, n, k) / base)
        assert sum(w[g] * k[g] / n[g] for g in n) == pytest.approx(_brute(n, terms, budget, w), abs=1e-12)
        assert c.exact
        g = choose_widths(n, terms, budget, w, exact_limit=0)  # the greedy fallback: feasible, flagged
        assert not g.exact and g.flops_ratio <= budget * (1 + 1e-12)
    # the paper's test (d): the cost ratio is 1 fully merged and 2 fully separate
    assert choose_widths(n, terms, 1.0, w).widths == n
    assert choose_widths(n, terms, 2.0, w).widths == {g: 2 * v for g, v in n.items()}


def test_mlp_budget_weights_are_the_papers_formula_and_extremes_hold():
    a, b = mlp(0).state_dict(), mlp(1).state_dict()
    x = torch.randn(300, 8, generator=torch.Generator().manual_seed(0))
    ens = (mlp_forward(a, x) + mlp_forward(b, x)).double() / 2

    def score(widths):  # -MSE against the ensemble, each merge at fixed widths
        return -float(((mlp_forward(pleas_mlp(a, b, x, width=widths).state, x).double() - ens) ** 2).mean())

    budget = 1.4
    r = pleas_mlp(a, b, x, width={"budget": budget})
    s = {"merged": score({"P0": 16, "P1": 12}), "ens": score({"P0": 32, "P1": 24})}
    for g, sep, mer in (("P0", {"P0": 32, "P1": 12}, {"P0": 16, "P1": 24}), ("P1", {"P0": 16, "P1": 24}, {"P0": 32, "P1": 12})):
        want = (score(sep) - s["merged"]) * (2 - budget) - (score(mer) - s["ens"]) * (budget - 1)
        assert r.budget["weights"][g] == pytest.approx(max(want, 1e-5), rel=1e-6, abs=1e-9)
    assert r.budget["flops_ratio"] <= budget and r.widths == r.budget["widths"]
    assert r.widths == {g: 2 * {"P0": 16, "P1": 12}[g] - r.merged_units[g] for g in r.widths}
    # the chosen widths are the merge at those widths
    fixed = pleas_mlp(a, b, x, width=r.widths)
    assert all(torch.equal(fixed.state[k], r.state[k]) for k in r.state)
    # budget 2 is the exact ensemble; budget 1 is one model's width
    assert pleas_mlp(a, b, x, width={"budget": 2.0, "weights": "uniform"}).widths == {"P0": 32, "P1": 24}
    assert pleas_mlp(a, b, x, width={"budget": 1.0}).widths == {"P0": 16, "P1": 12}


def test_resnet_budget():
    torch.manual_seed(0)
    na, nb = ResNet(4, 3, 5).eval(), ResNet(4, 3, 5).eval()
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    # the ResNet's costs written out: 3x3 convs at 8x8 (stem from 1 channel, conv1 res -> block, conv2 block
    # -> res), the head res -> 5 classes; given weights, the widths are the brute-force optimum
    n = {"res": 4, "block0": 3, "block1": 3}
    terms = [(9 * 64.0, None, "res"), (9 * 64.0, "res", "block0"), (9 * 64.0, "block0", "res"),
             (9 * 64.0, "res", "block1"), (9 * 64.0, "block1", "res"), (5.0, "res", None)]
    w = {"res": 1.0, "block0": 0.2, "block1": 0.5}
    r = pleas_resnet(na, nb, x, width={"budget": 1.5, "weights": w})
    k = {g: r.widths[g] - n[g] for g in n}
    base = _cost(terms, n, {g: 0 for g in n})
    assert _cost(terms, n, k) <= 1.5 * base and r.budget["flops_ratio"] == pytest.approx(_cost(terms, n, k) / base)
    assert sum(w[g] * k[g] / n[g] for g in n) == pytest.approx(_brute(n, terms, 1.5, w))
    assert ResNet.from_state(r.state)(x[:3]).shape == (3, 5)  # loads at the chosen widths
    # the paper's benefit weights from merges scored against the ensemble
    r = pleas_resnet(na, nb, x, width={"budget": 1.5})
    assert r.budget["exact"] and set(r.budget["scores"]) == {"merged", "ensemble"} | {
        f"{p}:{g}" for p in ("R0", "R1") for g in n}
    assert r.budget["scores"]["ensemble"] > -1e-8  # all separate is the ensemble
    with pytest.raises(MergeLabError, match=r"cannot be combined with res"):
        pleas_resnet(na, nb, x, width={"budget": 1.5, "res": 6})


def test_budget_recipe_and_errors(tmp_path):
    a, b = mlp(0).state_dict(), mlp(1).state_dict()
    x = torch.randn(300, 8, generator=torch.Generator().manual_seed(0))
    for name, t in (("a", a), ("b", b), ("x", x)):
        torch.save(t, tmp_path / f"{name}.pt")
    recipe = {"merge_method": "pleas", "models": [{"model": str(tmp_path / "a.pt")}, {"model": str(tmp_path / "b.pt")}],
              "calibration": str(tmp_path / "x.pt"),
              "parameters": {"width": {"budget": 1.5, "weights": {"P0": 0.1, "P1": 1.0}}}}
    (tmp_path / "r.yml").write_text(yaml.safe_dump(recipe))
    r = run_cli("pleas", tmp_path / "r.yml", "-o", tmp_path / "m.pt")
    assert r.returncode == 0, r.stderr
    m = torch.load(tmp_path / "m.pt", weights_only=True)
    # P1 is worth ten times P0: all its 12 units separate costs (8*16 + 16*24 + 24*3) / (8*16 + 16*12 + 12*3)
    # = 584/356 = 1.64 > 1.5, so P1 gets the largest width that fits with P0 merged: 16*w + 3*w <= 1.5*356 - 128
    assert tuple(m["0.weight"].shape) == (16, 8) and tuple(m["2.weight"].shape) == (21, 16)
    before = set(tmp_path.iterdir())
    cases = [({"budget": 2.5}, "FLOPs ratio in [1.0, 2.0]"), ({"budget": 1.5, "P0": 20}, "cannot be combined with P0"),
             ({"budget": 1.5, "weights": {"P0": 1}}, "missing ['P1']"), ({"budget": 1.5, "weights": "best"}, "'layerwise'")]
    for i, (width, needle) in enumerate(cases):
        recipe["parameters"] = {"width": width}
        (tmp_path / f"bad{i}.yml").write_text(yaml.safe_dump(recipe))
        r = run_cli("pleas", tmp_path / f"bad{i}.yml", "-o", tmp_path / "n.pt")
        assert r.returncode == 2 and "Traceback" not in r.stderr and needle in " ".join(r.stderr.split()), r.stderr
    recipe["parameters"] = {"attention_width": 1.0}  # a state dict has no attention to refit
    (tmp_path / "att.yml").write_text(yaml.safe_dump(recipe))
    r = run_cli("pleas", tmp_path / "att.yml", "-o", tmp_path / "n.pt")
    assert r.returncode == 2 and "attention_width applies to BERT and Llama-layout folders" in " ".join(r.stderr.split())
    assert set(tmp_path.iterdir()) == before | {tmp_path / f"bad{i}.yml" for i in range(len(cases))} | {
        tmp_path / "att.yml"}
