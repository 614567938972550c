"""Task arithmetic: add scaled task vectors to the base model.

Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023 (arXiv:2212.04089):
``theta = theta_0 + lambda * sum_i w_i (theta_i - theta_0)``. lambda multiplies the *sum*, so
``lambda = 1/n`` with unit weights is the plain average. Semantics of mergekit's ``task_arithmetic``.
"""

import torch

from mergelab.methods.common import LAMBDA, WEIGHT, INT8_MASK, normalize
from mergelab.methods.registry import BaseUse, MergeMethod, TensorInputs, register
from mergelab.methods.transforms import TaskVectors, linear_combine, weigh


def task_arithmetic_merge(x: TensorInputs) -> torch.Tensor:
    tv = weigh()(TaskVectors.from_models(x.base, x.models, x.model_param("weight")))
    merged = linear_combine(tv, normalize=x.params["normalize"])
    if x.params["lambda"] != 1:
        merged = merged * x.params["lambda"]
    return x.base + merged


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
))
