"""M2N2's pieces against values worked out by hand, and `mergelab m2n2` end to end."""

import json

import numpy as np
import pytest
import torch
import yaml

from mergelab.search.m2n2 import attraction, crossover, shared_fitness
from tests.conftest import run_cli
from tests.search.conftest import config


def test_fitness_sharing():
    S = np.array([[1, 1, 0, 1], [1, 1, 0, 0], [0, 0, 1, 0]], dtype=float)
    f, Sh = shared_fitness(S, 1.0)
    # examples 0, 1 solved by two models: half credit each; 2 and 3 by one model alone: full credit
    assert f.tolist() == [0.5 + 0.5 + 1.0, 0.5 + 0.5, 1.0]
    f0, _ = shared_fitness(S, 0.0)  # alpha 0: a plain GA on summed scores
    assert f0.tolist() == [3.0, 2.0, 1.0]
    assert shared_fitness(np.zeros((2, 3)), 1.0)[0].tolist() == [0.0, 0.0]  # z = 0 is read as 1


def test_attraction_prefers_the_complement():
    S = np.array([[1, 1, 0, 0], [0, 0, 1, 1], [1, 0, 1, 0], [1, 1, 0, 0]], dtype=float)
    _, Sh = shared_fitness(S, 1.0)
    a = attraction(Sh, 0)
    assert int(np.argmax(a)) == 1 and a[0] == 0.0 and a[3] == 0.0
    assert a[1] == pytest.approx(Sh[1, 2] + Sh[1, 3])


def test_crossover_endpoints_and_split():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(50, generator=g), torch.randn(50, generator=g)
    assert torch.allclose(crossover(x, y, 50, 0.0), x, atol=1e-6)
    assert torch.allclose(crossover(x, y, 50, 1.0), y, atol=1e-5)
    # split 20, w = 1: the first 20 coordinates come from y, the rest from x
    c = crossover(x, y, 20, 1.0)
    assert torch.allclose(c[:20], y[:20], atol=1e-5) and torch.allclose(c[20:], x[20:], atol=1e-6)
    # w = 0.5 everywhere: SLERP's midpoint, sin(W/2)/sin(W) (x + y)
    omega = torch.arccos((x / x.norm()) @ (y / y.norm()))
    assert torch.allclose(crossover(x, y, 0, 0.5), torch.sin(omega / 2) / torch.sin(omega) * (x + y), atol=1e-5)


def test_m2n2_end_to_end(family, tmp_path):
    cfg = config(family, method="linear")
    cfg["search"] = {"steps": 3, "seed": 2, "alpha": 1.0}
    path = tmp_path / "m2n2.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code, _, _ = run_cli(["m2n2", path, "-o", tmp_path / "out", "--quiet"])
    assert code == 0
    hist = json.loads((tmp_path / "out" / "history.json").read_text())
    assert len(hist["steps"]) == 3 and len(hist["evaluations"]) == 2 + 3
    assert len(hist["archive_mean_scores"]) == 2  # the archive keeps its size
    assert all(0 < e["fitness"] <= 1 for e in hist["evaluations"])
    assert (tmp_path / "out" / "best" / "config.json").is_file()
    for s in hist["steps"]:
        assert sorted(s["parents"]) == [0, 1]  # two members: the partner is the other one
