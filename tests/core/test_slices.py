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
