"""LiNeS: layer scaling by hand (reference rule alpha + beta * l / (L - 1)), the method and the post-step."""

import pytest
import torch

import mergelab
from mergelab.errors import RecipeError
from mergelab.methods.lines import LinesStats, layer_scale, lines_post_apply, lines_post_statistics
from mergelab.methods.registry import ModelScope, TensorInputs, get_post_step
from tests.methods.papers_support import merge_model, merge_one, rand


def reference_scale(key, alpha, beta, num_blocks):
    # Test oracle from wang-kee/LiNeS ``LiNeS_scaling``: the first block whose ".{i}." occurs in the key,
    # alpha for keys outside every block.
    for layer in range(num_blocks):
        if f".{layer}." in key:
            return alpha + beta * (layer / (num_blocks - 1))
    return alpha


def test_layer_scale_matches_the_reference_rule():
    keys = ["model.layers.0.mlp.weight", "model.layers.1.attn.weight", "model.layers.2.x", "model.layers.3.y",
            "model.embed_tokens.weight", "lm_head.weight"]
    layers = [0, 1, 2, 3, None, None]
    for key, layer in zip(keys, layers):
        assert layer_scale(layer, 4, 0.2, 0.6) == pytest.approx(reference_scale(key, 0.2, 0.6, 4))
    assert [layer_scale(i, 4, 0.2, 0.6) for i in range(4)] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert layer_scale(None, 4, 0.2, 0.6, "deepest") == pytest.approx(0.8)
    assert layer_scale(0, 1, 0.3, 0.5) == pytest.approx(0.8)  # one block: alpha + beta


def test_scale_is_monotone_in_depth_for_nonnegative_beta():
    s = [layer_scale(i, 12, 0.1, 0.9) for i in range(12)]
    assert all(a <= b for a, b in zip(s, s[1:]))
    assert s[-1] == pytest.approx(1.0)


BASE = rand(4, 3, seed=1)
FT = BASE + rand(4, 3, seed=2)


def test_single_task_alpha_one_gives_the_fine_tuned_model():
    for layer in (None, 0, 5):
        out = merge_one("lines", BASE, [FT], layer=layer, num_layers=6, alpha=1.0)
        torch.testing.assert_close(out, FT, rtol=0, atol=1e-6)


def test_single_task_scales_by_depth_and_keeps_the_last_block():
    tau = FT - BASE
    for layer, expect in [(0, 0.25), (1, 0.5), (3, 1.0), (None, 0.25)]:
        out = merge_one("lines", BASE, [FT], layer=layer, num_layers=4, alpha=0.25)
        # alpha + (1 - alpha) * l / 3: 0.25, 0.5, 0.75, 1.0; non-block tensors alpha.
        torch.testing.assert_close(out, BASE + expect * tau, rtol=0, atol=1e-6)


def sd(seed):
    return {
        "model.embed_tokens.weight": rand(5, 3, seed=seed),
        "model.layers.0.mlp.weight": rand(3, 3, seed=seed + 1),
        "model.layers.1.mlp.weight": rand(3, 3, seed=seed + 2),
        "model.layers.2.mlp.weight": rand(3, 3, seed=seed + 3),
    }


def test_post_step_after_task_arithmetic_inverse_tasks_by_hand():
    base, models = sd(0), [sd(10), sd(20)]
    post = [{"name": "lines", "parameters": {"beta": 0.5, "alpha_mode": "inverse_tasks"}}]
    out = mergelab.merge_state_dicts(base, models, "task_arithmetic", weight=1.0, post=post)
    for key, layer in [("model.embed_tokens.weight", None), ("model.layers.0.mlp.weight", 0),
                       ("model.layers.1.mlp.weight", 1), ("model.layers.2.mlp.weight", 2)]:
        scale = 0.5 + (0.0 if layer is None else 0.5 * layer / 2)
        summed = sum(m[key] - base[key] for m in models)
        torch.testing.assert_close(out[key], base[key] + scale * summed, rtol=1e-6, atol=1e-6)


def test_post_step_numbers_written_as_strings_read_as_mergekit_reads_values():
    # YAML 1.1 reads 5e-1 (no dot) as a string; recipes read it as the number, post-steps too.
    base, models = sd(0), [sd(10), sd(20)]
    post = [{"name": "lines", "parameters": {"beta": "5e-1", "alpha_mode": "inverse_tasks"}}]
    got = mergelab.merge_state_dicts(base, models, "task_arithmetic", weight=1.0, post=post)
    post[0]["parameters"]["beta"] = 0.5
    want = mergelab.merge_state_dicts(base, models, "task_arithmetic", weight=1.0, post=post)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_single_task_method_through_the_api_and_one_model_only():
    base, ft = sd(0), sd(30)
    out = mergelab.merge_state_dicts(base, [ft], "lines", alpha=0.4)
    for key, s in [("model.embed_tokens.weight", 0.4), ("model.layers.0.mlp.weight", 0.4),
                   ("model.layers.1.mlp.weight", 0.7), ("model.layers.2.mlp.weight", 1.0)]:
        torch.testing.assert_close(out[key], base[key] + s * (ft[key] - base[key]), rtol=1e-6, atol=1e-6)
    with pytest.raises(RecipeError, match="lines"):
        mergelab.merge_state_dicts(base, [ft, sd(40)], "lines", alpha=0.4)


def _scope(tensors, merged):
    def chunks():
        for name, (base, models) in tensors.items():
            yield TensorInputs(name, tuple(base.shape), base, models, {}, [{} for _ in models],
                               aux={"merged_delta": merged[name]})
    return ModelScope({}, [{} for _ in range(2)], 2, chunks)


def test_l1_ratio_alpha_is_one_over_t_for_task_arithmetic_and_adapts_to_the_merge():
    tensors = {"a": (rand(4, seed=1), [rand(4, seed=2), rand(4, seed=3)]),
               "b": (rand(3, 2, seed=4), [rand(3, 2, seed=5), rand(3, 2, seed=6)])}
    summed = {k: sum(m - b for m in ms) for k, (b, ms) in tensors.items()}
    stats = lines_post_statistics(_scope(tensors, summed))
    assert stats.alpha == pytest.approx(1 / 2, rel=1e-6)
    # A merge whose task vector is half the sum (e.g. a mean) gets alpha = 2 * (1 / T).
    halves = {k: 0.5 * v for k, v in summed.items()}
    assert lines_post_statistics(_scope(tensors, halves)).alpha == pytest.approx(1.0, rel=1e-6)
    # By hand on explicit L1 norms.
    l1_sum = sum(float(v.abs().sum()) for v in summed.values())
    weird = {"a": torch.ones(4), "b": torch.zeros(3, 2)}
    assert lines_post_statistics(_scope(tensors, weird)).alpha == pytest.approx(l1_sum / 4 / 2, rel=1e-6)


def _post_inputs(params, layer, num_layers, models=2, stats=None):
    step = get_post_step("lines")
    full = {p.name: p.default for p in step.params}
    full.update(params)
    base = torch.zeros(3)
    return TensorInputs("t", (3,), base, [base] * models, full, [{}] * models, layer=layer,
                        num_layers=num_layers, model_stats=stats)


def test_post_step_modes_and_missing_statistics():
    delta = torch.tensor([1.0, -2.0, 4.0])
    stats = LinesStats(summed_task_vectors_l1=6.0, merged_l1=2.0, num_models=3)  # alpha = 6 / 2 / 3 = 1
    x = _post_inputs({"beta": 0.5}, 2, 3, models=3, stats=stats)
    torch.testing.assert_close(lines_post_apply(x, delta), 1.5 * delta)
    x = _post_inputs({"beta": 0.5, "alpha_mode": "fixed", "alpha": 0.1}, 1, 3)
    torch.testing.assert_close(lines_post_apply(x, delta), 0.35 * delta)
    with pytest.raises(RecipeError, match="alpha_mode"):
        lines_post_apply(_post_inputs({"beta": 0.5}, 0, 3), delta)


def test_post_step_composes_with_ties_in_the_driver():
    tensors = {f"model.layers.{i}.w": {"base": rand(6, seed=i), "models": [rand(6, seed=10 + i), rand(6, seed=20 + i)],
                                       "layer": i} for i in range(3)}
    step = get_post_step("lines")
    params = {"beta": 0.3, "alpha_mode": "fixed", "alpha": 0.2, "non_layer": "alpha"}
    plain = merge_model("ties", tensors, num_layers=3, weight=1.0, density=0.5)
    scaled = merge_model("ties", tensors, num_layers=3, post=[(step, params)], weight=1.0, density=0.5)
    for i in range(3):
        name = f"model.layers.{i}.w"
        base = tensors[name]["base"]
        torch.testing.assert_close(scaled[name] - base, (0.2 + 0.3 * i / 2) * (plain[name] - base))
