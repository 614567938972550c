"""passthrough with slices: layer stacking renumbers layers and updates the layer count."""

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

import mergelab
from mergelab.errors import RecipeError


def test_passthrough_stacks_layer_ranges(tmp_path):
    from mergelab.synthetic import make_llama_family

    base, e1 = make_llama_family(tmp_path / "models", experts=1, hidden=32, layers=3, intermediate=64, vocab=64)
    recipe = {"merge_method": "passthrough", "dtype": "float32", "slices": [
        {"sources": [{"model": str(base), "layer_range": [0, 2]}]},
        {"sources": [{"model": str(e1), "layer_range": [1, 3]}]},
    ]}
    out = tmp_path / "stacked"
    mergelab.merge(recipe, out)
    got = load_file(str(out / "model.safetensors"))
    b, e = load_file(str(base / "model.safetensors")), load_file(str(e1 / "model.safetensors"))
    q = "model.layers.{}.self_attn.q_proj.weight"
    assert torch.equal(got[q.format(0)], b[q.format(0)])
    assert torch.equal(got[q.format(1)], b[q.format(1)])
    assert torch.equal(got[q.format(2)], e[q.format(1)])
    assert torch.equal(got[q.format(3)], e[q.format(2)])
    assert torch.equal(got["model.embed_tokens.weight"], b["model.embed_tokens.weight"])
    assert torch.equal(got["lm_head.weight"], e["lm_head.weight"])
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 4
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert len(model.model.layers) == 4
    model(input_ids=torch.tensor([[1, 2, 3]]))


def test_slices_merge_with_base_and_errors(tmp_path):
    from mergelab.synthetic import make_llama_family

    base, e1 = make_llama_family(tmp_path / "models", experts=1, hidden=32, layers=2, intermediate=64, vocab=64)
    good = {"merge_method": "task_arithmetic", "base_model": str(base), "slices": [
        {"sources": [{"model": str(base), "layer_range": [0, 2]},
                     {"model": str(e1), "layer_range": [0, 2], "parameters": {"weight": 1.0}}]}]}
    out = tmp_path / "m"
    mergelab.merge(good, out)
    got = load_file(str(out / "model.safetensors"))
    e = load_file(str(e1 / "model.safetensors"))
    assert torch.allclose(got["model.layers.1.mlp.up_proj.weight"], e["model.layers.1.mlp.up_proj.weight"])
    bad = json.loads(json.dumps(good))
    bad["slices"][0]["sources"][1]["layer_range"] = [0, 1]
    with pytest.raises(RecipeError, match="same, positive number of layers"):
        mergelab.merge(bad, tmp_path / "x")
    two = {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(base), "layer_range": [0, 2]}, {"model": str(e1), "layer_range": [0, 2]}]}]}
    with pytest.raises(RecipeError, match="passthrough"):
        mergelab.merge(two, tmp_path / "y")


def _tensors(folder):
    return load_file(str(folder / "model.safetensors"))


def test_parameters_resolve_source_then_slice_then_top_level(tmp_path):
    """mergekit's precedence, worked out by hand for a linear merge (normalize: false, out = sum w_i x_i):
    a source's filter list that matches nothing passes on to the slice's, then to the top level; per-model
    filters match the source's own tensor names (e0's layer 2 is output layer 0); gradients restart per
    slice; the tensors after the layers come from the last slice's sources."""
    from mergelab.synthetic import make_llama_family

    _, e0, e1, e2 = make_llama_family(tmp_path / "models", experts=3, hidden=16, layers=4, intermediate=32, vocab=32)
    recipe = {"merge_method": "linear", "dtype": "float32", "parameters": {"weight": 2.0, "normalize": False},
              "slices": [
                  {"sources": [{"model": str(e0), "layer_range": [2, 4],
                                "parameters": {"weight": [{"filter": "layers.2.", "value": 5.0}]}},
                               {"model": str(e1), "layer_range": [0, 2]}],
                   "parameters": {"weight": [{"filter": "mlp", "value": [3.0, 1.0]}]}},
                  {"sources": [{"model": str(e1), "layer_range": [3, 4]},
                               {"model": str(e2), "layer_range": [0, 1], "parameters": {"weight": 0.25}}]}]}
    out = tmp_path / "out"
    mergelab.merge(recipe, out)
    got = _tensors(out)
    x0, x1, x2 = _tensors(e0), _tensors(e1), _tensors(e2)

    def expect(name):
        if ".layers." not in name:
            if "embed" in name:  # first slice's sources, t = 0: no filter matches, top-level weight
                return 2.0 * x0[name].double() + 2.0 * x1[name].double()
            return 2.0 * x1[name].double() + 0.25 * x2[name].double()  # last slice's sources
        j = int(name.split(".")[2])
        rest = name.split(".", 3)[3]
        if j == 2:  # second slice, one layer (t = 1): e1's layer 3 at the top-level weight, e2's layer 0 at 0.25
            return 2.0 * x1[f"model.layers.3.{rest}"].double() + 0.25 * x2[f"model.layers.0.{rest}"].double()
        slice_w = (3.0 if j == 0 else 1.0) if "mlp" in rest else 2.0  # slice gradient [3, 1] at t = j, or top level
        w0 = 5.0 if j == 0 else slice_w  # e0's own filter matches its layer 2 only
        return w0 * x0[f"model.layers.{j + 2}.{rest}"].double() + slice_w * x1[f"model.layers.{j}.{rest}"].double()

    assert len(got) == 3 + 9 * 3
    for name, tensor in got.items():
        want = expect(name)
        assert torch.allclose(tensor.double(), want, rtol=1e-6, atol=1e-7), name


def test_global_parameters_from_slice_parameters(tmp_path):
    """slerp's t (a global parameter) set in a slice's parameters, or as slice filters falling through
    to the top level, gives the same tensors as the equivalent top-level setting; t set on a model is
    ignored with a warning (mergekit never reads it there), and --strict refuses it."""
    from mergelab.merge import MergeWarning
    from mergelab.synthetic import make_llama_family

    base, e0 = make_llama_family(tmp_path / "models", experts=1, hidden=16, layers=2, intermediate=32, vocab=32)

    def slerp(top, slice_params=None, source_params=None):
        sl = {"sources": [{"model": str(base), "layer_range": [0, 2]},
                          {"model": str(e0), "layer_range": [0, 2], **({"parameters": source_params} if source_params else {})}]}
        if slice_params:
            sl["parameters"] = slice_params
        return {"merge_method": "slerp", "base_model": str(base), "dtype": "float32", "slices": [sl],
                **({"parameters": top} if top else {})}

    def run(recipe, name, **kw):
        mergelab.merge(recipe, tmp_path / name, **kw)
        return _tensors(tmp_path / name)

    top = run(slerp({"t": 0.3}), "top")
    assert not torch.equal(top["model.layers.0.mlp.up_proj.weight"], _tensors(base)["model.layers.0.mlp.up_proj.weight"])
    for name, a in run(slerp(None, {"t": 0.3}), "slice").items():
        assert torch.equal(a, top[name]), name
    combined = run(slerp({"t": [{"filter": "self_attn", "value": [0.1, 0.9]}, {"value": 0.6}]}), "combined")
    split = run(slerp({"t": 0.6}, {"t": [{"filter": "self_attn", "value": [0.1, 0.9]}]}), "split")
    assert not torch.equal(combined["model.layers.1.self_attn.q_proj.weight"], top["model.layers.1.self_attn.q_proj.weight"])
    for name, a in combined.items():
        assert torch.equal(a, split[name]), name
    with pytest.warns(MergeWarning, match="parameter 't' .* is a global parameter of method 'slerp'"):
        ignored = run(slerp({"t": 0.3}, source_params={"t": 0.9}), "ignored")
    for name, a in ignored.items():
        assert torch.equal(a, top[name]), name
    with pytest.raises(RecipeError, match="global parameter .*--strict"):
        mergelab.merge(slerp({"t": 0.3}, source_params={"t": 0.9}), tmp_path / "strict", strict=True)
    with pytest.raises(RecipeError, match=r"required parameter 't' of method 'slerp' is missing"):
        mergelab.merge(slerp(None, source_params={"t": 0.9}), tmp_path / "missing")


def test_a_model_twice_in_one_slice_merges_both_ranges(tmp_path):
    """Two layer ranges of one model in one slice are two inputs (mergekit refuses this config)."""
    from mergelab.synthetic import make_llama_family

    _, e0 = make_llama_family(tmp_path / "models", experts=1, hidden=16, layers=4, intermediate=32, vocab=32)
    recipe = {"merge_method": "linear", "dtype": "float32", "parameters": {"normalize": False}, "slices": [{"sources": [
        {"model": str(e0), "layer_range": [0, 2], "parameters": {"weight": 0.3}},
        {"model": str(e0), "layer_range": [2, 4], "parameters": {"weight": 0.7}}]}]}
    mergelab.merge(recipe, tmp_path / "out")
    got, x = _tensors(tmp_path / "out"), _tensors(e0)
    for j in range(2):
        name = f"model.layers.{j}.mlp.up_proj.weight"
        want = 0.3 * x[name].double() + 0.7 * x[f"model.layers.{j + 2}.mlp.up_proj.weight"].double()
        assert torch.allclose(got[name].double(), want, rtol=1e-6, atol=1e-7)
