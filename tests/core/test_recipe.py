"""Recipe parsing, mergekit-style parameter resolution and validation before any tensor is read."""

import pytest
import yaml

from mergelab.errors import RecipeError
from mergelab.methods.registry import get_method
from mergelab.recipe import Conditional, load_recipe, resolve_parameters, resolve_setting, validate_parameters


def test_scalar_gradient_and_filters_resolve_like_mergekit():
    assert resolve_setting(0.5, "x", 0.7) == 0.5
    # gradient [0, 1, 0.5] at t=0.25: scaled 0.5 -> halfway between 0 and 1
    assert resolve_setting([0.0, 1.0, 0.5], "x", 0.25) == pytest.approx(0.5)
    assert resolve_setting([0.0, 1.0, 0.5], "x", 0.75) == pytest.approx(0.75)
    assert resolve_setting([0.0, 1.0, 0.5], "x", 1.0) == pytest.approx(0.5)
    conds = [Conditional(filter="self_attn", value=[0.0, 1.0]), Conditional(filter="mlp", value=0.3),
             Conditional(value=0.9)]
    assert resolve_setting(conds, "model.layers.1.self_attn.q_proj.weight", 0.5) == pytest.approx(0.5)
    assert resolve_setting(conds, "model.layers.1.mlp.up_proj.weight", 0.5) == 0.3
    assert resolve_setting(conds, "model.norm.weight", 0.0) == 0.9
    # non-numeric lists are indexed, not interpolated
    assert resolve_setting(["a", "b", "c"], "x", 0.6) == "b"


def test_model_parameters_fall_back_to_top_level_then_default():
    m = get_method("ties")
    glob, per = resolve_parameters(m, {"density": 0.3, "lambda": 2.0}, [{"weight": 1.0}, {"weight": 0.5, "density": 0.9}],
                                   "t", 0.0)
    assert glob["lambda"] == 2.0 and glob["normalize"] is True
    assert per == [{"weight": 1.0, "density": 0.3}, {"weight": 0.5, "density": 0.9}]


def recipe(**over):
    data = {"merge_method": "ties", "base_model": "b", "models": [{"model": "m", "parameters": {"weight": 1.0}}]}
    data.update(over)
    return data


def test_unknown_top_level_key_is_named():
    with pytest.raises(RecipeError, match="merge_metod: unknown key"):
        load_recipe({**recipe(), "merge_metod": "x"})


def test_unknown_method_suggests_the_closest():
    with pytest.raises(RecipeError, match="did you mean 'dare_ties'"):
        load_recipe(recipe(merge_method="dare-ties"))


@pytest.mark.parametrize("params, message", [
    ({"densty": 0.5}, "unknown parameter 'densty' for method 'ties'"),
    ({"density": 1.5}, r"'density' = 1.5 is invalid; expected a number >= 0 and <= 1"),
    ({"density": [0.2, 2.0]}, r"'density' = 2.0 is invalid"),
    ({"normalize": "maybe"}, "expected true or false"),
    ({"density": "1e-x"}, r"'density' = '1e-x' is invalid; expected a number"),
    ({"density": "2e-0"}, r"'density' = 2.0 is invalid"),
    ({"semantics": "papr"}, "one of 'mergekit', 'paper'"),
])
def test_bad_global_parameters(params, message):
    m = get_method("ties")
    with pytest.raises(RecipeError, match=message):
        validate_parameters(m, params, [("m", {"weight": 1.0})])


def test_missing_required_and_misplaced_parameters():
    m = get_method("ties")
    with pytest.raises(RecipeError, match=r"models\[m\]: required parameter 'weight'"):
        validate_parameters(m, {}, [("m", {})])
    # a global parameter set on a model is never read there (mergekit neither): ignored with a warning,
    # an error under --strict
    from mergelab.recipe import misplaced_parameters, unused_parameter_messages

    validate_parameters(m, {}, [("m", {"weight": 1.0, "lambda": 1.0})])
    r = load_recipe({"merge_method": "ties", "base_model": "b", "parameters": {"lambda": 0.5},
                     "models": [{"model": "m", "parameters": {"weight": 1.0, "lambda": 2.0}}]})
    assert misplaced_parameters(r, m) == {"lambda": ["models[m]"]}
    assert unused_parameter_messages(r, m) == [
        "parameter 'lambda' (set in models[m]) is a global parameter of method 'ties', which is read only from the "
        "top-level or a slice's 'parameters', not per model, and is ignored (mergekit ignores it there too; move it "
        "to 'parameters' to use it)"]
    with pytest.raises(RecipeError, match="'lambda' .* is a global parameter .*--strict"):
        unused_parameter_messages(r, m, strict=True)
    with pytest.raises(RecipeError, match="must be a single value"):
        validate_parameters(m, {"semantics": ["paper", "mergekit"]}, [("m", {"weight": 1.0})])


def test_structure_errors():
    with pytest.raises(RecipeError, match="exactly one of 'models', 'slices'"):
        load_recipe({"merge_method": "linear"})
    with pytest.raises(RecipeError, match="missing_tokens: mean applies to merges with tokenizer_source"):
        load_recipe(recipe(missing_tokens="mean"))
    with pytest.raises(RecipeError, match="vocab_policy: common_submatrix crops embeddings by index"):
        load_recipe(recipe(tokenizer_source="union", vocab_policy="common_submatrix"))
    with pytest.raises(RecipeError, match="tokenizer.pad_to_multiple_of: expected a positive integer"):
        load_recipe(recipe(tokenizer={"source": "union", "pad_to_multiple_of": 0}))
    assert load_recipe(recipe(tokenizer={"pad_to_multiple_of": 8})).tokenizer_source == "union"  # mergekit's default
    assert load_recipe(recipe(tokenizer={"pad_to_multiple_of": 8})).pad_to_multiple_of == 8
    with pytest.raises(RecipeError, match="out_dtype: 'int8' is not a float dtype"):
        load_recipe(recipe(out_dtype="int8"))


def test_yaml_file_errors(tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("merge_method: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad)


def test_a_name_no_method_defines_is_an_error_with_the_closest_name():
    with pytest.raises(RecipeError, match=r"unknown parameter 'densty' for method 'ties' \(did you mean 'density'\?\)"):
        validate_parameters(get_method("ties"), {"densty": 0.5}, [("m", {"weight": 1.0})])
    # linear has no density: the hint names the other methods' parameter the typo is closest to
    with pytest.raises(RecipeError, match=r"models\[m\].parameters: unknown parameter 'densty' .*did you mean 'density'"):
        validate_parameters(get_method("linear"), {}, [("m", {"weight": 1.0, "densty": 0.5})])


def test_another_methods_parameter_is_listed_where_it_is_set_and_refused_only_when_strict():
    from mergelab.recipe import unused_parameter_messages, unused_parameters

    r = load_recipe({"merge_method": "linear", "parameters": {"lambda": 1.0, "normalize": True},
                     "models": [{"model": "a", "parameters": {"weight": 1.0, "density": 0.5}},
                                {"model": "b", "parameters": {"weight": 1.0, "density": 0.4}}]})
    m = get_method("linear")
    # validation skips them (no error), and they are reported once per name with every place they are set
    validate_parameters(m, dict(r.parameters), [(e.model, dict(e.parameters)) for e in r.models])
    assert unused_parameters(r, m) == {"lambda": ["parameters"], "density": ["models[a]", "models[b]"]}
    lines = unused_parameter_messages(r, m)
    assert len(lines) == 2
    assert lines[1].startswith("parameter 'density' (set in models[a], models[b]) is not used by method 'linear' "
                               "and is ignored (it is a parameter of ")
    with pytest.raises(RecipeError, match=r"parameter 'lambda' \(set in parameters\) is not used by method 'linear'.*"
                                          r"parameter 'density'.*--strict"):
        unused_parameter_messages(r, m, strict=True)
    # slices: slice-level and source-level parameters are scanned too
    s = load_recipe({"merge_method": "slerp", "base_model": "a", "parameters": {"t": 0.5}, "slices": [
        {"sources": [{"model": "a", "layer_range": [0, 2]},
                     {"model": "b", "layer_range": [0, 2], "parameters": {"weight": 0.3}}],
         "parameters": {"density": 0.5}}]})
    assert unused_parameters(s, get_method("slerp")) == {"density": ["slices[0].parameters"],
                                                          "weight": ["slices[0].sources[b]"]}
    assert unused_parameters(s, get_method("ties")) == {"t": ["parameters"]}


def test_a_parameter_the_methods_reference_has_but_mergelab_lacks_is_refused_not_ignored():
    # OTA's reference has a hybrid-norm `rescale` that mergelab does not implement: ties' `rescale`
    # must not make it an ignorable name
    from mergelab.recipe import unused_parameters

    m = get_method("ota")
    assert "rescale" in m.unsupported
    with pytest.raises(RecipeError, match="parameter 'rescale' of method 'ota's reference is not implemented"):
        validate_parameters(m, {"rescale": True}, [("m", {"second_moments": "v.safetensors"})])
    with pytest.raises(RecipeError, match=r"models\[m\].parameters: parameter 'rescale'"):
        validate_parameters(m, {}, [("m", {"second_moments": "v.safetensors", "rescale": True})])
    r = load_recipe({"merge_method": "ota", "parameters": {"rescale": True},
                     "models": [{"model": "m", "parameters": {"second_moments": "v.safetensors"}}]})
    assert unused_parameters(r, m) == {}


def test_values_are_read_as_mergekit_reads_them():
    """mergekit validates values with pydantic's lax mode: YAML 1.1 reads ``1e-5`` (no dot) as a string,
    and mergekit still takes it as a number, also as a gradient endpoint; ``"false"`` is a boolean."""
    m = get_method("ties")
    r = load_recipe(yaml.safe_load(
        "merge_method: ties\nbase_model: b\nparameters: {normalize: 'false', lambda: 5e-1}\n"
        "models:\n  - {model: m, parameters: {weight: [1e-1, 9e-1], density: 5e-1}}\n"))
    assert r.parameters["lambda"] == "5e-1"  # what YAML gives
    validate_parameters(m, dict(r.parameters), [("m", dict(r.models[0].parameters))])
    glob, per = resolve_parameters(m, dict(r.parameters), [dict(r.models[0].parameters)], "model.layers.0.x", 0.5)
    assert glob["normalize"] is False and glob["lambda"] == 0.5
    assert per[0]["weight"] == pytest.approx(0.5) and per[0]["density"] == 0.5
    # `parameters:` with nothing under it is YAML null: no parameters, as in mergekit
    r = load_recipe(yaml.safe_load("merge_method: linear\nparameters:\nmodels:\n  - model: a\n    parameters:\n"))
    assert r.parameters == {} and r.models[0].parameters == {}
