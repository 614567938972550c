"""Engine hooks methods rely on: post-step statistics, per-tensor reports, auxiliary inputs."""

import json

import pytest
import torch
import yaml

import mergelab
from mergelab.errors import RecipeError


def family(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = {f"model.layers.{i}.w": torch.randn(12, 8, generator=g) for i in range(3)}
    base["model.embed.weight"] = torch.randn(10, 8, generator=g)
    models = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(n)]
    return base, models


def test_lines_l1_ratio_post_step_uses_whole_model_statistics():
    base, models = family()
    post = [{"name": "lines", "parameters": {"beta": 0.5, "alpha_mode": "l1_ratio"}}]
    out = mergelab.merge_state_dicts(base, models, "task_arithmetic", weight=1.0, post=post)
    # For task arithmetic with lambda 1 the L1 ratio is exactly 1/T (the inverse_tasks mode).
    inv = [{"name": "lines", "parameters": {"beta": 0.5, "alpha_mode": "inverse_tasks"}}]
    ref = mergelab.merge_state_dicts(base, models, "task_arithmetic", weight=1.0, post=inv)
    assert all(torch.allclose(out[k], ref[k], atol=1e-5) for k in out)
    # chunked streaming gives the same statistics
    chunked = mergelab.merge_state_dicts(base, models, "task_arithmetic", weight=1.0, post=post, chunk_elements=20)
    assert all(torch.allclose(out[k], chunked[k], atol=1e-6) for k in out)


def test_tsv_rank_report_reaches_the_manifest(tmp_path):
    from mergelab.synthetic import make_llama_family

    paths = make_llama_family(tmp_path / "m", experts=2, hidden=16, layers=1, intermediate=32, vocab=32)
    recipe = {"merge_method": "tsv", "base_model": str(paths[0]),
              "models": [{"model": str(p), "parameters": {"weight": 1.0}} for p in paths[1:]]}
    try:
        mergelab.merge(recipe, tmp_path / "out")
    except RecipeError:
        recipe["models"] = [{"model": str(p)} for p in paths[1:]]
        mergelab.merge(recipe, tmp_path / "out")
    manifest = json.loads((tmp_path / "out" / "mergelab.json").read_text())
    q = manifest["reports"]["model.layers.0.self_attn.q_proj.weight"]
    assert q["full_rank"] == 16 and q["rank"] == 2 * q["rank_per_task"] and q["rank"] <= 16


def test_aux_inputs_in_memory_for_ota():
    base, models = family(2)
    same = {k: torch.ones_like(v) for k, v in base.items()}
    out = mergelab.merge_state_dicts(base, models, "ota", aux={"second_moments": [same, same]})
    # equal second moments and no masks: OTA is the plain average of the task vectors
    avg = mergelab.merge_state_dicts(base, models, "task_arithmetic", weight=1.0, lambda_=0.5)
    assert all(torch.allclose(out[k], avg[k], atol=1e-5) for k in out)
    with pytest.raises(RecipeError, match="second_moments"):
        mergelab.merge_state_dicts(base, models, "ota")
