"""Every method whose name mergekit 0.1.5 has, from a plain mergekit config, through both command lines.

A config written for mergekit carries no ``semantics:`` key, so mergelab's *defaults* must give
mergekit's tensors (issue 14 point 3). For each method of mergekit's registry there is one config of
the kind people publish (``dtype: float32``, mergekit's parameter names only) on tiny float32
checkpoints: a Llama-shaped family (base + 3 experts) and, for ``model_stock``, a Qwen2-shaped one (q/k/v
biases). One mergekit process runs every config (``mergekit.merge.run_merge``, as ``mergekit-yaml``
does); mergelab runs each through its command line (``mergelab merge``, in-process). Every output
tensor must have the same name, shape and dtype and be equal bit for bit: on tensors this small the
engine computes each tensor whole, in float32, in mergekit's order of operations, so there is no
rounding to allow for. (Tensors the engine splits into row chunks accumulate whole-tensor sums in
float64 and may differ in the last bit; tests/parity/test_parity_mergekit_family.py covers that path.)

Random methods cannot match mergekit's random stream: ``dare_ties``, ``dare_linear``, ``della`` and
``della_linear`` run at ``density: 1``, where both tools keep every entry and the rest (weights,
``lambda``, L1 rescale, sign election, ``normalize``) is deterministic. A test checks that the configs
cover mergekit's whole registry, so a method mergekit adds cannot go unchecked; one that mergelab lacks
is skipped with the reason.

    MERGEKIT_PYTHON=/path/to/mergekit-venv/bin/python .venv/bin/python -m pytest -m mergekit tests/parity
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Dict

import pytest
import torch

from mergelab.methods.registry import available_methods
from mergelab.synthetic import llama_config, llama_shapes, make_llama_family, write_checkpoint
from tests.conftest import run_cli
from tests.parity.mergekit_runner import (NEEDS_MERGEKIT, assert_bit_equal, assert_same_config, load_tensors,
                                          run_configs, write_configs)

pytestmark = NEEDS_MERGEKIT

LAYERS = 2


def qwen2_family(root: Path, experts: int = 3, seed: int = 11) -> Dict[str, str]:
    """Tiny float32 Qwen2 checkpoints (Llama's tensors plus q/k/v biases): ``base`` and ``expert_0..``."""
    hidden, intermediate, vocab, heads, kv_heads = 64, 128, 256, 4, 2
    shapes = llama_shapes(hidden, LAYERS, intermediate, vocab, heads, kv_heads)
    for i in range(LAYERS):
        for proj, rows in (("q", hidden), ("k", kv_heads * hidden // heads), ("v", kv_heads * hidden // heads)):
            shapes[f"model.layers.{i}.self_attn.{proj}_proj.bias"] = (rows,)
    cfg = llama_config(hidden, LAYERS, intermediate, vocab, heads, kv_heads, "float32")
    cfg.update({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "rope_theta": 1000000.0,
                "rms_norm_eps": 1e-6, "use_sliding_window": False, "sliding_window": None,
                "max_window_layers": LAYERS})
    g = torch.Generator().manual_seed(seed)
    base = {n: torch.randn(s, generator=g) * (0.02 if len(s) == 1 else s[-1] ** -0.5) for n, s in shapes.items()}
    paths = {"base": root / "base"}
    write_checkpoint(paths["base"], base, cfg)
    shared = {n: torch.randn(t.shape, generator=g) for n, t in base.items()}
    for e in range(experts):
        # Task vectors share one direction plus their own noise; in every other tensor expert 1's shared
        # part is reversed, so Model Stock sees positive mean cosines in some tensors, negative in others.
        tensors = {n: t + 0.01 * t.abs().mean() * ((-1 if e == 1 and k % 2 else 1) * shared[n]
                                                   + torch.randn(t.shape, generator=g))
                   for k, (n, t) in enumerate(base.items())}
        paths[f"expert_{e}"] = root / f"expert_{e}"
        write_checkpoint(paths[f"expert_{e}"], tensors, cfg)
    return {k: str(v) for k, v in paths.items()}


def _models(fam: Dict[str, str], n: int = 3, **per_model: list) -> list:
    return [{"model": fam[f"expert_{i}"], "parameters": {k: v[i] for k, v in per_model.items()}}
            if per_model else {"model": fam[f"expert_{i}"]} for i in range(n)]


def _gta(method: str, **params) -> Callable:
    """A task-arithmetic-family config: base + 3 experts with weights (and ``params`` per model)."""
    def make(f):
        per = {"weight": [1.0, 0.6, 0.3], **params}
        return {"merge_method": method, "base_model": f["base"], "models": _models(f, **per), "dtype": "float32"}
    return make


# One plain mergekit config per mergekit method (the key is the case id; "family" picks the checkpoints).
CONFIGS: Dict[str, tuple] = {
    "linear": ("llama", lambda f: {
        "merge_method": "linear", "models": _models(f, weight=[0.5, 0.3, 0.2]), "dtype": "float32"}),
    "task_arithmetic": ("llama", lambda f: {
        "merge_method": "task_arithmetic", "base_model": f["base"], "models": _models(f, weight=[1.0, -0.4, 0.7]),
        "parameters": {"lambda": 0.8}, "dtype": "float32"}),
    "ties": ("llama", _gta("ties", density=[0.5, 0.6, 0.7])),
    "dare_ties": ("llama", _gta("dare_ties", density=[1.0, 1.0, 1.0])),
    "dare_linear": ("llama", _gta("dare_linear", density=[1.0, 1.0, 1.0])),
    "breadcrumbs": ("llama", _gta("breadcrumbs", density=[0.5, 0.6, 0.5], gamma=[0.05, 0.02, 0.01])),
    "breadcrumbs_ties": ("llama", _gta("breadcrumbs_ties", density=[0.5, 0.6, 0.5], gamma=[0.05, 0.02, 0.01])),
    "della": ("llama", _gta("della", density=[1.0, 1.0, 1.0], epsilon=[0.1, 0.1, 0.1])),
    "della_linear": ("llama", _gta("della_linear", density=[1.0, 1.0, 1.0], epsilon=[0.1, 0.1, 0.1])),
    "sce": ("llama", lambda f: {
        "merge_method": "sce", "base_model": f["base"], "models": _models(f),
        "parameters": {"select_topk": 0.5}, "dtype": "float32"}),
    "slerp": ("llama", lambda f: {
        "merge_method": "slerp", "base_model": f["base"], "models": [{"model": f["base"]}, {"model": f["expert_0"]}],
        "parameters": {"t": [0.2, 0.7]}, "dtype": "float32"}),
    "nuslerp": ("llama", lambda f: {
        "merge_method": "nuslerp", "base_model": f["base"], "models": _models(f, 2, weight=[1.0, 2.0]),
        "dtype": "float32"}),
    "multislerp": ("llama", lambda f: {
        "merge_method": "multislerp", "base_model": f["base"], "models": _models(f, weight=[1.0, 0.5, 2.0]),
        "dtype": "float32"}),
    "karcher": ("llama", lambda f: {
        "merge_method": "karcher", "models": _models(f), "parameters": {"max_iter": 20}, "dtype": "float32"}),
    "model_stock": ("llama", lambda f: {
        "merge_method": "model_stock", "base_model": f["base"], "models": _models(f), "dtype": "float32"}),
    "model_stock_qwen2": ("qwen2", lambda f: {
        "merge_method": "model_stock", "base_model": f["base"], "models": _models(f), "dtype": "float32"}),
    "model_stock_filter_wise_qwen2": ("qwen2", lambda f: {
        "merge_method": "model_stock", "base_model": f["base"], "models": _models(f),
        "parameters": {"filter_wise": True}, "dtype": "float32"}),
    "nearswap": ("llama", lambda f: {
        "merge_method": "nearswap", "base_model": f["base"], "models": [{"model": f["expert_0"]}],
        "parameters": {"t": 0.0005}, "dtype": "float32"}),
    "arcee_fusion": ("llama", lambda f: {
        "merge_method": "arcee_fusion", "base_model": f["base"], "models": [{"model": f["expert_0"]}],
        "dtype": "float32"}),
    "passthrough": ("llama", lambda f: {
        "merge_method": "passthrough", "dtype": "float32", "slices": [
            {"sources": [{"model": f["base"], "layer_range": [0, 2]}]},
            {"sources": [{"model": f["expert_0"], "layer_range": [1, 2], "parameters": {"scale": 0.5}}]},
        ]}),
    "ram": ("llama", lambda f: {
        "merge_method": "ram", "base_model": f["base"], "models": _models(f), "dtype": "float32"}),
    "ramplus_tl": ("llama", lambda f: {
        "merge_method": "ramplus_tl", "base_model": f["base"], "models": _models(f), "dtype": "float32"}),
}


def _method(case: str) -> str:
    return CONFIGS[case][1]({"base": "b", **{f"expert_{i}": f"e{i}" for i in range(3)}})["merge_method"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Write every config, run them all in one mergekit process; returns folders and mergekit's report."""
    root = tmp_path_factory.mktemp("defaults")
    families = {
        "llama": {p.name: str(p) for p in make_llama_family(root / "llama", experts=3, hidden=64, layers=LAYERS,
                                                            intermediate=128, vocab=256, seed=21)},
        "qwen2": qwen2_family(root / "qwen2"),
    }
    made = {case: make(families[fam]) for case, (fam, make) in CONFIGS.items()}
    assert not any("semantics" in json.dumps(config) for config in made.values())
    configs = write_configs(made, root)
    report = run_configs(configs, root, options={"copy_tokenizer": False})
    return {"root": root, "configs": configs, "report": report, "families": families}


def test_configs_cover_every_mergekit_method(runs):
    assert sorted({_method(c) for c in CONFIGS}) == runs["report"]["methods"]


def _mergelab(config: Path, out: Path, capsys) -> None:
    code, stdout, stderr = run_cli(["merge", config, "-o", out, "--quiet"], capsys)
    assert code == 0, f"mergelab merge {config.name} failed ({code}):\n{stdout[-3000:]}\n{stderr[-3000:]}"


@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_defaults_give_mergekits_tensors(case, runs, capsys):
    method = _method(case)
    if method not in available_methods():
        pytest.skip(f"mergelab has no '{method}' yet (issue 14 point 4)")
    out_mk = runs["root"] / "mergekit" / case
    out_ml = runs["root"] / "mergelab" / case
    _mergelab(runs["configs"][case], out_ml, capsys)
    _, ml, _ = assert_bit_equal(out_mk, out_ml, case, dtype=torch.float32)
    base = load_tensors(Path(runs["families"][CONFIGS[case][0]]["base"]))
    assert_same_config(out_mk, out_ml)
    # A merge that returned the base (or one input) everywhere would make the comparison vacuous.
    if method != "passthrough":
        assert any(k in base and not torch.equal(ml[k], base[k]) for k in ml), f"{case}: output equals the base"
