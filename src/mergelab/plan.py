"""The merge plan: for each output tensor, its inputs, method, resolved parameters and layer.

:func:`build_models_plan` validates everything that can be known from headers before a byte of data is
read: parameters, that every model holds every tensor, shapes (vocabulary included, unless the recipe
names a ``vocab_policy``), dtypes. Non-float tensors are copied from the base, never merged.
``--dry-run`` stops here and prints :meth:`MergePlan.summary`.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from mergelab.errors import CheckpointError, RecipeError
from mergelab.methods.registry import BaseUse, MergeMethod, PostStep, get_method, get_post_step
from mergelab.recipe import (Recipe, normalize_dtype, resolve_parameters, unused_parameter_messages,
                             validate_parameters)

_LAYER = re.compile(r"\.(\d+)\.")
_EMBEDDING = re.compile(r"(embed_tokens|lm_head|wte|word_embeddings|shared|embed_out|output)\.weight$")
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
# config.json fields that change what the weights mean while every tensor's shape can stay the same:
# the architecture, the vocabulary the embedding rows stand for, tied embeddings, the activation, the
# norms' epsilon, how the attention projections split into heads, and the rotary positions. Not here:
# max_position_embeddings (for rotary models a context limit the weights do not depend on; a learned
# position table of another length has another shape, which the planner rejects), dtype, token ids.
# Checked at the top level and inside text_config (multimodal configs), where both configs set them.
MEANING_FIELDS = (
    "architectures", "model_type", "vocab_size", "tie_word_embeddings",
    "hidden_act", "hidden_activation", "activation_function",
    "rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", "norm_eps",
    "num_attention_heads", "num_key_value_heads", "head_dim",
    "rope_theta", "rope_scaling", "rope_parameters", "partial_rotary_factor", "position_embedding_type",
)


def split_threshold(chunk_elements: int, whole_elements: Optional[int], method: Optional[MergeMethod]) -> int:
    """Elements above which a tensor of a chunkable method is split into row chunks of ``chunk_elements``.

    ``whole_elements`` is the engine's size up to which a tensor is computed whole (``None``: split
    everything above one chunk); a method's own ``whole_elements`` can lower it. Never below one chunk.
    """
    whole = chunk_elements if whole_elements is None else whole_elements
    if whole_elements is not None and method is not None and method.whole_elements is not None:
        whole = min(whole, method.whole_elements)
    return max(whole, chunk_elements)


def chunking(chunk_elements: int, whole_elements: Optional[int], method: Optional[MergeMethod]) -> Tuple[int, int]:
    """The engine's chunk size and split threshold for ``method``: ``(chunk, threshold)``.

    By default a tensor above the threshold (:func:`split_threshold`) is split into chunks of
    ``chunk_elements``. A method with ``stream_elements`` (element-wise, no per-tensor statistics:
    chunking cannot change its result) streams every matrix in chunks of that size instead, which
    keep its passes over the inputs in the CPU caches. ``whole_elements=None`` (a caller asking for
    exactly ``chunk_elements``) overrides both.
    """
    if whole_elements is not None and method is not None and method.stream_elements:
        return method.stream_elements, method.stream_elements
    return chunk_elements, split_threshold(chunk_elements, whole_elements, method)


def is_split(job: "TensorJob", chunkable: bool, threshold: int) -> bool:
    """Whether ``job`` is computed in row chunks (see :func:`split_threshold`)."""
    return chunkable and len(job.shape) >= 2 and job.numel > threshold


def layer_index(name: str) -> Optional[int]:
    """Transformer block index of a tensor (the first ``.<int>.`` in its name), or None."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class Source:
    """One input tensor: which checkpoint, which name, and an optional crop (vocab policy)."""

    checkpoint: int
    name: str
    crop: Optional[tuple] = None


@dataclass
class TensorJob:
    """One output tensor. ``action`` is ``merge`` (run the method) or ``copy`` (from ``base``)."""

    name: str
    shape: tuple
    out_dtype: torch.dtype
    action: str
    base: Optional[Source]
    models: List[Source]
    params: dict = field(default_factory=dict)
    model_params: List[dict] = field(default_factory=list)
    post: List[tuple] = field(default_factory=list)
    layer: Optional[int] = None
    num_layers: Optional[int] = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.out_dtype.itemsize


@dataclass
class MergePlan:
    """Everything the executor needs; built and validated before any data is read."""

    recipe: Recipe
    method: MergeMethod
    checkpoints: List[Any]
    base_index: Optional[int]
    model_indices: List[int]
    jobs: List[TensorJob]
    num_layers: Optional[int]
    donor_index: int
    global_settings: Dict[str, Any]
    model_settings: List[Dict[str, Any]]
    notes: List[str] = field(default_factory=list)
    # Lines the user must see before the merge runs (ignored parameters, inputs' configs that differ).
    warnings: List[str] = field(default_factory=list)
    # {model, field, value, reference, reference_value} per config field that differs from the donor's.
    config_differences: List[dict] = field(default_factory=list)
    # The output vocabulary when the recipe has tokenizer_source (mergelab.vocab.OutputVocab).
    vocab: Any = None

    @property
    def merged_jobs(self) -> List[TensorJob]:
        return [j for j in self.jobs if j.action == "merge"]

    @property
    def output_bytes(self) -> int:
        return sum(j.nbytes for j in self.jobs)

    def largest_job(self) -> Optional[TensorJob]:
        return max(self.jobs, key=lambda j: j.numel, default=None)

    def summary(self, chunk_elements: int, shard_bytes: int, whole_elements: Optional[int] = None) -> dict:
        """Tensors, bytes, and an estimate of the executor's peak memory above the interpreter's.

        Tensors are taken whole or in chunks by the executor's rule (:func:`chunking`).
        """
        largest = self.largest_job()
        n_in = len(self.model_indices) + (1 if self.base_index is not None else 0)
        work = 0
        if largest is not None:
            chunk_elements, threshold = chunking(chunk_elements, whole_elements, self.method)

            def unit(job: TensorJob) -> int:
                return min(job.numel, chunk_elements) if is_split(job, self.method.chunkable, threshold) else job.numel

            elems = max(unit(j) for j in self.merged_jobs) if self.merged_jobs else 0
            # Inputs of the current and the prefetched chunk, float32, plus ~3 stacked intermediates.
            work = elems * 4 * (2 * n_in + 3 * max(1, len(self.model_indices)))
        return {
            "method": self.method.name,
            "tensors": len(self.jobs),
            "merged": len(self.merged_jobs),
            "copied": len(self.jobs) - len(self.merged_jobs),
            "output_bytes": self.output_bytes,
            "input_bytes": sum(
                self.checkpoints[s.checkpoint].info(s.name).nbytes
                for j in self.jobs for s in ([j.base] if j.base else []) + j.models
            ),
            "largest_tensor": None if largest is None else {"name": largest.name, "shape": list(largest.shape)},
            "estimated_peak_working_bytes": work,
            "shard_bytes": shard_bytes,
        }


def _out_dtype(recipe: Recipe, stored: torch.dtype) -> torch.dtype:
    name = normalize_dtype(recipe.out_dtype) or normalize_dtype(recipe.dtype)
    return getattr(torch, name) if name else stored


def _layer_count(checkpoints: Sequence[Any], index: int, names: Sequence[str]) -> Optional[int]:
    cfg = checkpoints[index].config() if hasattr(checkpoints[index], "config") else None
    if cfg:
        for key in LAYER_COUNT_KEYS:
            if isinstance(cfg.get(key), int):
                return cfg[key]
        text = cfg.get("text_config") or {}
        for key in LAYER_COUNT_KEYS:
            if isinstance(text.get(key), int):
                return text[key]
    idx = [i for i in (layer_index(n) for n in names) if i is not None]
    return max(idx) + 1 if idx else None


def check_inputs(plan: MergePlan, strict: bool = False) -> None:
    """Checks of a built plan that do not stop a merge unless ``strict``.

    Parameters the method does not use but another method defines, and inputs' ``config.json``
    fields that differ from the donor's where they change what the weights mean
    (:data:`MEANING_FIELDS`), become ``plan.warnings``; with ``strict`` they are errors.
    """
    recipe = plan.recipe
    plan.warnings = unused_parameter_messages(recipe, get_method(recipe.merge_method), strict) + plan.warnings
    check_configs(plan, strict)


def _config_path(ckpt: Any) -> Optional[str]:
    path = getattr(ckpt, "path", None)
    return None if path is None else f"{path}/config.json"


def check_configs(plan: MergePlan, strict: bool = False) -> None:
    """Read every input's ``config.json`` and compare it with the donor's (whose config the output gets).

    A malformed config is an error naming the file (raised when it is read), and so is a missing one
    when another input has one; a merge of bare weight files (no input has a config) is compared by
    tensors only. A field of :data:`MEANING_FIELDS` set in both configs with other values is one
    warning line per model listing field and both values (a :class:`CheckpointError` with ``strict``),
    recorded in ``plan.config_differences``. ``vocab_size`` is not compared under ``vocab_policy:
    common_submatrix``, which merges models of different vocabularies on purpose.
    """
    ckpts = plan.checkpoints
    configs = [c.config() if hasattr(c, "config") else None for c in ckpts]
    have = [i for i, cfg in enumerate(configs) if cfg is not None]
    if not have:
        if any(_config_path(c) for c in ckpts):
            plan.notes.append("no input has a config.json: the inputs were checked by their tensors only, and the "
                              "output has no config.json either")
        return
    missing = [i for i, cfg in enumerate(configs) if cfg is None]
    if missing:
        i = missing[0]
        where = _config_path(ckpts[i])
        raise CheckpointError(
            f"model '{ckpts[i].label}' has no config.json" + (f" ('{where}' does not exist)" if where else "")
            + f" while '{ckpts[have[0]].label}' has one; every input must be a complete model folder, as mergelab "
              f"checks that the inputs' configs agree" + (f" ({len(missing) - 1} more input(s) lack one)"
                                                          if len(missing) > 1 else "")
        )
    ref = plan.donor_index
    ref_cfg, ref_label = configs[ref], ckpts[ref].label
    skip = {"vocab_size"} if plan.recipe.vocab_policy == "common_submatrix" else set()
    lines = []
    for i, cfg in enumerate(configs):
        if i == ref:
            continue
        diffs = []
        scopes = [("", cfg, ref_cfg)]
        if isinstance(cfg.get("text_config"), dict) and isinstance(ref_cfg.get("text_config"), dict):
            scopes.append(("text_config.", cfg["text_config"], ref_cfg["text_config"]))
        for prefix, mine, theirs in scopes:
            for key in MEANING_FIELDS:
                if key in skip or key not in mine or key not in theirs or mine[key] == theirs[key]:
                    continue
                diffs.append({"model": ckpts[i].label, "field": prefix + key, "value": mine[key],
                              "reference": ref_label, "reference_value": theirs[key]})
        if diffs:
            plan.config_differences.extend(diffs)
            listing = "; ".join(f"{d['field']}: {_json(d['value'])} (in '{ref_label}': {_json(d['reference_value'])})"
                                for d in diffs)
            lines.append(f"config.json of model '{ckpts[i].label}' differs from that of '{ref_label}' (which the "
                         f"output's config.json is copied from) in fields that change what the weights mean: {listing}")
    if lines and strict:
        raise CheckpointError("--strict: " + "\n".join(lines) + "\nmerge models of one architecture and configuration, "
                              "or run without --strict to merge them anyway with a warning")
    plan.warnings.extend(lines)


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def build_models_plan(recipe: Recipe, checkpoints: Dict[str, Any]) -> MergePlan:
    """Plan a ``models:`` recipe over opened checkpoints (``ref -> Checkpoint``).

    ``slices:`` recipes are planned by :mod:`mergelab.slices`, which builds on this module's types;
    :func:`mergelab.merge.build_plan` chooses between the two and runs :func:`check_inputs`.
    """
    if recipe.slices:
        raise RecipeError("a slices: recipe is planned by mergelab.merge.build_plan (mergelab.slices)")
    method = get_method(recipe.merge_method)
    refs = list(checkpoints)
    ckpts = [checkpoints[r] for r in refs]
    index_of = {r: i for i, r in enumerate(refs)}

    entries = list(recipe.models or [])
    base_ref = recipe.base_model
    if method.base == BaseUse.REQUIRED and not base_ref:
        raise RecipeError(f"method '{method.name}' needs base_model: set it to the model the others were fine-tuned from")
    base_index: Optional[int] = None
    if base_ref and method.base in (BaseUse.REQUIRED, BaseUse.OPTIONAL):
        base_index = index_of[base_ref]
        entries = [e for e in entries if e.model != base_ref]
    elif base_ref and method.base == BaseUse.INPUT and all(e.model != base_ref for e in entries):
        from mergelab.recipe import ModelEntry

        entries.append(ModelEntry(model=base_ref))
    model_indices = [index_of[e.model] for e in entries]
    n = len(model_indices)
    if n < method.min_models or (method.max_models is not None and n > method.max_models):
        expect = f"{method.min_models}" + (f" to {method.max_models}" if method.max_models != method.min_models else "")
        if method.max_models is None:
            expect = f"at least {method.min_models}"
        raise RecipeError(
            f"method '{method.name}' takes {expect} model(s) besides the base, got {n}"
        )
    labels = [e.model for e in entries]
    model_settings = [dict(e.parameters) for e in entries]
    validate_parameters(method, dict(recipe.parameters), list(zip(labels, model_settings)))
    post_steps: List[tuple] = []
    for entry in recipe.post:
        step = get_post_step(entry.name)
        if base_index is None:
            raise RecipeError(f"post-step '{step.name}' needs a base model (it rescales the merged task vector)")
        for key, setting in entry.parameters.items():
            p = step.param(key)
            if p is None:
                raise RecipeError(
                    f"post[{step.name}].parameters: unknown parameter '{key}'; allowed: "
                    f"{', '.join(p.name for p in step.params) or 'none'}"
                )
            from mergelab.recipe import check_setting

            check_setting(p, setting, f"post[{step.name}].parameters")
        for p in step.params:
            if p.required and p.name not in entry.parameters:
                raise RecipeError(f"post[{step.name}]: required parameter '{p.name}' is missing")
        post_steps.append((step, dict(entry.parameters)))

    reference = base_index if base_index is not None else model_indices[0]
    ref_ckpt = ckpts[reference]
    names = list(ref_ckpt.tensors)
    num_layers = _layer_count(ckpts, reference, names)
    donor_ref = recipe.tokenizer_source if recipe.tokenizer_source not in (None, "base", "union") else None
    if donor_ref is not None and donor_ref not in index_of:
        raise RecipeError(f"tokenizer_source: '{donor_ref}' is not one of the recipe's models")
    donor = index_of[donor_ref] if donor_ref else reference

    notes: List[str] = []
    inputs = ([base_index] if base_index is not None else []) + model_indices
    for i in inputs:
        extra = sorted(set(ckpts[i].tensors) - set(names))
        if extra:
            notes.append(
                f"model '{refs[i]}' has {len(extra)} tensor(s) the reference model lacks, not in the output "
                f"(e.g. '{extra[0]}')"
            )

    jobs: List[TensorJob] = []
    for name in names:
        info = ref_ckpt.info(name)
        if not info.is_float:
            jobs.append(TensorJob(name, info.shape, info.dtype, "copy", Source(reference, name), []))
            continue
        shapes = {}
        for i in inputs:
            if name not in ckpts[i].tensors:
                raise CheckpointError(
                    f"tensor '{name}' is missing from model '{refs[i]}' (present in '{refs[reference]}')"
                )
            other = ckpts[i].info(name)
            if not other.is_float:
                raise CheckpointError(
                    f"tensor '{name}' is {other.dtype} in model '{refs[i]}' but floating point in '{refs[reference]}'"
                )
            shapes[i] = other.shape
        shape = info.shape
        crop = None
        if len(set(shapes.values())) > 1:
            shape, crop = _shape_policy(recipe, name, shapes, refs, notes)
        layer = layer_index(name)
        t = 0.0 if layer is None or not num_layers else (layer / (num_layers - 1) if num_layers > 1 else 1.0)
        params, model_params = resolve_parameters(method, dict(recipe.parameters), model_settings, name, t)
        post = [(step, {p.name: _resolve_post(p, s, name, t) for p in step.params}) for step, s in post_steps]
        jobs.append(TensorJob(
            name=name, shape=tuple(shape), out_dtype=_out_dtype(recipe, info.dtype), action="merge",
            base=Source(base_index, name, crop) if base_index is not None else None,
            models=[Source(i, name, crop) for i in model_indices],
            params=params, model_params=model_params, post=post, layer=layer, num_layers=num_layers,
        ))
    return MergePlan(
        recipe=recipe, method=method, checkpoints=ckpts, base_index=base_index, model_indices=model_indices,
        jobs=jobs, num_layers=num_layers, donor_index=donor, global_settings=dict(recipe.parameters),
        model_settings=model_settings, notes=notes,
    )


def _resolve_post(p, settings: dict, name: str, t: float):
    from mergelab.recipe import resolve_setting

    if p.name in settings:
        v = resolve_setting(settings[p.name], name, t, p)
        if v is not None:
            return p.check(v, f"post parameter '{p.name}' for tensor '{name}'")
    return p.default


def _shape_policy(recipe: Recipe, name: str, shapes: dict, refs: list, notes: list) -> tuple:
    """Shape and crop for a tensor whose shape differs between models, per ``vocab_policy``."""
    listing = ", ".join(f"'{refs[i]}': {list(s)}" for i, s in shapes.items())
    dims = {len(s) for s in shapes.values()}
    if recipe.vocab_policy == "common_submatrix" and _EMBEDDING.search(name) and dims == {2}:
        common = tuple(min(s[d] for s in shapes.values()) for d in range(2))
        notes.append(f"vocab_policy common_submatrix: '{name}' cropped to {list(common)} ({listing})")
        return common, common
    hint = (" Set vocab_policy: common_submatrix in the recipe to merge the common sub-matrix of embeddings."
            if _EMBEDDING.search(name) else "")
    raise CheckpointError(f"tensor '{name}' has different shapes across models: {listing}.{hint}")
