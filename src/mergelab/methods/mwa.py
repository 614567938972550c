"""MWA: metrics-weighted averaging of checkpoints from one training run.

Yu and Choi, "Parameter-Efficient Checkpoint Merging via Metrics-Weighted Averaging", 2025
(arXiv:2504.18580). No reference code is public.

Checkpoints ``theta_1..theta_K`` of one run (typically LoRA adapters, merged tensor by tensor, so the
``A`` and ``B`` factors are averaged separately as in the paper) are averaged with weights from one
scalar metric per checkpoint, read from the recipe as a per-model parameter:

* ``metric: loss`` (the paper's best variant): ``w_i ∝ (1 / loss_i) ^ penalty`` (lower loss, more weight);
* ``metric: step``: ``w_i ∝ step_i ^ penalty`` (later checkpoints, more weight);

normalised so that ``sum_i w_i = 1``; ``theta = sum_i w_i theta_i``. ``penalty = 0`` is the uniform
soup; a larger penalty concentrates the weight on the best (or latest) checkpoint. One hyperparameter
whatever the number of checkpoints, as the abstract says.

**Unverified**: the paper's method section could not be retrieved, so the weight formula above is the
working hypothesis of the project's spec (``reference/methods-data-free.md`` section 9), consistent
with the abstract (monotone in the metric, one penalty factor, uniform when it vanishes); the default
``penalty = 1`` is likewise not taken from the paper. Weights are computed in float64 from logarithms.
"""

from __future__ import annotations

import math

import torch

from mergelab.errors import RecipeError
from mergelab.methods.registry import BaseUse, MergeMethod, Param, TensorInputs, register


def mwa_weights(metric: str, values: list, penalty: float) -> list:
    """Normalised MWA weights: ``loss^-penalty`` or ``step^penalty``, summing to 1."""
    logs = torch.tensor([math.log(float(v)) for v in values], dtype=torch.float64)
    exponent = -penalty if metric == "loss" else penalty
    return torch.softmax(exponent * logs, dim=0).tolist()


def mwa_merge(x: TensorInputs) -> torch.Tensor:
    metric = x.params["metric"]
    w = mwa_weights(metric, x.model_param(metric), x.params["penalty"])
    out = torch.zeros_like(x.models[0])
    for wi, m in zip(w, x.models):
        out.add_(m, alpha=wi)
    return out


def _validate(params: dict, model_params: list) -> None:
    metric = params["metric"]
    for i, p in enumerate(model_params):
        if not p[metric] > 0:
            raise RecipeError(
                f"mwa: parameter '{metric}' of model {i + 1} = {p[metric]!r} is invalid; with metric: {metric} every "
                f"model needs a {metric} greater than 0 (e.g. `parameters: {{{metric}: "
                f"{'0.83' if metric == 'loss' else '1200'}}}`)"
            )


register(MergeMethod(
    name="mwa",
    family="mwa",
    summary="Average checkpoints of one run with weights from their training loss or step and one penalty factor.",
    reference="Yu & Choi 2025, Metrics-Weighted Averaging (arXiv:2504.18580); no public code.",
    merge=mwa_merge,
    base=BaseUse.IGNORED,
    params=(
        Param("metric", str, "Which per-model metric sets the weights: 'loss' (lower is better) or 'step' "
              "(later is better).", default="loss", choices=("loss", "step"), per_layer=False),
        Param("penalty", float, "Penalty factor: 0 is the uniform average, larger values favour the best "
              "checkpoint more (formula and default unverified, see docs).", default=1.0, low=0.0,
              per_layer=False),
    ),
    model_params=(
        Param("loss", float, "This checkpoint's training loss (needed with metric: loss).", default=0.0, low=0.0,
              per_layer=False),
        Param("step", float, "This checkpoint's training step (needed with metric: step).", default=0.0, low=0.0,
              per_layer=False),
    ),
    min_models=1,
    chunkable=True,
    validate=_validate,
    notes="Not in mergekit, FusionBench or PEFT. For LoRA checkpoints the paper averages the adapter factors; "
          "merging the adapters' dense deltas instead is a different (non-equivalent) merge.",
))
