"""`mergelab evolve --strategy random`: uniform draws inside the genome's ranges, seeded, independent of
the budget, resumable to the uninterrupted result, at CMA-ES's population by default."""

import json

import numpy as np
import pytest
import yaml

from tests.conftest import run_cli
from tests.search.conftest import config

pytest.importorskip("cma")


def _cfg(family, **search):
    cfg = config(family, method="ties", max_evals=4, popsize=2, ranges={"weight": [0.2, 0.9], "density": [0.5, 1.0]})
    cfg["search"].update(strategy="random", **search)
    return cfg


def test_random_draws_and_resume(family, tmp_path):
    from mergelab.search.evolve import evolve

    cfg = _cfg(family)
    full = evolve(cfg, tmp_path / "full", log=lambda s: None)
    evs = full["evaluations"]
    assert full["algorithm"] == "random" and len(evs) == 4 and full["generations"] == 2
    # genotype order (2 models x [weight, density]); the draws are numpy's default_rng(seed) uniform
    # over the ranges, popsize rows per generation, worked out here without the search code
    rng = np.random.default_rng(3)
    low, high = np.array([0.2, 0.5, 0.2, 0.5]), np.array([0.9, 1.0, 0.9, 1.0])
    expected = np.vstack([rng.uniform(low, high, size=(2, 4)) for _ in range(2)])
    assert np.allclose([e["genes"] for e in evs], expected, rtol=0, atol=0)
    for e in evs:  # inside the ranges, so decoding leaves the genes as they are
        assert list(e["values"].values()) == pytest.approx(e["genes"], abs=1e-6)
    assert len({e["digest"] for e in evs}) == 4

    # killed after the first generation, resumed: the same evaluations as the uninterrupted run
    def kill(gen):
        if gen == 1:
            raise KeyboardInterrupt

    out = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        evolve(cfg, out, log=lambda s: None, on_generation=kill)
    path = tmp_path / "random.yaml"
    path.write_text(yaml.safe_dump(cfg))
    resumed = evolve(cfg, out, resume=True, log=lambda s: None)
    keys = ("genes", "fitness", "digest")
    assert [[e[k] for k in keys] for e in resumed["evaluations"]] == [[e[k] for k in keys] for e in evs]

    # the CLI's --strategy overrides the config; a larger budget extends the same draws
    cfg["search"]["strategy"] = "cma"
    path.write_text(yaml.safe_dump(cfg))
    code, _, _ = run_cli(["evolve", path, "-o", tmp_path / "cli", "--strategy", "random", "--max-evals", "6",
                          "--quiet"])
    assert code == 0
    hist = json.loads((tmp_path / "cli" / "history.json").read_text())
    assert hist["algorithm"] == "random" and len(hist["evaluations"]) == 6
    assert [e["genes"] for e in hist["evaluations"][:4]] == [e["genes"] for e in evs]
    assert "(random)" in (tmp_path / "cli" / "best_recipe.yaml").read_text().splitlines()[0]


def test_default_popsize_and_bounds(family):
    from mergelab.search.candidate import read_config
    from mergelab.search.evolve import default_popsize

    assert [default_popsize(n) for n in (2, 8, 16)] == [6, 10, 12]  # 4 + floor(3 ln n), as cma's default
    g = read_config(_cfg(family)).genome
    low, high = g.sample_bounds()
    assert low.tolist() == [0.2, 0.5, 0.2, 0.5] and high.tolist() == [0.9, 1.0, 0.9, 1.0]
    cfg = config(family, method="ties")  # no ranges: weight and density in [0, 1]
    assert [b.tolist() for b in read_config(cfg).genome.sample_bounds()] == [[0.0] * 4, [1.0] * 4]


def test_random_needs_a_range_for_other_parameters(family, tmp_path, capsys):
    cfg = config(family, method="ties", parameters=["weight", "lambda"])
    cfg["search"]["strategy"] = "random"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code, out, err = run_cli(["evolve", path, "-o", tmp_path / "out"], capsys)
    assert code == 2 and "Traceback" not in err and not (tmp_path / "out").exists()
    assert "random search needs a range [low, high] for parameter 'lambda'" in " ".join(err.split())
    cfg["search"]["strategy"] = "grid"
    path.write_text(yaml.safe_dump(cfg))
    code, out, err = run_cli(["evolve", path, "-o", tmp_path / "out"], capsys)
    assert code == 2 and "search.strategy: expected one of cma, random, got 'grid'" in " ".join(err.split())
