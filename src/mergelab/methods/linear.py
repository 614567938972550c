"""Linear merging: a weighted average of the models' weights ("model soups").

Wortsman et al., "Model soups: averaging weights of multiple fine-tuned models improves accuracy
without increasing inference time", ICML 2022 (arXiv:2203.05482). Semantics of mergekit's ``linear``.
"""

import torch

from mergelab.methods.common import WEIGHT
from mergelab.methods.registry import STREAM_ELEMENTS, BaseUse, MergeMethod, Param, TensorInputs, register


def linear_merge(x: TensorInputs) -> torch.Tensor:
    """``sum_i w_i theta_i / sum_i w_i`` (or the plain weighted sum when ``normalize`` is false).

    Accumulates in input order, then divides, as mergekit does, so float32 results agree bit for bit.
    """
    first = x.models[0]
    weights = torch.tensor(x.model_param("weight"), dtype=torch.float32, device=first.device)
    out = torch.zeros_like(first)
    for t, w in zip(x.models, weights.unbind(0)):
        out.addcmul_(t, w)
    if x.params["normalize"]:
        out.div_(weights.sum())
    return out


register(MergeMethod(
    name="linear",
    family="linear",
    summary="Weighted average of the models' weights.",
    reference="Wortsman et al. 2022, Model soups (arXiv:2203.05482); mergekit 0.1.5 `linear`.",
    merge=linear_merge,
    base=BaseUse.INPUT,
    params=(Param("normalize", bool, "Divide by the sum of the weights.", default=True),),
    model_params=(WEIGHT,),
    chunkable=True,
    propagates_nonfinite=True,
    stream_elements=STREAM_ELEMENTS,
    notes="As in mergekit, a base_model not listed under models is added as one more input and needs a weight.",
))
