"""VaRM: variation-ratio merging weights (FuseChat 1.0).

Wan et al., "FuseChat: Knowledge Fusion of Chat Models", 2024 (arXiv:2402.16107, the report that
introduced VaRM; the later report arXiv:2408.07990 is FuseChat 2.0 with SCE; reference code
fanqiwan/FuseAI history commit 4135974, ``FuseChat/merge/VaRM/{analysis.py,merge.py}``, deleted at HEAD).

The target models (fine-tuned from one pivot, the base) are averaged with weights proportional to how
much each moved away from the pivot. For each target ``t`` the statistic is the mean of
``(theta_t - theta_0)^2`` (``statistic: square``, FuseChat's ``merge_type=square``), of
``|theta_t - theta_0|`` (``abs``) or the absolute value of the mean signed difference (``signed``,
FuseChat's ``default``), taken over

* ``granularity: tensor`` (FuseChat ``avg_param``, the default): each tensor;
* ``granularity: layer`` (``avg_layer``): the *sum of the per-tensor means* over a block's tensors;
  tensors outside the blocks get uniform weights, as in the reference;
* ``granularity: model`` (``avg_model``): every entry of the model;
* ``granularity: element`` (``avg_item``): per entry, ``w_t = stat_t / sum_j stat_j``.

Weights are ``u_t / sum_j u_j`` or ``softmax(u / temperature)`` (``softmax: true``); if any ``u_t`` is 0
the weights are uniform (the reference's rule for ``avg_param``/``avg_module``, applied here to every
granularity instead of the reference's 0/0). The merge is the convex combination
``theta = sum_t w_t theta_t`` of the full target weights (not base plus deltas).

Deviations, where the reference is a bug: FuseChat's released scripts read one analysis file for
every model (so the released weights are uniform); here each target's own statistic is used, which
is what the paper describes. ``avg_item`` floors the denominator at 1e-13, so entries where no
model moved become 0 in the reference; here they get uniform weights (they equal the pivot).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from mergelab.errors import RecipeError
from mergelab.methods.registry import BaseUse, MergeMethod, ModelScope, Param, TensorInputs, TensorSource, register


def _statistic(d: torch.Tensor, statistic: str) -> torch.Tensor:
    if statistic == "square":
        return d * d
    if statistic == "abs":
        return d.abs()
    return d


def varm_weights(u: list, softmax: bool, temperature: float) -> list:
    """Per-model weights from per-model variation statistics ``u`` (uniform if any is 0)."""
    u = [abs(float(v)) for v in u]
    n = len(u)
    if any(v == 0 for v in u):
        return [1.0 / n] * n
    t = torch.tensor(u, dtype=torch.float64)
    w = torch.softmax(t / temperature, dim=0) if softmax else t / t.sum()
    return w.tolist()


@dataclass(frozen=True)
class VarmStats:
    """Per-tensor weights (tensor granularity) or a map from tensor name to weights (model, layer)."""

    weights: Optional[list] = None
    by_name: Optional[dict] = None


def _sums(x: TensorInputs, statistic: str) -> torch.Tensor:
    d = torch.stack([m - x.base for m in x.models]).reshape(len(x.models), -1)
    return _statistic(d, statistic).double().sum(1).cpu()


def _prepare_tensor(src: TensorSource) -> Optional[VarmStats]:
    if src.params["granularity"] != "tensor":
        return None
    total = torch.zeros(src.num_models, dtype=torch.float64)
    for c in src.chunks():
        total += _sums(c, src.params["statistic"])
    u = (total / max(src.numel, 1)).tolist()
    return VarmStats(weights=varm_weights(u, src.params["softmax"], src.params["temperature"]))


def _prepare_model(scope: ModelScope) -> Optional[VarmStats]:
    g = scope.params["granularity"]
    if g not in ("model", "layer"):
        return None
    stat, soft, temp = scope.params["statistic"], scope.params["softmax"], scope.params["temperature"]
    sums: dict = {}
    numels: dict = {}
    layers: dict = {}
    for c in scope.chunks():
        s = _sums(c, stat)
        sums[c.name] = sums.get(c.name, 0) + s
        numels[c.name] = numels.get(c.name, 0) + c.models[0].numel()
        layers[c.name] = c.layer
    n = scope.num_models
    if g == "model":
        total = sum(sums.values(), torch.zeros(n, dtype=torch.float64))
        count = max(sum(numels.values()), 1)
        w = varm_weights((total / count).tolist(), soft, temp)
        return VarmStats(by_name={name: w for name in sums})
    per_layer: dict = {}
    for name, s in sums.items():
        if layers[name] is not None:
            per_layer[layers[name]] = per_layer.get(layers[name], 0) + s / max(numels[name], 1)
    uniform = varm_weights([1.0] * n, soft, temp)
    by_name = {
        name: (varm_weights(per_layer[layers[name]].tolist(), soft, temp) if layers[name] is not None else uniform)
        for name in sums
    }
    return VarmStats(by_name=by_name)


def varm_merge(x: TensorInputs) -> torch.Tensor:
    g = x.params["granularity"]
    models = torch.stack(x.models)
    shape = (-1,) + (1,) * (models.dim() - 1)
    if g == "element":
        s = _statistic(models - x.base, x.params["statistic"])
        total = s.sum(0, keepdim=True)
        uniform = torch.full_like(s, 1.0 / len(x.models))
        w = torch.where(total > 0, s / torch.where(total > 0, total, torch.ones_like(total)), uniform)
        return (w * models).sum(0)
    if g == "tensor":
        weights = x.tensor_stats.weights
    else:
        weights = x.model_stats.by_name[x.name]
    w = torch.tensor(weights, dtype=models.dtype, device=models.device).reshape(shape)
    return (w * models).sum(0)


def _validate(params: dict, model_params: list) -> None:
    if params["granularity"] == "element" and params["statistic"] == "signed":
        raise RecipeError("varm: parameter 'statistic' = 'signed' is invalid with granularity: element; expected "
                          "'square' or 'abs' (signed per-entry weights are not a convex combination)")
    if params["granularity"] == "element" and params["softmax"]:
        raise RecipeError("varm: parameter 'softmax' = true is invalid with granularity: element; expected false "
                          "(the reference normalises per-entry weights by their sum)")


register(MergeMethod(
    name="varm",
    family="fusechat",
    summary="Average the target models with weights proportional to their squared variation from the pivot.",
    reference="Wan et al. 2024, FuseChat 1.0 (arXiv:2402.16107) VaRM; fanqiwan/FuseAI@4135974 FuseChat/merge/VaRM.",
    merge=varm_merge,
    base=BaseUse.REQUIRED,
    params=(
        Param("granularity", str, "Where one weight applies: 'tensor' (avg_param, default), 'layer', 'model' or "
              "'element'.", default="tensor", choices=("tensor", "layer", "model", "element"), per_layer=False),
        Param("statistic", str, "Variation statistic: mean squared difference (default), mean absolute difference, "
              "or |mean signed difference|.", default="square", choices=("square", "abs", "signed"),
              per_layer=False),
        Param("softmax", bool, "Weights softmax(u / temperature) instead of u / sum(u) (use_sfmax).", default=False,
              per_layer=False),
        Param("temperature", float, "Softmax temperature (temp).", default=1.0, low=0.0, low_open=True,
              per_layer=False),
    ),
    min_models=1,
    chunkable=True,
    prepare_tensor=_prepare_tensor,
    prepare_model=_prepare_model,
    validate=_validate,
    notes="Not in mergekit, FusionBench or PEFT. The pivot (base_model) only defines the variation; it is not "
          "one of the averaged models unless it is also listed under models. The reference casts to bfloat16; "
          "here the output dtype is the recipe's.",
))
