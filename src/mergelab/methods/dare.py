"""DARE: drop task-vector entries at random and rescale the rest, then merge.

Yu et al., "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free
Lunch", ICML 2024 (arXiv:2311.03099; reference code yule-BUAA/MergeLM ``mask_weights_utils.py``).
Each entry of each task vector is kept with probability ``density`` (= 1 - drop rate p).

``semantics: mergekit`` (default) is mergekit 0.1.5: the kept entries are rescaled so that each task
vector keeps its L1 norm over the whole tensor (when ``rescale``), ``dare_ties`` elects signs with
ties going to ``+1`` and divides by the agreeing weights when ``normalize``. ``semantics: paper``
rescales each kept entry by ``1/density`` (unbiased: E[tau~] = tau), and ``dare_ties`` then follows the
TIES reference (zero sums take the model's majority sign, the mean divides by the agreeing count).

Randomness: each (seed, tensor, row chunk, model) has its own stream, drawn on the CPU, so the masks
do not depend on the order tensors are processed in, on threads, or on the device.
"""

from __future__ import annotations

from typing import Optional

import torch

from mergelab.methods.common import DENSITY, INT8_MASK, LAMBDA, SEMANTICS, WEIGHT, normalize, rescale_flag
from mergelab.methods.registry import BaseUse, MergeMethod, ModelScope, TensorInputs, TensorSource, register
from mergelab.methods.ties import TrimStats, deltas_of, global_tie_sign, l1_rescale_factors
from mergelab.methods.transforms import TaskVectors, disjoint_merge, drop, elect_sign, linear_combine, weigh


def keep_masks(x: TensorInputs) -> torch.Tensor:
    """Bernoulli(density) keep masks ``[n, *chunk]``; a density of 1 or more keeps everything."""
    masks = []
    for i, d in enumerate(x.model_param("density")):
        if d >= 1:
            masks.append(torch.ones_like(x.models[i]))
        else:
            masks.append((x.rand(i, "dare") < d).to(x.models[i].dtype))
    return torch.stack(masks)


def dropped(x: TensorInputs, l1_scale: Optional[list] = None) -> TaskVectors:
    """The chunk's task vectors after DARE's drop and rescale (per ``semantics``)."""
    tv = TaskVectors.from_models(x.base, x.models, x.model_param("weight"))
    masks = keep_masks(x)
    if x.params["semantics"] == "paper":
        dens = x.model_param("density")
        # A density of 0 drops everything; nothing is left to rescale.
        return drop(masks, "inverse", keep_prob=[min(1.0, d) if d > 0 else 1.0 for d in dens])(tv)
    if l1_scale is not None:
        return drop(masks, "l1", l1_scale=l1_scale)(tv)
    return drop(masks, None)(tv)


def _prepare_tensor(src: TensorSource) -> Optional[TrimStats]:
    if src.params["semantics"] == "paper" or not src.params["rescale"]:
        return None
    if all(p["density"] >= 1 for p in src.model_params):
        return None
    return TrimStats([], l1_rescale_factors(src, lambda c: dropped(c).deltas))


def _scale(x: TensorInputs) -> Optional[list]:
    return None if x.tensor_stats is None else x.tensor_stats.l1_scale


def _finish(x: TensorInputs, merged: torch.Tensor) -> torch.Tensor:
    if x.params["lambda"] != 1:
        merged = merged * x.params["lambda"]
    return x.base + merged


def dare_linear_merge(x: TensorInputs) -> torch.Tensor:
    tv = weigh()(dropped(x, _scale(x)))
    return _finish(x, linear_combine(tv, normalize=x.params["normalize"]))


def dare_ties_merge(x: TensorInputs) -> torch.Tensor:
    paper = x.params["semantics"] == "paper"
    tie = x.model_stats.tie_sign if paper else 1.0
    tv = elect_sign(tie)(weigh()(dropped(x, _scale(x))))
    return _finish(x, disjoint_merge(tv, normalize=x.params["normalize"], divisor="count" if paper else "weight"))


_REFERENCE = ("Yu et al. 2024, DARE (arXiv:2311.03099), yule-BUAA/MergeLM; mergekit 0.1.5 `{}`.")

register(MergeMethod(
    name="dare_linear",
    family="dare",
    summary="Randomly drop task-vector entries, rescale the kept ones, add the weighted sum to the base.",
    reference=_REFERENCE.format("dare_linear"),
    merge=dare_linear_merge,
    base=BaseUse.REQUIRED,
    params=(LAMBDA, normalize(False), rescale_flag(True), INT8_MASK, SEMANTICS),
    model_params=(WEIGHT, DENSITY),
    chunkable=True,
    prepare_tensor=_prepare_tensor,
    notes="mergekit rescales by L1-norm matching over the tensor; semantics: paper rescales by 1/density.",
))


def _prepare_model_ties(scope: ModelScope) -> Optional[TrimStats]:
    if scope.params["semantics"] != "paper":
        return None
    return TrimStats([], None, global_tie_sign(scope, lambda c: dropped(c).deltas))


register(MergeMethod(
    name="dare_ties",
    family="dare",
    summary="DARE's random drop and rescale, then TIES' sign election and disjoint merge.",
    reference=_REFERENCE.format("dare_ties"),
    merge=dare_ties_merge,
    base=BaseUse.REQUIRED,
    params=(LAMBDA, normalize(False), rescale_flag(True), INT8_MASK, SEMANTICS),
    model_params=(WEIGHT, DENSITY),
    chunkable=True,
    prepare_tensor=_prepare_tensor,
    prepare_model=_prepare_model_ties,
    notes="mergekit rescales by L1-norm matching and sums the agreeing entries (normalize: false); "
          "semantics: paper rescales by 1/density and resolves zero sums by the model's majority sign.",
))
