"""Engine hooks methods rely on: post-step statistics, per-tensor reports, auxiliary inputs."""

import json
import re

import pytest
import torch
import yaml

import mergelab
from mergelab.errors import RecipeError
from mergelab.methods.registry import get_method


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


def test_lines_l1_ratio_after_ties_uses_the_reference_alpha():
    """The engine's statistics pass gives the post-step the whole-model alpha of the reference
    (wang-kee/LiNeS aggregation: ||sum_t tau_t||_1 / ||tau_merged||_1 / T), here with a merge whose
    ratio is not 1/T; tensors outside the blocks get alpha, block l gets alpha + beta l / (L - 1)."""
    base, models = family()
    beta = 0.4
    plain = mergelab.merge_state_dicts(base, models, "ties", weight=1.0, density=0.3)
    post = [{"name": "lines", "parameters": {"beta": beta, "alpha_mode": "l1_ratio"}}]
    for chunk in (None, 20):
        out = mergelab.merge_state_dicts(base, models, "ties", weight=1.0, density=0.3, post=post,
                                         chunk_elements=chunk)
        summed = sum(float(sum((m[k] - base[k]).double() for m in models).abs().sum()) for k in base)
        merged = sum(float((plain[k] - base[k]).double().abs().sum()) for k in base)
        alpha = summed / merged / len(models)
        assert abs(alpha - 1 / len(models)) > 0.05  # a case where l1_ratio and inverse_tasks differ
        for k in base:
            layer = int(k.split(".")[2]) if k.startswith("model.layers.") else None
            scale = alpha if layer is None else alpha + beta * layer / 2
            torch.testing.assert_close(out[k], base[k] + scale * (plain[k] - base[k]), atol=1e-5, rtol=1e-5)


def test_tsv_rank_report_reaches_the_manifest(tmp_path):
    from mergelab.synthetic import make_llama_family
    from safetensors import safe_open

    paths = make_llama_family(tmp_path / "m", experts=3, hidden=16, layers=1, intermediate=32, vocab=32)
    recipe = {"merge_method": "tsv", "base_model": str(paths[0]),
              "models": [{"model": str(p), "parameters": {"weight": 1.0}} for p in paths[1:]]}
    mergelab.merge(recipe, tmp_path / "out")
    manifest = json.loads((tmp_path / "out" / "mergelab.json").read_text())
    with safe_open(str(paths[0] / "model.safetensors"), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    default_exclude = re.compile(get_method("tsv").param("exclude").default)
    expected = {}
    for name, shape in shapes.items():
        if len(shape) == 2 and not default_exclude.search(name):
            r = min(shape)  # TSV-M keeps floor(r / T) triplets of each of the T = 3 task vectors
            expected[name] = {"rank_per_task": r // 3, "rank": 3 * (r // 3), "full_rank": r}
        else:
            expected[name] = {"mean": True}
    assert manifest["reports"] == expected
    assert expected["model.layers.0.self_attn.q_proj.weight"] == {"rank_per_task": 5, "rank": 15, "full_rank": 16}


def test_aux_inputs_in_memory_for_ota():
    base, models = family(2)
    same = {k: torch.ones_like(v) for k, v in base.items()}
    out = mergelab.merge_state_dicts(base, models, "ota", aux={"second_moments": [same, same]})
    # equal second moments and no masks: OTA is the plain average of the task vectors
    avg = mergelab.merge_state_dicts(base, models, "task_arithmetic", weight=1.0, lambda_=0.5)
    assert all(torch.allclose(out[k], avg[k], atol=1e-5) for k in out)
    with pytest.raises(RecipeError, match="second_moments"):
        mergelab.merge_state_dicts(base, models, "ota")
