"""Passthrough: copy one model's tensor, optionally scaled (the building block of layer stacking).

mergekit 0.1.5 ``passthrough``: exactly one input per tensor and an optional per-model ``scale``.
With ``slices:`` it stacks layer ranges of several models into a deeper model ("frankenmerge").
"""

import torch

from mergelab.methods.registry import BaseUse, MergeMethod, Param, TensorInputs, register


def passthrough_merge(x: TensorInputs) -> torch.Tensor:
    scale = x.model_params[0]["scale"]
    return x.models[0] if scale == 1 else x.models[0] * scale


register(MergeMethod(
    name="passthrough",
    family="passthrough",
    summary="Copy one model's tensors unchanged (optionally scaled); with slices:, stack layer ranges.",
    reference="mergekit 0.1.5 `passthrough` (Goddard et al. 2024, arXiv:2403.13257).",
    merge=passthrough_merge,
    base=BaseUse.IGNORED,
    params=(),
    model_params=(Param("scale", float, "Multiply this model's tensors by this factor.", default=1.0),),
    min_models=1,
    max_models=1,
    chunkable=True,
    notes="Exactly one source per tensor, as in mergekit.",
))
