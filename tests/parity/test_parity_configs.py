"""mergekit configs as people publish them, through both command lines: the same tensors, bit for bit.

Issue 14's promise is that a mergekit config runs unchanged and gives mergekit's result. The configs
here are the shapes of mergekit's README and of its classic examples (``gradient-slerp.yml``,
``ties.yml``, ``linear.yml``, the ``orcamini-platy`` passthrough frankenmerge, the LazyMergekit slerp
/ ties / dare_ties templates), and the variations people write: ``parameters`` at the top level, per
slice, per source and per model, ``weight``/``density``/``t`` gradients, ``filter:`` lists that fall
through to a lower level, filters on layer names (a source's own layer numbers), ``normalize``,
``int8_mask``, ``dtype``/``out_dtype``, ``tokenizer_source`` and ``tokenizer: {source: ...}``, a
``base_model`` that is also listed under ``models``, a per-slice ``base_model``, ``passthrough`` with
``scale`` filters, slices of different lengths and sources.

The checkpoints are tiny float32 Llama models (4 layers; a base and three experts, with a word-level
tokenizer so mergekit's tokenizer paths run) and a bfloat16 family (a base and two experts). One mergekit 0.1.5 process runs every config
(``run_merge``, as ``mergekit-yaml`` does); mergelab runs each through ``mergelab merge``
(in-process). Every tensor must have the same name, shape and dtype and be equal bit for bit
(float32 arithmetic in mergekit's order; nothing here has tied magnitudes at a trim threshold).

Configs mergelab refuses on purpose are in ``REFUSED``: each must fail with exit code 2 and one clear
line naming what is unsupported and the issue that brings it, never a traceback.

    MERGEKIT_PYTHON=/path/to/mergekit-venv/bin/python .venv/bin/python -m pytest -m mergekit tests/parity
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Dict

import pytest
import torch

from mergelab.synthetic import make_llama_family
from tests.conftest import run_cli
from tests.parity.mergekit_runner import (NEEDS_MERGEKIT, assert_bit_equal, assert_same_config, load_tensors,
                                          run_configs, write_configs)

pytestmark = NEEDS_MERGEKIT

LAYERS = 4
VOCAB = 96

# mergekit's gradient-slerp example: self_attn and mlp follow opposite gradients, the rest t = 0.5.
T_FILTERS = [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
             {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
             {"value": 0.5}]


def _src(model: str, a: int, b: int, **params) -> dict:
    return {"model": model, "layer_range": [a, b], **({"parameters": params} if params else {})}


F = Dict[str, str]
# name -> (f -> config); f maps "base", "e0", "e1", "e2" to checkpoint folders.
CASES: Dict[str, Callable[[F], dict]] = {
    # ---- slerp: the classic two-model slices form, t at every level
    "slerp_gradient_filters_top": lambda f: {
        "slices": [{"sources": [_src(f["base"], 0, 4), _src(f["e0"], 0, 4)]}],
        "merge_method": "slerp", "base_model": f["base"], "parameters": {"t": T_FILTERS}, "dtype": "float32"},
    "slerp_models_form": lambda f: {
        "models": [{"model": f["base"]}, {"model": f["e0"]}],
        "merge_method": "slerp", "base_model": f["base"], "parameters": {"t": T_FILTERS}, "dtype": "float32"},
    "slerp_slice_scalar_t": lambda f: {
        "slices": [{"sources": [_src(f["base"], 0, 4), _src(f["e0"], 0, 4)], "parameters": {"t": 0.3}}],
        "merge_method": "slerp", "base_model": f["base"], "dtype": "float32"},
    "slerp_slice_filters_t": lambda f: {
        "slices": [{"sources": [_src(f["base"], 0, 4), _src(f["e0"], 0, 4)], "parameters": {"t": T_FILTERS}}],
        "merge_method": "slerp", "base_model": f["base"], "dtype": "float32"},
    # slice filters match only some tensors; the rest fall through to the top-level t
    "slerp_slice_filters_fall_through": lambda f: {
        "slices": [{"sources": [_src(f["base"], 0, 4), _src(f["e0"], 0, 4)],
                    "parameters": {"t": [{"filter": "self_attn", "value": [0.1, 0.9]}, {"filter": "mlp", "value": 0.8}]}}],
        "merge_method": "slerp", "base_model": f["base"], "parameters": {"t": 0.5}, "dtype": "float32"},
    # gradients restart in each slice; a slice without t takes the top-level gradient over its own layers
    "slerp_two_slices": lambda f: {
        "slices": [{"sources": [_src(f["base"], 0, 3), _src(f["e0"], 0, 3)], "parameters": {"t": [0.1, 0.6]}},
                   {"sources": [_src(f["base"], 3, 4), _src(f["e0"], 3, 4)]}],
        "merge_method": "slerp", "base_model": f["base"], "parameters": {"t": [0, 0.2, 0.9, 0.4, 1.0]},
        "dtype": "float32"},
    "slerp_slice_base_model": lambda f: {
        "slices": [{"sources": [_src(f["base"], 0, 2), _src(f["e0"], 0, 2)]},
                   {"sources": [_src(f["e1"], 2, 4), _src(f["e2"], 2, 4)], "base_model": f["e2"],
                    "parameters": {"t": 0.1}}],
        "merge_method": "slerp", "base_model": f["base"], "parameters": {"t": 0.7}, "dtype": "float32"},
    # filters match the output name for global parameters (output layer 0 is the base's layer 0 here)
    "slerp_filter_on_layer_name": lambda f: {
        "slices": [{"sources": [_src(f["base"], 0, 2), _src(f["e0"], 2, 4)],
                    "parameters": {"t": [{"filter": "layers.0.", "value": 0.9}, {"value": 0.2}]}}],
        "merge_method": "slerp", "base_model": f["base"], "dtype": "float32"},
    # a global parameter set per model is never read (mergelab warns); a leftover weight is ignored
    "slerp_t_and_weight_per_model": lambda f: {
        "models": [{"model": f["base"], "parameters": {"weight": 1.0}}, {"model": f["e0"], "parameters": {"t": 0.3}}],
        "merge_method": "slerp", "base_model": f["base"], "parameters": {"t": 0.6}, "dtype": "float32"},
    "slerp_fp16_out": lambda f: {
        "slices": [{"sources": [_src(f["base"], 0, 4), _src(f["e0"], 0, 4)]}],
        "merge_method": "slerp", "base_model": f["base"], "parameters": {"t": T_FILTERS}, "dtype": "float32",
        "out_dtype": "float16"},
    # ---- passthrough frankenmerges
    "passthrough_frankenmerge": lambda f: {
        "slices": [{"sources": [_src(f["e0"], 0, 3)]}, {"sources": [_src(f["e1"], 1, 4)]}],
        "merge_method": "passthrough", "dtype": "float32"},
    "passthrough_scale_filters": lambda f: {
        "slices": [{"sources": [_src(f["e0"], 0, 3)]},
                   {"sources": [_src(f["e0"], 2, 4, scale=[{"filter": "o_proj", "value": 0.0},
                                                           {"filter": "down_proj", "value": 0.0}, {"value": 1.0}])]}],
        "merge_method": "passthrough", "dtype": "float32"},
    "passthrough_scale_levels": lambda f: {
        "slices": [{"sources": [_src(f["e0"], 0, 2)]},
                   {"sources": [_src(f["e1"], 1, 4)], "parameters": {"scale": [0.5, 1.5]}}],
        "merge_method": "passthrough", "parameters": {"scale": 0.9}, "dtype": "float32"},
    # ---- ties / task arithmetic family
    "ties_readme": lambda f: {
        "models": [{"model": f["e0"], "parameters": {"density": [1, 0.7, 0.1], "weight": 1.0}},
                   {"model": f["e1"], "parameters": {"density": 0.5, "weight": [0, 0.3, 0.7, 1]}},
                   {"model": f["e2"], "parameters": {"density": 0.33,
                                                     "weight": [{"filter": "mlp", "value": 0.5}, {"value": 0}]}}],
        "merge_method": "ties", "base_model": f["base"], "parameters": {"normalize": True, "int8_mask": True},
        "dtype": "float32"},
    "ties_slices": lambda f: {
        "slices": [{"sources": [_src(f["base"], 0, 4), _src(f["e0"], 0, 4, density=0.5, weight=0.5),
                                _src(f["e1"], 0, 4, density=0.5, weight=0.3)]}],
        "merge_method": "ties", "base_model": f["base"], "parameters": {"normalize": True}, "dtype": "float32"},
    # every level at once: source > slice > top level, for per-model and global parameters
    "ties_slices_every_level": lambda f: {
        "slices": [{"sources": [_src(f["base"], 0, 4), _src(f["e0"], 0, 4, weight=[{"filter": "mlp", "value": 0.9}]),
                                _src(f["e1"], 0, 4)],
                    "parameters": {"density": [0.3, 0.8], "weight": 0.4, "normalize": False}}],
        "merge_method": "ties", "base_model": f["base"],
        "parameters": {"normalize": True, "weight": 0.1, "density": 0.2}, "dtype": "float32"},
    # sources from other layer ranges than the output's, gradients on a 3-layer slice
    "ties_shifted_ranges": lambda f: {
        "slices": [{"sources": [_src(f["base"], 1, 4), _src(f["e0"], 1, 4, density=[1, 0.7, 0.1], weight=1.0),
                                _src(f["e2"], 0, 3, density=0.5, weight=[0, 0.3, 0.7, 1])]}],
        "merge_method": "ties", "base_model": f["base"], "parameters": {"normalize": True, "int8_mask": True},
        "dtype": "float32"},
    "ties_base_listed_in_models": lambda f: {
        "models": [{"model": f["base"]}, {"model": f["e0"], "parameters": {"density": 0.5, "weight": 0.5}},
                   {"model": f["e1"], "parameters": {"density": 0.5, "weight": 0.3}}],
        "merge_method": "ties", "base_model": f["base"], "parameters": {"normalize": True}, "dtype": "float32"},
    "dare_ties_lazymergekit": lambda f: {  # density 1: both keep every entry (random streams differ)
        "models": [{"model": f["base"]}, {"model": f["e0"], "parameters": {"density": 1.0, "weight": 0.4}},
                   {"model": f["e1"], "parameters": {"density": 1.0, "weight": 0.3}}],
        "merge_method": "dare_ties", "base_model": f["base"], "parameters": {"int8_mask": True}, "dtype": "float32"},
    "task_arithmetic_base_weight_ignored": lambda f: {
        "models": [{"model": f["base"], "parameters": {"weight": 5.0}}, {"model": f["e0"], "parameters": {"weight": 0.5}},
                   {"model": f["e1"], "parameters": {"weight": [0.1, 0.9]}}],
        "merge_method": "task_arithmetic", "base_model": f["base"], "dtype": "float32"},
    "task_arithmetic_top_level_weight": lambda f: {
        "models": [{"model": f["e0"]}, {"model": f["e1"]}], "base_model": f["base"],
        "merge_method": "task_arithmetic", "parameters": {"weight": 0.7, "normalize": True}, "dtype": "float32"},
    "breadcrumbs_ties_slice_params": lambda f: {
        "slices": [{"sources": [_src(f["base"], 0, 2), _src(f["e0"], 2, 4), _src(f["e1"], 0, 2)],
                    "parameters": {"density": 0.6, "gamma": 0.02, "weight": [0.3, 0.9]}}],
        "merge_method": "breadcrumbs_ties", "base_model": f["base"], "dtype": "float32"},
    "della_slice_params": lambda f: {
        "slices": [{"sources": [_src(f["base"], 0, 4), _src(f["e0"], 0, 4), _src(f["e1"], 0, 4, epsilon=0.05)],
                    "parameters": {"density": 1.0, "weight": [1.0, 0.2], "epsilon": 0.1, "lambda": 0.9}}],
        "merge_method": "della", "base_model": f["base"], "dtype": "float32"},
    "sce_slice_topk_gradient": lambda f: {
        "slices": [{"sources": [_src(f["base"], 0, 4), _src(f["e0"], 0, 4), _src(f["e1"], 0, 4)],
                    "parameters": {"select_topk": [0.3, 0.9]}}],
        "merge_method": "sce", "base_model": f["base"], "dtype": "float32"},
    "model_stock_slices": lambda f: {
        "slices": [{"sources": [_src(f["base"], 0, 4), _src(f["e0"], 0, 4), _src(f["e1"], 0, 4), _src(f["e2"], 0, 4)]}],
        "merge_method": "model_stock", "base_model": f["base"], "dtype": "float32"},
    # ---- linear
    "linear_readme": lambda f: {
        "models": [{"model": f["e0"], "parameters": {"weight": 1.0}}, {"model": f["e1"], "parameters": {"weight": 0.3}},
                   {"model": f["e2"], "parameters": {"weight": 0.5}}],
        "merge_method": "linear", "dtype": "float32"},
    "linear_top_level_gradient_fallback": lambda f: {
        "models": [{"model": f["e0"]}, {"model": f["e1"], "parameters": {"weight": 2.0}}],
        "merge_method": "linear", "parameters": {"weight": [0.2, 1.0], "normalize": False}, "dtype": "float32"},
    "linear_base_listed_in_models": lambda f: {
        "models": [{"model": f["base"], "parameters": {"weight": 0.2}}, {"model": f["e0"], "parameters": {"weight": 0.8}}],
        "base_model": f["base"], "merge_method": "linear", "dtype": "float32"},
    # per-model filters match the source's own layer numbers (e0's layer 2 is output layer 0)
    "linear_filters_on_source_layer_names": lambda f: {
        "slices": [{"sources": [_src(f["e0"], 2, 4, weight=[{"filter": "layers.2.", "value": 5.0}]), _src(f["e1"], 0, 2)],
                    "parameters": {"weight": [{"filter": "layers.0.", "value": 3.0}, {"value": 1.0}]}}],
        "merge_method": "linear", "parameters": {"normalize": False}, "dtype": "float32"},
    "linear_two_slices": lambda f: {
        "slices": [{"sources": [_src(f["e0"], 0, 2, weight=0.2), _src(f["e1"], 2, 4, weight=0.8)]},
                   {"sources": [_src(f["e2"], 1, 3), _src(f["e0"], 0, 2)], "parameters": {"weight": [1.0, 0.1]}}],
        "merge_method": "linear", "dtype": "float32"},
    # mergekit merges the tensors after the layers from the last slice's first N sources, N = the first
    # slice's source count (mergelab follows, with a warning)
    "linear_last_slice_has_more_sources": lambda f: {
        "slices": [{"sources": [_src(f["e0"], 0, 2)]}, {"sources": [_src(f["e1"], 2, 4), _src(f["e2"], 2, 4)]}],
        "merge_method": "linear", "parameters": {"weight": 1.0}, "dtype": "float32"},
    "nuslerp_slice_filters": lambda f: {
        "slices": [{"sources": [_src(f["e0"], 0, 4, weight=0.3), _src(f["e1"], 0, 4)],
                    "parameters": {"weight": [{"filter": "mlp", "value": 2.0}, {"value": 0.6}]}}],
        "merge_method": "nuslerp", "dtype": "float32"},
    "linear_base_not_listed_is_an_input": lambda f: {  # mergekit adds the base as one more input
        "models": [{"model": f["e0"], "parameters": {"weight": 0.5}}, {"model": f["e1"], "parameters": {"weight": 0.2}}],
        "merge_method": "linear", "base_model": f["base"], "parameters": {"weight": 0.3}, "dtype": "float32"},
    "linear_negative_weight": lambda f: {
        "models": [{"model": f["e0"], "parameters": {"weight": 1.5}}, {"model": f["e1"], "parameters": {"weight": -0.5}}],
        "merge_method": "linear", "parameters": {"normalize": False}, "dtype": "float32"},
    "slerp_base_not_listed": lambda f: {
        "models": [{"model": f["e0"]}], "merge_method": "slerp", "base_model": f["base"], "parameters": {"t": 0.3},
        "dtype": "float32"},
    "nuslerp_with_base": lambda f: {
        "models": [{"model": f["e0"], "parameters": {"weight": 0.7}}, {"model": f["e1"], "parameters": {"weight": 0.3}}],
        "merge_method": "nuslerp", "base_model": f["base"], "dtype": "float32"},
    "model_stock_base_listed": lambda f: {
        "models": [{"model": f["base"]}, {"model": f["e0"]}, {"model": f["e1"]}, {"model": f["e2"]}],
        "merge_method": "model_stock", "base_model": f["base"], "dtype": "float32"},
    "karcher_integer_as_float": lambda f: {
        "models": [{"model": f["e0"]}, {"model": f["e1"]}], "merge_method": "karcher",
        "parameters": {"max_iter": 5.0, "tol": 1e-5}, "dtype": "float32"},
    "passthrough_models_form_scale": lambda f: {
        "models": [{"model": f["e0"], "parameters": {"scale": 0.5}}], "merge_method": "passthrough", "dtype": "float32"},
    # YAML 1.1 reads 5e-1 (no dot) as a string; mergekit reads it as a number, "false" as a boolean
    "numbers_and_booleans_written_as_strings": lambda f: {
        "models": [{"model": f["e0"], "parameters": {"weight": ["1e-1", "9e-1"], "density": "7e-1"}},
                   {"model": f["e1"], "parameters": {"weight": "5e-1", "density": "1"}}],
        "merge_method": "ties", "base_model": f["base"], "parameters": {"lambda": "8e-1", "normalize": "false"},
        "dtype": "float32"},
    # `parameters:` with nothing under it (YAML null), at the top level and on the base
    "empty_parameters_keys": lambda f: {
        "models": [{"model": f["base"], "parameters": None}, {"model": f["e0"], "parameters": {"weight": 0.5}},
                   {"model": f["e1"], "parameters": {"weight": 0.3}}],
        "merge_method": "task_arithmetic", "base_model": f["base"], "parameters": None, "dtype": "float32"},
    "filter_wildcard_and_slice_base_only": lambda f: {
        "slices": [{"sources": [_src(f["base"], 0, 4), _src(f["e0"], 0, 4)], "base_model": f["base"]}],
        "merge_method": "slerp", "parameters": {"t": [{"filter": "*", "value": [0.2, 0.8]}]}, "dtype": "float32"},
    # ---- dtypes and tokenizers
    # bfloat16 checkpoints with dtype: bfloat16, the usual published case: linear and slerp compute in
    # float32 in both tools (task-vector methods compute in bfloat16 in mergekit: docs/methods.md)
    "bf16_linear": lambda f: {
        "models": [{"model": f["h0"], "parameters": {"weight": 1.0}}, {"model": f["h1"], "parameters": {"weight": 0.5}}],
        "merge_method": "linear", "dtype": "bfloat16"},
    "bf16_slerp_gradient_filters": lambda f: {
        "slices": [{"sources": [_src(f["hbase"], 0, 4), _src(f["h0"], 0, 4)]}],
        "merge_method": "slerp", "base_model": f["hbase"], "parameters": {"t": T_FILTERS}, "dtype": "bfloat16"},
    "bf16_inputs_float32_compute_ties": lambda f: {  # density 1: no trim, so no ties at a threshold
        "models": [{"model": f["h0"], "parameters": {"density": 1.0, "weight": 0.5}},
                   {"model": f["h1"], "parameters": {"density": 1.0, "weight": 0.3}}],
        "merge_method": "ties", "base_model": f["hbase"], "parameters": {"normalize": True}, "dtype": "float32",
        "out_dtype": "bfloat16"},
    "linear_only_out_dtype": lambda f: {
        "models": [{"model": f["e0"], "parameters": {"weight": 1.0}}, {"model": f["e1"], "parameters": {"weight": 0.5}}],
        "merge_method": "linear", "out_dtype": "float16"},
    "linear_out_dtype_bfloat16": lambda f: {
        "models": [{"model": f["e0"], "parameters": {"weight": 1.0}}, {"model": f["e1"], "parameters": {"weight": 0.5}}],
        "merge_method": "linear", "dtype": "float32", "out_dtype": "bfloat16"},
    "linear_no_dtype": lambda f: {
        "models": [{"model": f["e0"], "parameters": {"weight": 1.0}}, {"model": f["e1"], "parameters": {"weight": 0.5}}],
        "merge_method": "linear"},
    "tokenizer_source_base": lambda f: {
        "models": [{"model": f["e0"]}, {"model": f["e1"], "parameters": {"weight": 0.5}}], "base_model": f["base"],
        "merge_method": "task_arithmetic", "parameters": {"weight": 0.6}, "tokenizer_source": "base",
        "dtype": "float32"},
    "tokenizer_source_model": lambda f: {
        "models": [{"model": f["e0"]}, {"model": f["e1"], "parameters": {"weight": 0.5}}], "base_model": f["base"],
        "merge_method": "task_arithmetic", "parameters": {"weight": 0.6}, "tokenizer_source": f["e1"],
        "dtype": "float32"},
    "tokenizer_source_union": lambda f: {
        "models": [{"model": f["e0"]}, {"model": f["e1"], "parameters": {"weight": 0.5}}], "base_model": f["base"],
        "merge_method": "task_arithmetic", "parameters": {"weight": 0.6}, "tokenizer_source": "union",
        "dtype": "float32"},
    "tokenizer_block_source": lambda f: {
        "slices": [{"sources": [_src(f["base"], 0, 4), _src(f["e0"], 0, 4)]}],
        "merge_method": "slerp", "base_model": f["base"], "parameters": {"t": 0.4}, "tokenizer": {"source": "base"},
        "dtype": "float32"},
}

# Warnings mergelab must print for a case (mergekit ignores the same settings without a word).
WARNINGS = {
    "slerp_t_and_weight_per_model": ["parameter 'weight' (set in models[", "is not used by method 'slerp'",
                                     "parameter 't' (set in models[", "is a global parameter of method 'slerp'"],
    "dare_ties_lazymergekit": ["density is 1 for every model"],
    "linear_last_slice_has_more_sources": ["the tensors after the layers (final norm, LM head) are merged from the "
                                           "last slice's first 1 source(s) only"],
}

# Configs mergelab refuses: (config, words its one-line error must contain).
REFUSED: Dict[str, tuple] = {
    "chat_template": (lambda f: {
        "models": [{"model": f["e0"]}, {"model": f["e1"]}], "base_model": f["base"], "merge_method": "task_arithmetic",
        "parameters": {"weight": 0.6}, "chat_template": "chatml", "dtype": "float32"},
        ["chat_template", "built-in template names"]),
    "tokenizer_tokens": (lambda f: {
        "models": [{"model": f["e0"]}, {"model": f["e1"]}], "base_model": f["base"], "merge_method": "task_arithmetic",
        "parameters": {"weight": 0.6}, "tokenizer": {"source": "base", "tokens": {"<new>": {"source": f["e0"]}}},
        "dtype": "float32"}, ["tokenizer.tokens['<new>']", "does not have the token"]),
    "lora_suffix": (lambda f: {
        "models": [{"model": f["e0"] + "+" + f["e1"]}, {"model": f["e1"]}], "merge_method": "linear",
        "dtype": "float32"}, ["is not a PEFT adapter folder", "adapter_config.json"]),
    # mergekit refuses this one too ("Base input is not present")
    "base_not_among_slice_sources": (lambda f: {
        "slices": [{"sources": [_src(f["e0"], 0, 4, weight=0.5), _src(f["e1"], 0, 4, weight=0.5)]}],
        "merge_method": "ties", "base_model": f["base"], "dtype": "float32"}, ["needs its base model among"]),
}


def write_tokenizer(folder: Path, vocab_size: int) -> None:
    """A word-level fast tokenizer (``w3``, ``w4``, ...) with ``vocab_size`` tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Write every config; run them all in one mergekit process."""
    pytest.importorskip("tokenizers")
    root = tmp_path_factory.mktemp("configs")
    paths = make_llama_family(root / "family", experts=3, hidden=32, layers=LAYERS, intermediate=64, vocab=VOCAB,
                              seed=5)
    for p in paths:
        write_tokenizer(p, VOCAB)
    fam = {"base": str(paths[0]), **{f"e{i}": str(p) for i, p in enumerate(paths[1:])}}
    half = make_llama_family(root / "bf16", experts=2, hidden=32, layers=LAYERS, intermediate=64, vocab=VOCAB,
                             seed=6, dtype="bfloat16")
    fam.update({"hbase": str(half[0]), "h0": str(half[1]), "h1": str(half[2])})
    makers = {**CASES, **{case: make for case, (make, _) in REFUSED.items()}}
    configs = write_configs({case: make(fam) for case, make in makers.items()}, root)
    report = run_configs({case: configs[case] for case in CASES}, root, record_errors=True, timeout=900)
    return {"root": root, "configs": configs, "errors": report["errors"], "family": fam}


@pytest.mark.parametrize("case", sorted(CASES))
def test_config_gives_mergekits_tensors(case, runs, capsys):
    assert case not in runs["errors"], f"mergekit failed on {case}: {runs['errors'][case]}"
    out_mk = runs["root"] / "mergekit" / case
    out_ml = runs["root"] / "mergelab" / case
    code, stdout, stderr = run_cli(["merge", runs["configs"][case], "-o", out_ml, "--quiet"], capsys)
    assert code == 0, f"mergelab merge {case} failed ({code}):\n{stdout[-3000:]}\n{stderr[-3000:]}"
    _, ml, _ = assert_bit_equal(out_mk, out_ml, case)
    assert_same_config(out_mk, out_ml)
    # the output is a merge, not one input returned unchanged (which would make the comparison vacuous)
    inputs = [load_tensors(Path(p)) for p in runs["family"].values()]
    assert not any(all(k in t and t[k].shape == ml[k].shape and torch.equal(t[k].to(ml[k].dtype), ml[k]) for k in ml)
                   for t in inputs), f"{case}: the output equals one of the inputs"
    for words in WARNINGS.get(case, []):
        assert words in " ".join(stderr.split()), f"{case}: warning {words!r} not printed:\n{stderr}"
    if case not in WARNINGS:
        assert "warning" not in stderr, f"{case}: unexpected warning:\n{stderr}"
    if "tokenizer" in case:
        assert (out_ml / "tokenizer.json").is_file()


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_refused_config_is_one_clear_error(case, runs, capsys):
    out = runs["root"] / "mergelab" / case
    code, stdout, stderr = run_cli(["merge", runs["configs"][case], "-o", out, "--quiet"], capsys)
    text = " ".join((stdout + stderr).split())
    assert code == 2, f"{case}: exit {code}\n{text}"
    assert "Traceback" not in text and text.startswith("error:"), text
    for words in REFUSED[case][1]:
        assert words in text, f"{case}: {words!r} not in {text!r}"
    assert not out.exists() and not Path(str(out) + ".partial").exists()
