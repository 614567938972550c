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
