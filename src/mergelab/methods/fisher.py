"""Fisher merging: the elementwise Fisher-weighted average of the models' parameters.

Matena & Raffel, "Merging Models with Fisher-Weighted Averaging", NeurIPS 2022 (arXiv:2111.09832).
Reference code: mmatena/model_merging (``model_merging/merging.py``: ``_merge_with_coeffs``,
``generate_merged_for_coeffs_set``); FusionBench's variant read for the differences
(``fusion_bench/method/fisher_merging/fisher_merging.py``).

Each model ``i`` comes with its diagonal Fisher ``F_i`` (``mergelab calibrate --stats fisher``, read by
the engine from the per-model parameter ``statistics``). Elementwise::

    theta* = sum_i lambda_i' F~_i theta_i / sum_i lambda_i' F~_i

with ``lambda_i' = weight_i / ||F_i||`` when ``normalize`` (the reference's ``normalize_fishers``: the
L2 norm of model ``i``'s Fisher over *every merged tensor*, a whole-model statistic computed in a
streaming pass), else ``weight_i``. This is the maximiser of the product of diagonal Gaussian
posteriors with precisions ``lambda_i' F~_i``. The floor (``eps_mode``):

* ``floor_target`` (reference default, ``favor_target_model=True``): ``F~_0 = max(F_0, epsilon)`` for
  the first model only (the "target"); other models keep their raw Fisher, so where every other
  model's Fisher is zero the result is model 0's value.
* ``floor_all`` (reference with ``favor_target_model=False``): ``max(F_i, epsilon)`` for every model.
* ``add_all`` (FusionBench/MergeLM ``minimal_fisher_weight``): ``F_i + epsilon`` for every model.

FusionBench normalises the coefficients as ``(1/(||F_i|| + eps)) / sum_j (1/(||F_j|| + eps))``; the
merge is invariant to a common scale of the coefficients, so this equals ``normalize`` up to that eps.
"""

from __future__ import annotations

import math
from typing import List

import torch

from mergelab.errors import RecipeError
from mergelab.methods.common import STATISTICS, STATISTICS_PARAM
from mergelab.methods.registry import BaseUse, MergeMethod, ModelScope, Param, TensorInputs, register

EPS_MODES = ("floor_target", "floor_all", "add_all")


def fisher_weighted_average(models: List[torch.Tensor], fishers: List[torch.Tensor], coefficients: List[float],
                            eps_mode: str = "floor_target", epsilon: float = 1e-6) -> torch.Tensor:
    """``sum_i c_i F~_i theta_i / sum_i c_i F~_i`` elementwise (float64 accumulation, float32 result)."""
    if eps_mode not in EPS_MODES:
        raise RecipeError(f"fisher: eps_mode must be one of {', '.join(EPS_MODES)}, got '{eps_mode}'")
    num = torch.zeros(models[0].shape, dtype=torch.float64, device=models[0].device)
    den = torch.zeros_like(num)
    for i, (t, f, c) in enumerate(zip(models, fishers, coefficients)):
        f = f.to(torch.float64)
        if eps_mode == "add_all":
            f = f + epsilon
        elif eps_mode == "floor_all" or i == 0:
            f = f.clamp_min(epsilon)
        w = f * c
        den.add_(w)
        num.addcmul_(w, t.to(torch.float64))
    return (num / den).to(torch.float32)


def _fishers(x: TensorInputs) -> list:
    f = x.aux.get(STATISTICS)
    if f is None or len(f) != len(x.models):
        raise RecipeError(f"fisher: tensor '{x.name}' has no Fisher for every model; give each model the per-model "
                          f"parameter '{STATISTICS}' (a fisher.safetensors from `mergelab calibrate --stats fisher`)")
    for i, (fi, t) in enumerate(zip(f, x.models)):
        if tuple(fi.shape) != tuple(t.shape):
            raise RecipeError(f"fisher: the Fisher of model {i} for tensor '{x.name}' has shape {list(fi.shape)}, "
                              f"the tensor {list(t.shape)}; is the statistics file a gram.safetensors?")
        if bool((fi < 0).any()):
            raise RecipeError(f"fisher: the Fisher of model {i} for tensor '{x.name}' has negative entries")
    return f


def _prepare_model(scope: ModelScope):
    """Squared L2 norm of each model's Fisher over every merged tensor (for ``normalize``)."""
    if not scope.params["normalize"]:
        return None
    sq = [0.0] * scope.num_models
    for chunk in scope.chunks():
        for i, f in enumerate(_fishers(chunk)):
            sq[i] += float(f.double().square().sum())
    return [math.sqrt(s) for s in sq]


def fisher_merge(x: TensorInputs) -> torch.Tensor:
    fishers = _fishers(x)
    weights = [float(w) for w in x.model_param("weight")]
    if x.params["normalize"]:
        norms = x.model_stats
        if norms is None:
            raise RecipeError("fisher: normalize needs the whole-model Fisher norms (engine did not run prepare_model)")
        zero = [i for i, n in enumerate(norms) if n == 0.0]
        if zero:
            raise RecipeError(f"fisher: the Fisher of model(s) {zero} is zero on every merged tensor; cannot "
                              f"normalize (set normalize: false, or recompute the statistics)")
        weights = [w / n for w, n in zip(weights, norms)]
    return fisher_weighted_average(x.models, fishers, weights, x.params["eps_mode"], x.params["epsilon"])


register(MergeMethod(
    name="fisher",
    family="fisher",
    summary="Elementwise Fisher-weighted average of the models (diagonal Laplace posterior product).",
    reference="Matena & Raffel 2022, Merging Models with Fisher-Weighted Averaging (arXiv:2111.09832); "
              "mmatena/model_merging merging.py.",
    merge=fisher_merge,
    base=BaseUse.IGNORED,
    params=(
        Param("normalize", bool, "Divide each model's coefficient by the L2 norm of its whole Fisher "
              "(reference normalize_fishers).", default=True, per_layer=False),
        Param("eps_mode", str, "floor_target: max(F, eps) on model 0 only (reference); floor_all: on every model; "
              "add_all: F + eps on every model (FusionBench).", default="floor_target", choices=EPS_MODES,
              per_layer=False),
        Param("epsilon", float, "Fisher floor / additive epsilon.", default=1e-6, low=0.0, low_open=True,
              per_layer=False),
    ),
    model_params=(STATISTICS_PARAM, Param("weight", float, "Merging coefficient lambda_i of this model.",
                                          default=1.0, low=0.0)),
    min_models=1,
    chunkable=True,
    prepare_model=_prepare_model,
    aux_inputs=(STATISTICS,),
    notes="Fisher from `mergelab calibrate --stats fisher` (per-example exact Fisher by default; the batched mode "
          "is FusionBench's approximation). The reference's coefficient grid search is not run here; give "
          "weights explicitly or tune them on a validation split.",
))
