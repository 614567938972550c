"""MAP: surrogate fit, Pareto front and choice (exact checks), and `mergelab map` end to end."""

import json

import numpy as np
import pytest
import yaml

from mergelab.search.map import choose, fit_surrogate, non_dominated, pareto_front, predict, sample_points
from tests.conftest import run_cli
from tests.search.conftest import config
from tests.search.test_evolve import digest

pytest.importorskip("pymoo")


def quad(coef, c):
    """The surrogate's quadratic for T=2, written out: a1 c1^2 + a2 c2^2 + b c1 c2 + d1 c1 + d2 c2 + e."""
    a1, a2, b, d1, d2, e = coef
    return a1 * c[:, 0] ** 2 + a2 * c[:, 1] ** 2 + b * c[:, 0] * c[:, 1] + d1 * c[:, 0] + d2 * c[:, 1] + e


def test_sampling_design():
    pts = sample_points(2, seed=0)
    assert pts.shape == (12 + 2, 2)
    grid = pts[:-2]
    assert not np.any(np.isclose(grid.sum(1), 1.0))  # no sum-to-one (one-hot included)
    assert not np.any(np.isclose(grid[:, 0], grid[:, 1]))  # no isotropic point
    assert np.array_equal(pts[-2:], np.eye(2)) and len({tuple(p) for p in grid}) == 12


def test_fit_recovers_sigmoid_of_a_quadratic():
    true = np.array([-2.0, -1.5, 0.8, 1.7, 1.1, -0.4])
    c = sample_points(2, seed=1)
    y = 1 / (1 + np.exp(-quad(true, c)))
    coef = fit_surrogate(c, y, "sigmoid")
    assert np.allclose(coef, true, rtol=1e-3, atol=1e-4)
    assert np.allclose(predict(coef, "sigmoid", c), y, atol=1e-8)


def test_front_is_non_dominated_and_reaches_each_tasks_maximum():
    # two opposing concave objectives: task 0 peaks at c = (1, 0), task 1 at (0, 1)
    c0 = np.array([-1.0, -1.0, 0.0, 2.0, 0.0, 0.0])
    c1 = np.array([-1.0, -1.0, 0.0, 0.0, 2.0, 0.0])
    X, F = pareto_front([c0, c1], "sigmoid", 2, seed=0)
    assert non_dominated(F).all()
    for i in range(len(F)):
        assert not np.any(np.all(F >= F[i], axis=1) & np.any(F > F[i], axis=1))
    best0 = choose(F, [1, 0])
    assert F[best0, 0] == F[:, 0].max() and np.allclose(X[best0], [1.0, 0.0], atol=0.05)
    best1 = choose(F, [0, 3])
    assert F[best1, 1] == F[:, 1].max() and np.allclose(X[best1], [0.0, 1.0], atol=0.05)


def test_map_end_to_end(family, tmp_path):
    cfg = config(family, method="task_arithmetic")
    cfg["search"] = {"seed": 1, "pop_size": 40, "generations": 10}
    path = tmp_path / "map.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code, _, _ = run_cli(["map", path, "-o", tmp_path / "out", "--quiet"])
    assert code == 0
    res = json.loads((tmp_path / "out" / "front.json").read_text())
    samples = json.loads((tmp_path / "out" / "samples.json").read_text())
    assert res["sample_points"] == 14 and len(samples["scores"]) == 14
    assert (tmp_path / "out" / "front.png").stat().st_size > 1000
    names = res["tasks"]
    for k, ch in enumerate(res["chosen"]):
        c = np.array([ch["point"]])
        for t, n in enumerate(names):
            coef = res["fit"][n]["coefficients"]
            predicted = -np.logaddexp(0, quad(coef, c))[0]  # metric loss: minus softplus
            assert ch["predicted"][n] == pytest.approx(predicted, rel=1e-9)
            assert ch["surrogate_error"][n] == pytest.approx(predicted - ch["real_tasks"][n], rel=1e-9)
        recipe = yaml.safe_load((tmp_path / "out" / ch["recipe"]).read_text())
        weights = [m["parameters"]["weight"] for m in recipe["models"] if "parameters" in m]
        assert weights == pytest.approx(ch["point"])
    # the recipe of a chosen trade-off gives, under mergelab merge, exactly the tensors evaluated for real
    recipe = tmp_path / "out" / res["chosen"][-1]["recipe"]
    code, _, _ = run_cli(["merge", recipe, "-o", tmp_path / "merged", "--quiet"])
    assert code == 0 and digest(tmp_path / "merged") == res["chosen"][-1]["digest"]
    F = np.array(res["front"]["predicted"])
    assert non_dominated(F).all()
    # a one-hot preference picks the front point best for that task
    assert res["chosen"][0]["predicted"][names[0]] == pytest.approx(F[:, 0].max())


def test_map_three_tasks_front_and_png(family, tmp_path, capsys):
    """Three objectives (two task vectors): a front in 3-D, one chosen point per task and the equal
    trade-off, the 3-D PNG."""
    from PIL import Image

    cfg = config(family, method="task_arithmetic")
    cfg["fitness"]["tasks"] = ["language_id", "refusal", "string_ops"]
    cfg["search"] = {"seed": 2, "pop_size": 40, "generations": 10}
    path = tmp_path / "map.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code, stdout, stderr = run_cli(["map", path, "-o", tmp_path / "out"], capsys)
    assert code == 0
    res = json.loads((tmp_path / "out" / "front.json").read_text())
    assert res["tasks"] == ["language_id", "refusal", "string_ops"]
    e = res["surrogate_error_at_chosen"]  # reported on the command line too
    assert "MAP: evaluating 14 sample points" in " ".join(stderr.split())
    assert f"surrogate |error| mean {e['mean_abs']:.4g}, max {e['max_abs']:.4g}" in " ".join(stdout.split())
    F = np.array(res["front"]["predicted"])
    assert F.shape[1] == 3 and non_dominated(F).all()
    assert [ch["preference"] for ch in res["chosen"]] == [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0],
                                                         [1.0, 1.0, 1.0]]
    for t in range(3):  # a one-hot preference picks the front point best for that task
        assert res["chosen"][t]["predicted"][res["tasks"][t]] == pytest.approx(F[:, t].max())
    errors = [abs(v) for ch in res["chosen"] for v in ch["surrogate_error"].values()]
    assert res["surrogate_error_at_chosen"]["max_abs"] == pytest.approx(max(errors))
    header = (tmp_path / "out" / "recipe-0.yaml").read_text().splitlines()[0]
    assert header == "# mergelab map: preference [1.0, 0.0, 0.0] over ['language_id', 'refusal', 'string_ops']"
    with Image.open(tmp_path / "out" / "front.png") as im:
        assert im.size == (640, 480)
