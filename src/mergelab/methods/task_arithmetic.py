"""Task arithmetic: add scaled task vectors to the base model.

Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023 (arXiv:2212.04089):
``theta = theta_0 + lambda * sum_i w_i (theta_i - theta_0)``. lambda multiplies the *sum*, so
``lambda = 1/n`` with unit weights is the plain average. Semantics of mergekit's ``task_arithmetic``.
"""

import torch

from mergelab.methods.common import LAMBDA, WEIGHT, INT8_MASK, normalize
from mergelab.methods.registry import STREAM_ELEMENTS, BaseUse, MergeMethod, TensorInputs, register


def task_arithmetic_merge(x: TensorInputs) -> torch.Tensor:
    """``base + lambda * linear_combine(weigh()(task vectors), normalize)``, bit for bit.

    Accumulated in one output buffer with one scratch buffer, model by model, instead of stacking
    the task vectors: the same float32 operations in the same order, about half the memory traffic.
    """
    base = x.base
    weights = torch.tensor(x.model_param("weight"), dtype=base.dtype, device="cpu")
    merged = torch.empty_like(base)
    scratch = torch.empty_like(base) if len(x.models) > 1 else None
    for i, m in enumerate(x.models):
        d = torch.sub(m, base, out=merged if i == 0 else scratch)
        d.mul_(float(weights[i]))
        if i:
            merged.add_(d)
    del scratch
    if x.params["normalize"]:
        div = weights.sum()
        if div.abs() >= 1e-8:
            merged.div_(float(div))
    if x.params["lambda"] != 1:
        merged.mul_(x.params["lambda"])
    return merged.add_(base)


register(MergeMethod(
    name="task_arithmetic",
    family="task_arithmetic",
    summary="Base plus lambda times the weighted sum of the task vectors.",
    reference="Ilharco et al. 2023, Editing Models with Task Arithmetic (arXiv:2212.04089); "
              "mergekit 0.1.5 `task_arithmetic`.",
    merge=task_arithmetic_merge,
    base=BaseUse.REQUIRED,
    params=(LAMBDA, normalize(False), INT8_MASK),
    model_params=(WEIGHT,),
    chunkable=True,
    propagates_nonfinite=True,
    stream_elements=STREAM_ELEMENTS,
))
