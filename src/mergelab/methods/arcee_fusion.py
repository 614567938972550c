"""Arcee Fusion: keep only the changes that are large and where the row's output distribution shifts.

Arcee AI, "Arcee Fusion" (mergekit 0.1.5 ``arcee_fusion``, announced on arcee.ai, 2025; no paper).
With a base ``theta_0`` and one model ``theta_1``, per tensor:

1. importance = ``|theta_1 - theta_0| * KL(p || q)`` where ``p``/``q`` are the softmax of each row
   (last dimension) of ``theta_1``/``theta_0`` plus 1e-8, and the KL is summed over the row;
2. threshold = median + 1.5 * IQR of the importance (quantiles at sorted index
   ``floor(q * (n - 1))``, no interpolation);
3. the merged tensor takes ``theta_1``'s value where importance >= threshold, the base elsewhere.

mergekit estimates the quantiles of tensors above 10^6 entries from 10^6 entries drawn with
replacement by the global torch RNG, so its result there is random; mergelab computes the exact
quantiles at any size (same values as mergekit below 10^6 entries). Needs the whole tensor.
"""

import torch
import torch.nn.functional as F

from mergelab.methods.registry import BaseUse, MergeMethod, TensorInputs, register


def importance_scores(model: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """``|model - base|`` times the row-wise KL divergence of their softmaxes (last dimension)."""
    diff = (model - base).abs()
    p = F.softmax(model, dim=-1) + 1e-8
    q = F.softmax(base, dim=-1) + 1e-8
    kl = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    return diff * kl


def fusion_threshold(importance: torch.Tensor) -> torch.Tensor:
    """median + 1.5 * (q3 - q1), quantiles taken at sorted index floor(q * (n - 1))."""
    flat = importance.reshape(-1)
    n = flat.numel()
    idx = (torch.tensor([0.25, 0.5, 0.75]) * (n - 1)).long().tolist()
    q1, median, q3 = (torch.kthvalue(flat.cpu(), i + 1).values.to(flat.device) for i in idx)
    return median + 1.5 * (q3 - q1)


def arcee_fusion_merge(x: TensorInputs) -> torch.Tensor:
    base, model = x.base, x.models[0]
    importance = importance_scores(model, base)
    mask = (importance >= fusion_threshold(importance)).float()
    return base + (model - base) * mask


register(MergeMethod(
    name="arcee_fusion",
    family="arcee_fusion",
    summary="Take the other model's values only where the change is an outlier in |delta| times row KL divergence.",
    reference="Arcee AI, Arcee Fusion (arcee.ai, 2025); mergekit 0.1.5 `arcee_fusion`.",
    merge=arcee_fusion_merge,
    base=BaseUse.REQUIRED,
    min_models=1,
    max_models=1,
    notes="Exact quantiles at every size; mergekit samples 10^6 entries at random (global RNG) for larger "
          "tensors. The softmax is over raw weights along the last dimension, as in mergekit.",
))
