"""End-to-end parity with mergekit 0.1.5: the same recipe file through both command lines.

Runs only when ``MERGEKIT_PYTHON`` (mergekit's venv python) or ``MERGEKIT_YAML`` (its ``mergekit-yaml``)
is set; create that venv with ``benchmarks/setup_mergekit_venv.sh``::

    MERGEKIT_PYTHON=/path/to/venv/bin/python .venv/bin/python -m pytest -m mergekit tests/parity -q

For each recipe, tiny float32 Llama checkpoints (base + 3 experts) are merged by ``mergekit-yaml`` and
by ``mergelab merge``, and every output tensor is compared: the same names, shapes and dtypes, and
values equal or at most one float32 ulp apart (summation order may differ in the last bit). Random
DARE cannot be compared value by value (different random streams), so for it the statistics that
define the method are compared instead: the fraction of entries kept and the L1 norm each task
vector keeps after mergekit's rescale. Both outputs' ``config.json`` must agree on the fields that
define the model, and transformers must load mergelab's output.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Dict

import pytest
import torch

from mergelab.synthetic import make_llama_family
from tests.parity.mergekit_runner import (MERGEKIT_YAML, NEEDS_MERGEKIT_CLI, assert_same_config, assert_same_tensors,
                                          load_tensors, run_both, ulp_distance)

pytestmark = NEEDS_MERGEKIT_CLI

LAYERS = 4


# --------------------------------------------------------------------------- fixtures and helpers
@pytest.fixture(scope="module")
def family(tmp_path_factory) -> Dict[str, str]:
    """Tiny float32 Llama checkpoints: ``base`` and ``expert_0..2`` (paths as strings)."""
    if not MERGEKIT_YAML.is_file():
        pytest.fail(f"MERGEKIT_PYTHON/MERGEKIT_YAML is set but '{MERGEKIT_YAML}' does not exist")
    root = tmp_path_factory.mktemp("family")
    paths = make_llama_family(root, experts=3, hidden=64, layers=LAYERS, intermediate=160, vocab=384,
                              dtype="float32", seed=7)
    return {p.name: str(p) for p in paths}


def models(family: Dict[str, str], **per_model: list) -> list:
    """``models:`` entries for the three experts; ``per_model[name][i]`` is expert i's setting."""
    entries = []
    for i in range(3):
        params = {k: v[i] for k, v in per_model.items()}
        entries.append({"model": family[f"expert_{i}"], "parameters": params})
    return entries


# --------------------------------------------------------------------------- deterministic methods
DETERMINISTIC = {
    "linear": lambda f: {
        "merge_method": "linear", "models": models(f, weight=[0.5, 0.3, 0.2]), "dtype": "float32"},
    "linear_with_base_unnormalized": lambda f: {
        "merge_method": "linear", "base_model": f["base"],
        "models": [{"model": f["base"], "parameters": {"weight": 0.4}}] + models(f, weight=[0.3, 0.2, 0.25]),
        "parameters": {"normalize": False}, "dtype": "float32"},
    "task_arithmetic": lambda f: {
        "merge_method": "task_arithmetic", "base_model": f["base"],
        "models": models(f, weight=[1.0, -0.4, 0.7]), "parameters": {"lambda": 0.8}, "dtype": "float32"},
    "task_arithmetic_normalized": lambda f: {
        "merge_method": "task_arithmetic", "base_model": f["base"],
        "models": models(f, weight=[0.6, 0.3, 0.3]), "parameters": {"normalize": True}, "dtype": "float32"},
    "ties_density_0.5": lambda f: {
        "merge_method": "ties", "base_model": f["base"],
        "models": models(f, weight=[1.0, 1.0, 1.0], density=[0.5, 0.5, 0.5]), "dtype": "float32"},
    "ties_mixed_densities_weights": lambda f: {
        "merge_method": "ties", "base_model": f["base"],
        "models": models(f, weight=[1.0, 0.6, 0.3], density=[0.2, 0.5, 0.9]), "dtype": "float32"},
    "ties_unnormalized_lambda": lambda f: {
        "merge_method": "ties", "base_model": f["base"],
        "models": models(f, weight=[0.7, 0.5, 0.4], density=[0.3, 0.3, 0.6]),
        "parameters": {"normalize": False, "lambda": 0.5}, "dtype": "float32"},
    # mergekit's examples/ties.yml pattern: a per-layer density gradient, a per-layer weight gradient
    # and a filter conditional (mlp tensors get 0.5, everything else 0).
    "ties_gradient_and_filter": lambda f: {
        "merge_method": "ties", "base_model": f["base"],
        "models": [
            {"model": f["expert_0"], "parameters": {"density": [1, 0.7, 0.1], "weight": 1.0}},
            {"model": f["expert_1"], "parameters": {"density": 0.5, "weight": [0, 0.3, 0.7, 1]}},
            {"model": f["expert_2"], "parameters": {"density": 0.33,
                                                  "weight": [{"filter": "mlp", "value": 0.5}, {"value": 0}]}},
        ],
        "parameters": {"normalize": True, "int8_mask": True}, "dtype": "float32"},
    "ties_global_filter_density": lambda f: {
        "merge_method": "ties", "base_model": f["base"],
        "models": models(f, weight=[1.0, 0.8, 0.6]),
        "parameters": {"density": [{"filter": "self_attn", "value": 0.3}, {"filter": "lm_head", "value": 0.8},
                                   {"value": [0.9, 0.4]}]},
        "dtype": "float32"},
    "dare_linear_density_1": lambda f: {
        "merge_method": "dare_linear", "base_model": f["base"],
        "models": models(f, weight=[0.5, 0.3, 0.4], density=[1.0, 1.0, 1.0]), "dtype": "float32"},
    "dare_ties_density_1": lambda f: {
        "merge_method": "dare_ties", "base_model": f["base"],
        "models": models(f, weight=[0.9, 0.6, 0.3], density=[1.0, 1.0, 1.0]), "dtype": "float32"},
    "dare_ties_density_1_normalized": lambda f: {
        "merge_method": "dare_ties", "base_model": f["base"],
        "models": models(f, weight=[0.9, 0.6, 0.3], density=[1.0, 1.0, 1.0]),
        "parameters": {"normalize": True, "lambda": 1.5}, "dtype": "float32"},
}


@pytest.mark.parametrize("case", sorted(DETERMINISTIC))
def test_same_tensors_as_mergekit(case, family, tmp_path):
    recipe = DETERMINISTIC[case](family)
    out_mk, out_ml = run_both(recipe, tmp_path)
    stats = assert_same_tensors(out_mk, out_ml, tie_family=family if recipe["merge_method"] == "ties" else None)
    assert_same_config(out_mk, out_ml)
    # A merge that changed nothing would make the comparison vacuous.
    base = load_tensors(Path(family["base"]))
    merged = load_tensors(out_ml)
    assert any(not torch.equal(merged[k], base[k]) for k in base), f"{case}: output equals the base model"
    print(f"{case}: {stats['tensors']} tensors, {stats['exactly_equal']}/{stats['values']} values bit-equal, "
          f"worst {stats['worst_ulp'][0]:.0f} ulp ({stats['worst_ulp'][1]}), {stats['tie_breaks']} threshold tie breaks")


def test_ulp_distance_detects_differences():
    """The comparison itself: one ulp passes, two ulps and sign flips fail."""
    a = torch.tensor([1.0, -3.5, 0.0, 1e-30])
    one = torch.nextafter(a, torch.full_like(a, math.inf))
    assert float(ulp_distance(a, a).max()) == 0
    assert float(ulp_distance(a, one).max()) <= 1
    two = torch.nextafter(one, torch.full_like(a, math.inf))
    assert float(ulp_distance(a[:2], two[:2]).min()) > 1
    assert float(ulp_distance(torch.tensor([1.0]), torch.tensor([-1.0]))) > 1


# --------------------------------------------------------------------------- random DARE: statistics
def _dare_stats(out: Path, family: Dict[str, str]) -> dict:
    """Kept fraction, per-tensor L1 ratio and per-tensor rescale consistency of one expert after DARE."""
    base = load_tensors(Path(family["base"]))
    expert = load_tensors(Path(family["expert_0"]))
    merged = load_tensors(out)
    kept = nonzero = 0
    l1_ratios, off_scale = {}, {}
    for name, b in base.items():
        tau = expert[name] - b
        out_t = merged[name]
        delta = out_t - b
        live = tau != 0
        kept_here = (delta != 0) & live
        assert not bool(((delta != 0) & ~live).any()), f"{name}: entries with a zero task vector changed"
        kept += int(kept_here.sum())
        nonzero += int(live.sum())
        l1_ratios[name] = float(delta.abs().double().sum() / tau.abs().double().sum())
        if int(kept_here.sum()):
            # One factor s per tensor: out = base + tau * s on every kept entry, up to the rounding
            # of out (float32) and the float32 rounding of s itself (a norm ratio of float32 sums).
            s_hat = delta[kept_here].abs().double().sum() / tau[kept_here].abs().double().sum()
            expect = b.double() + tau.double() * s_hat
            err = (out_t.double() - expect).abs()
            ulp = (torch.nextafter(out_t.abs(), torch.full_like(out_t, math.inf)) - out_t.abs()).double()
            bad = kept_here & (err > 2 * ulp + 1e-4 * tau.double().abs() * s_hat)
            if bool(bad.any()):
                off_scale[name] = int(bad.sum())
    return {"kept_fraction": kept / nonzero, "l1": l1_ratios, "off_scale": off_scale, "entries": nonzero}


@pytest.mark.parametrize("density", [0.3, 0.7])
def test_random_dare_statistics_match_mergekit(density, family, tmp_path):
    """One expert through dare_linear (rescale on, weight 1): out = base + mask * tau * s per tensor.

    Both tools must keep about ``density`` of the entries (binomial tolerance), preserve each tensor's
    task-vector L1 norm (mergekit's rescale, not the paper's 1/density) and scale every kept entry by
    the same per-tensor factor.
    """
    recipe = {"merge_method": "dare_linear", "base_model": family["base"],
              "models": [{"model": family["expert_0"], "parameters": {"weight": 1.0, "density": density}}],
              "dtype": "float32"}
    out_mk, out_ml = run_both(recipe, tmp_path, seed=1234)
    stats = {"mergekit": _dare_stats(out_mk, family), "mergelab": _dare_stats(out_ml, family)}
    for tool, s in stats.items():
        sigma = math.sqrt(density * (1 - density) / s["entries"])
        assert abs(s["kept_fraction"] - density) < 6 * sigma, f"{tool}: kept {s['kept_fraction']:.4f}, density {density}"
        bad = {k: v for k, v in s["l1"].items() if abs(v - 1) > 1e-3}
        assert not bad, f"{tool}: task-vector L1 norm not preserved in {len(bad)} tensors, e.g. {next(iter(bad.items()))}"
        assert not s["off_scale"], f"{tool}: kept entries not scaled by one factor per tensor: {s['off_scale']}"
    diff = abs(stats["mergekit"]["kept_fraction"] - stats["mergelab"]["kept_fraction"])
    n = stats["mergelab"]["entries"]
    assert diff < 6 * math.sqrt(2 * density * (1 - density) / n), f"kept fractions differ by {diff:.4f}"
    # The masks themselves are independent draws, so the outputs must not be identical.
    assert not all(torch.equal(a, b) for a, b in zip(load_tensors(out_mk).values(), load_tensors(out_ml).values()))


def test_random_dare_ties_aggregate_statistics(family, tmp_path):
    """dare_ties with three experts at density 0.5: same sparsity and L1 mass of the merged delta."""
    recipe = {"merge_method": "dare_ties", "base_model": family["base"],
              "models": models(family, weight=[1.0, 0.7, 0.5], density=[0.5, 0.5, 0.5]), "dtype": "float32"}
    out_mk, out_ml = run_both(recipe, tmp_path, seed=99)
    base = load_tensors(Path(family["base"]))
    summary = {}
    for tool, out in (("mergekit", out_mk), ("mergelab", out_ml)):
        merged = load_tensors(out)
        nz = sum(int((merged[k] != base[k]).sum()) for k in base)
        l1 = sum(float((merged[k] - base[k]).abs().double().sum()) for k in base)
        summary[tool] = (nz / sum(b.numel() for b in base.values()), l1)
    (f_mk, l1_mk), (f_ml, l1_ml) = summary["mergekit"], summary["mergelab"]
    assert abs(f_mk - f_ml) < 0.01, f"changed fraction: mergekit {f_mk:.4f} vs mergelab {f_ml:.4f}"
    assert abs(l1_mk / l1_ml - 1) < 0.02, f"L1 of merged delta: mergekit {l1_mk:.4f} vs mergelab {l1_ml:.4f}"


# --------------------------------------------------------------------------- loading with transformers
def test_transformers_loads_mergelab_output(family, tmp_path):
    transformers = pytest.importorskip("transformers")
    recipe = DETERMINISTIC["ties_mixed_densities_weights"](family)
    out_mk, out_ml = run_both(recipe, tmp_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out_ml), dtype=torch.float32)
    assert type(model).__name__ == "LlamaForCausalLM"
    merged = load_tensors(out_ml)
    state = model.state_dict()
    for name, t in merged.items():
        assert torch.equal(state[name], t), f"transformers loaded '{name}' with other values"
    ids = torch.tensor([[1, 5, 9, 200, 17]])
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, 5, 384) and bool(torch.isfinite(logits).all())
    # And mergekit's output gives the same logits (to float32 rounding).
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(out_mk), dtype=torch.float32)
    with torch.no_grad():
        assert torch.allclose(ref(ids).logits, logits, rtol=1e-5, atol=1e-5)
