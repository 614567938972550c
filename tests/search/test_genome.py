"""Genotype layout and decoding (mergekit-evolve's rules, worked out by hand here)."""

import math

import pytest

from mergelab.search.genome import GenomeError, parse_genome


def genome(**kw):
    data = {"models": ["a", "b", "c"], "merge_method": "ties", "base_model": "base"}
    data.update(kw)
    return parse_genome(data, lambda ref: 4)


def test_x0_and_c_order_layout():
    g = genome(layer_granularity=2, filters=["mlp"])
    # [G=2, M=3, S=2, P=2]: weight 1/3, density 1 everywhere
    assert g.size == 2 * 3 * 2 * 2
    assert list(g.x0()) == [1 / 3, 1.0] * 12
    x = list(range(g.size))
    mg, _ = g.split(x)
    for gi in range(2):
        for m in range(3):
            for s in range(2):
                for p in range(2):
                    assert mg[gi, m, s, p] == ((gi * 3 + m) * 2 + s) * 2 + p


def test_decode_one_group_abs_and_clamp():
    g = genome()
    r = g.decode([-0.5, 1.7, 0.25, -0.3, 2.0, 0.6])
    assert r["merge_method"] == "ties" and r["base_model"] == "base"
    assert r["models"] == [
        {"model": "a", "parameters": {"weight": 0.5, "density": 1.0}},
        {"model": "b", "parameters": {"weight": 0.25, "density": 0.3}},
        {"model": "c", "parameters": {"weight": 2.0, "density": 0.6}},
        {"model": "base"},
    ]
    assert r["parameters"] == {"normalize": True}  # mergekit-evolve's default for ties


def test_negative_weights_and_ranges():
    g = genome(allow_negative_weights=True, ranges={"weight": [-1.0, 1.5], "density": [0.2, 0.9]})
    r = g.decode([-0.5, 0.1, 3.0, 0.95, -4.0, 0.5])
    w = [m["parameters"]["weight"] for m in r["models"][:3]]
    d = [m["parameters"]["density"] for m in r["models"][:3]]
    assert w == [-0.5, 1.5, -1.0] and d == [0.2, 0.9, 0.5]


def test_layer_groups_become_slices_with_filters():
    g = genome(layer_granularity=2, filters=["mlp"])
    x = [0.1 * (i + 1) for i in range(g.size)]
    r = g.decode(x)
    assert "models" not in r and len(r["slices"]) == 2
    s1 = r["slices"][1]
    assert s1["base_model"] == "base"
    assert [src["layer_range"] for src in s1["sources"]] == [[2, 4]] * 4  # three models and the base
    b = s1["sources"][1]["parameters"]  # group 1, model b: genes ((1*3+1)*2+s)*2+p
    assert b["weight"] == [{"filter": "mlp", "value": pytest.approx(0.1 * 17)}, {"value": pytest.approx(0.1 * 19)}]
    assert b["density"] == [{"filter": "mlp", "value": 1.0}, {"value": 1.0}]  # clamp(|x|) of 1.8 and 2.0


def test_smooth_groups_become_gradients():
    g = genome(layer_granularity=1, smooth=True)  # 4 groups of one layer
    x = [0.0] * g.size
    for gi in range(4):
        x[(gi * 3 + 0) * 2 + 0] = 0.1 * (gi + 1)  # model a's weight per group
    r = g.decode(x)
    assert r["models"][0]["parameters"]["weight"] == pytest.approx([0.1, 0.2, 0.3, 0.4])


def test_slerp_picks_top_two_with_softmax_t():
    g = parse_genome({"models": ["a", "b", "c"], "merge_method": "slerp"}, lambda ref: 4)
    r = g.decode([0.2, 0.9, 0.5])
    assert r["base_model"] == "b" and [m["model"] for m in r["models"]] == ["b", "c"]
    assert r["parameters"]["t"] == pytest.approx(math.exp(0.5) / (math.exp(0.9) + math.exp(0.5)))


def test_other_method_with_global_parameter():
    g = parse_genome({"models": ["a", "b"], "merge_method": "task_arithmetic", "base_model": "base",
                      "parameters": ["weight", "lambda"], "ranges": {"lambda": [0.2, 2.0]}}, lambda ref: 4)
    assert list(g.x0()) == [0.5, 0.5, 1.0]  # lambda starts at its default, 1
    r = g.decode([0.3, 0.4, 5.0])
    assert r["parameters"]["lambda"] == 2.0


@pytest.mark.parametrize("change, message", [
    ({"ranges": {"weight": [0.5, 0.5]}}, "is empty"),
    ({"ranges": {"density": [0.8, 0.2]}}, "is empty"),
    ({"ranges": {"gamma": [0.0, 1.0]}}, "'gamma' is not a parameter of method 'ties'"),
    ({"ranges": {"lambda": [0.0, 1.0]}}, "'lambda' does not evolve"),
    ({"ranges": {"density": [0.0, 2.0]}}, "density"),
    ({"ranges": {"weight": "0-1"}}, "expected [low, high]"),
    ({"parameters": ["weight", "gamma"]}, "'gamma' is not a parameter of method 'ties'"),
    ({"layer_granularity": 3}, "does not divide the 4 layers"),
    ({"base_model": None}, "needs a base model"),
    ({"merge_method": "nope"}, "merge_method"),
    ({"colour": 1}, "unknown key"),
])
def test_bad_genomes(change, message):
    data = {"models": ["a", "b"], "merge_method": "ties", "base_model": "base"}
    data.update(change)
    with pytest.raises(GenomeError, match=None) as e:
        parse_genome(data, lambda ref: 4)
    assert message in str(e.value)
