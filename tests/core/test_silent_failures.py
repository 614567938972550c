"""Failures a user would trip on are reported, never silent and never a traceback (issue 14, point 7)."""

import math

import pytest
import yaml

from mergelab.errors import RecipeError
from mergelab.methods.registry import Param
from tests.conftest import run_cli


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_integer_parameter_rejects_inf_and_nan(value):
    p = Param("max_iter", int, "iterations", default=10, low=0)
    with pytest.raises(RecipeError, match="max_iter"):
        p.check(value, "parameters")


@pytest.mark.parametrize("text", [".inf", ".nan", "-.inf"])
def test_integer_parameter_inf_in_recipe_is_a_clear_error(tiny_family, tmp_path, capsys, text):
    base, experts = tiny_family
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "merge_method: karcher\n"
        f"models:\n  - model: {experts[0]}\n  - model: {experts[1]}\n"
        f"parameters:\n  max_iter: {text}\n"
    )
    assert yaml.safe_load(recipe.read_text())["parameters"]["max_iter"] != 10
    code, _, err = run_cli(["merge", recipe, "-o", tmp_path / "out", "-q"], capsys)
    assert code == 2
    flat = " ".join(err.split())
    assert "max_iter" in flat and "an integer" in flat, flat
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def _app_with(monkeypatch, tmp_path, source: str, blocked: str):
    """A CLI whose 'evaluate' sub-command lives in a module that imports ``blocked``, made unimportable."""
    import sys

    import typer

    import mergelab.cli as cli

    (tmp_path / "fake_subcommand_cli.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(sys.modules, blocked, None)  # `import blocked` now raises ImportError
    monkeypatch.delitem(sys.modules, "fake_subcommand_cli", raising=False)
    app = typer.Typer(add_completion=False)
    app.command("merge")(lambda: None)
    monkeypatch.setattr(cli, "app", app)
    cli._mount_optional(app, [("fake_subcommand_cli", "evaluate", "Evaluate.")])
    return app


def test_subcommand_whose_import_fails_says_why_and_which_extra(monkeypatch, tmp_path, capsys):
    _app_with(monkeypatch, tmp_path, "import sklearn\nimport typer\napp = typer.Typer()\n", "sklearn")
    code, out, err = run_cli(["--help"], capsys)
    assert code == 0 and "evaluate" in out and "unavailable" in out
    code, _, err = run_cli(["evaluate", "suite", "--model", "m"], capsys)
    flat = " ".join(err.split())
    assert code == 2, flat
    assert "'mergelab evaluate' is unavailable" in flat and "sklearn" in flat
    assert "pip install 'mergelab[eval]'" in flat and "Traceback" not in err


def test_subcommand_missing_a_non_extra_package_names_it(monkeypatch, tmp_path, capsys):
    _app_with(monkeypatch, tmp_path, "import matplotlib\napp = None\n", "matplotlib")
    code, _, err = run_cli(["evaluate"], capsys)
    flat = " ".join(err.split())
    assert code == 2 and "importing fake_subcommand_cli failed" in flat and "pip install matplotlib" in flat


@pytest.mark.parametrize("method, what", [("dare_linear", "task arithmetic"), ("dare_ties", "TIES without a trim")])
def test_dare_without_density_says_it_drops_nothing_in_one_line(tiny_family, tmp_path, capsys, method, what):
    base, experts = tiny_family
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"merge_method": method, "base_model": str(base),
                                      "models": [{"model": str(e), "parameters": {"weight": 0.5}} for e in experts]}))
    code, _, err = run_cli(["merge", recipe, "-o", tmp_path / "out", "-q"], capsys)
    assert code == 0, err
    lines = [line for line in err.splitlines() if "density" in line]
    assert len(lines) == 1, err  # one line for the whole merge, not one per tensor
    assert lines[0].startswith("warning: ") and f"{method}: density is 1 for every model" in lines[0]
    assert what in lines[0] and "mergekit's default" in lines[0]
    # with a density below 1 (or 1 for one model only) nothing is said
    recipe.write_text(yaml.safe_dump({"merge_method": method, "base_model": str(base), "models": [
        {"model": str(e), "parameters": {"weight": 0.5, "density": d}} for e, d in zip(experts, (0.5, 1.0, 1.0))]}))
    code, _, err = run_cli(["merge", recipe, "-o", tmp_path / "out2", "-q"], capsys)
    assert code == 0 and "density" not in err, err


def test_dare_no_drop_warning_through_the_api():
    import torch

    import mergelab

    base = {"w": torch.zeros(4, 4)}
    models = [{"w": torch.ones(4, 4)}, {"w": -torch.ones(4, 4)}]
    with pytest.warns(UserWarning, match="dare_linear: density is 1 for every model"):
        mergelab.merge_state_dicts(base, models, "dare_linear", weight=1.0)
