"""Planning ``slices:`` recipes: layer stacking ("frankenmerges") and merges over layer ranges.

Each output slice takes the same number of layers from each of its sources (``layer_range: [a, b)``);
the output's layers are the slices' layers in order, renumbered from 0, and the output config's layer
count is updated. Tensors outside the layers are taken from the first slice's sources when they come
before the layers (embeddings) and from the last slice's sources otherwise (final norm, LM head), as
mergekit's architecture definitions do. Within a slice, parameter gradients restart:
``t = j / (L - 1)`` for the slice's j-th layer (``t = 0`` outside the layers). Parameters resolve
as in mergekit 0.1.5 (see :mod:`mergelab.recipe`): a per-model parameter from the source's
``parameters``, then the slice's, then the top-level ones; a global parameter (slerp's ``t``, ties'
``normalize``) from the slice's, then the top-level ones; a level whose filters match nothing passes
on to the next. With a method that uses a base model, the slice's ``base_model`` (or the recipe's)
must be one of the slice's sources. A model may appear once per slice: mergekit keys a slice's
inputs by model, so a second range of the same model would silently replace the first there.
"""

from __future__ import annotations

import re
from typing import Any, Dict, List

from mergelab.errors import CheckpointError, RecipeError
from mergelab.methods.registry import BaseUse, get_method
from mergelab.plan import MergePlan, Source, TensorJob, _out_dtype, layer_index
from mergelab.recipe import Recipe, resolve_parameters, validate_parameters

_PRE = re.compile(r"(embed|wte|wpe|word_embeddings|position_embeddings|token_type_embeddings)")


def _with_layer(name: str, index: int) -> str:
    return re.sub(r"\.(\d+)\.", f".{index}.", name, count=1)


def build_slice_plan(recipe: Recipe, checkpoints: Dict[str, Any]) -> MergePlan:
    method = get_method(recipe.merge_method)
    if recipe.post:
        raise RecipeError("post: steps are not supported with slices: yet")
    refs = list(checkpoints)
    ckpts = [checkpoints[r] for r in refs]
    index_of = {r: i for i, r in enumerate(refs)}
    uses_base = method.base in (BaseUse.REQUIRED, BaseUse.OPTIONAL)

    jobs: List[TensorJob] = []
    out_layer = 0
    plans = []
    validate_parameters(method, dict(recipe.parameters), [], where="parameters", required=False)
    for si, sl in enumerate(recipe.slices):
        lengths = {s.layer_range[1] - s.layer_range[0] for s in sl.sources}
        if len(lengths) != 1 or min(lengths) <= 0:
            raise RecipeError(f"slices[{si}]: every source must span the same, positive number of layers "
                              f"(layer_range [start, end)); got {[list(s.layer_range) for s in sl.sources]}")
        length = lengths.pop()
        base_ref = sl.base_model or recipe.base_model
        base_src = None
        others = list(sl.sources)
        if uses_base:
            matches = [s for s in sl.sources if s.model == base_ref]
            if method.base == BaseUse.REQUIRED and not matches:
                raise RecipeError(f"slices[{si}]: method '{method.name}' needs its base model among the slice's "
                                  f"sources (base_model: {base_ref})")
            if matches:
                base_src = matches[0]
                others = [s for s in sl.sources if s is not base_src]
        n = len(others)
        if n < method.min_models or (method.max_models is not None and n > method.max_models):
            raise RecipeError(f"slices[{si}]: method '{method.name}' takes {method.min_models}"
                              f"{'+' if method.max_models is None else '-' + str(method.max_models)} "
                              f"source(s) besides the base, got {n}")
        for s in sl.sources:
            ck = ckpts[index_of[s.model]]
            present = {layer_index(k) for k in ck.tensors}
            missing = [i for i in range(*s.layer_range) if i not in present]
            if missing:
                raise CheckpointError(f"slices[{si}]: model '{s.model}' has no layer {missing[0]} "
                                      f"(layer_range {list(s.layer_range)})")
        settings = [dict(s.parameters) for s in others]
        global_settings = [dict(sl.parameters), dict(recipe.parameters)]
        validate_parameters(method, global_settings[0], [(f"slices[{si}].sources[{s.model}]", st)
                                                         for s, st in zip(others, settings)],
                            where=f"slices[{si}].parameters", fallbacks=global_settings[1:])
        plans.append((si, sl, base_src, others, settings, global_settings, length, out_layer))
        out_layer += length
    total_layers = out_layer

    def add_job(out_name, in_srcs, base_src, name_for, settings, global_settings, t, layer, seen):
        ref_src = base_src or in_srcs[0]
        ref_ck = ckpts[index_of[ref_src.model]]
        ref_name = name_for(ref_src)
        info = ref_ck.info(ref_name)
        if out_name in seen:
            return
        seen.add(out_name)
        for s in ([base_src] if base_src else []) + in_srcs:
            other = ckpts[index_of[s.model]].info(name_for(s))
            if other.shape != info.shape:
                raise CheckpointError(f"tensor '{name_for(s)}' of '{s.model}' has shape {list(other.shape)}, "
                                      f"expected {list(info.shape)} like '{ref_src.model}'")
        if not info.is_float:
            jobs.append(TensorJob(out_name, info.shape, info.dtype, "copy",
                                  Source(index_of[ref_src.model], ref_name), []))
            return
        params, model_params = resolve_parameters(method, global_settings, settings, out_name, t,
                                                  [name_for(s) for s in in_srcs])
        jobs.append(TensorJob(
            name=out_name, shape=info.shape, out_dtype=_out_dtype(recipe, info.dtype), action="merge",
            base=Source(index_of[base_src.model], name_for(base_src)) if base_src else None,
            models=[Source(index_of[s.model], name_for(s)) for s in in_srcs],
            params=params, model_params=model_params, layer=layer, num_layers=total_layers,
        ))

    seen: set = set()
    first, last = plans[0], plans[-1]
    first_ref = first[2] or first[3][0]
    for name in ckpts[index_of[first_ref.model]].tensors:
        if layer_index(name) is None and _PRE.search(name):
            add_job(name, first[3], first[2], lambda s: name, first[4], first[5], 0.0, None, seen)
    for si, sl, base_src, others, settings, global_settings, length, offset in plans:
        ref = base_src or others[0]
        templates = [k for k in ckpts[index_of[ref.model]].tensors if layer_index(k) == ref.layer_range[0]]
        for j in range(length):
            t = j / (length - 1) if length > 1 else 1.0
            for template in templates:
                out_name = _with_layer(template, offset + j)
                add_job(out_name, others, base_src,
                        lambda s, template=template, j=j: _with_layer(template, s.layer_range[0] + j),
                        settings, global_settings, t, offset + j, seen)
    # mergekit pairs the last slice's sources with as many input tensors as the *first* slice has
    # sources, so the tensors after the layers come from only the first that many of them.
    last_sl, last_base, last_others, last_settings = last[1], last[2], last[3], last[4]
    kept = last_sl.sources[:len(first[1].sources)]
    warnings: List[str] = []
    if len(kept) < len(last_sl.sources):
        dropped = [s.model for s in last_sl.sources[len(kept):]]
        if last_base is not None and all(s is not last_base for s in kept):
            raise RecipeError(f"slices[{last[0]}]: the tensors after the layers (final norm, LM head) are merged from "
                              f"the last slice's first {len(kept)} source(s), as many as the first slice has (mergekit's "
                              f"rule), which leaves out its base model '{last_base.model}'; list the base first")
        pairs = [(s, st) for s, st in zip(last_others, last_settings) if any(s is k for k in kept)]
        if len(pairs) < max(1, method.min_models):
            raise RecipeError(f"slices[{last[0]}]: the tensors after the layers are merged from the last slice's first "
                              f"{len(kept)} source(s) (mergekit's rule), too few for method '{method.name}'")
        last_others, last_settings = [s for s, _ in pairs], [st for _, st in pairs]
        warnings.append(f"slices: the last slice has {len(last_sl.sources)} sources and the first {len(kept)}; as in "
                        f"mergekit, the tensors after the layers (final norm, LM head) are merged from the last slice's "
                        f"first {len(kept)} source(s) only, without {', '.join(repr(d) for d in dropped)}")
    last_ref = last_base or last_others[0]
    for name in ckpts[index_of[last_ref.model]].tensors:
        if layer_index(name) is None and not _PRE.search(name):
            add_job(name, last_others, last_base, lambda s: name, last_settings, last[5], 0.0, None, seen)

    donor_ref = recipe.tokenizer_source if recipe.tokenizer_source not in (None, "base", "union") else None
    if donor_ref is not None and donor_ref not in index_of:
        raise RecipeError(f"tokenizer_source: '{donor_ref}' is not one of the recipe's models")
    donor = index_of[donor_ref] if donor_ref else index_of[first_ref.model]
    base_index = index_of[first[2].model] if first[2] else None
    return MergePlan(
        recipe=recipe, method=method, checkpoints=ckpts, base_index=base_index,
        model_indices=[index_of[s.model] for s in first[3]], jobs=jobs, num_layers=total_layers,
        donor_index=donor, global_settings=dict(recipe.parameters),
        model_settings=[{**first[1].parameters, **st} for st in first[4]],  # per-model view (auxiliary inputs)
        notes=[f"slices: {len(plans)} slice(s), {total_layers} output layers"], warnings=warnings,
    )
