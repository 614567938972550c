"""NearSwap: take the other model's value only where it is already close to the base.

Introduced with alchemonaut/QuartetAnemoi-70B-t0.0001 (Hugging Face model card, 2024); mergekit 0.1.5
``nearswap``. Elementwise, with ``d = |theta_0 - theta_1|``::

    w = clamp(t / max(d, 1e-6), 0, 1)
    theta = w * theta_1 + (1 - w) * theta_0

Entries that differ by at most ``t`` are swapped for the other model's value (w = 1); entries that
differ more move toward it by ``t / d``, so the change at any entry is at most ``t``.
"""

import torch

from mergelab.methods.registry import STREAM_ELEMENTS, BaseUse, MergeMethod, Param, TensorInputs, register


def nearswap_merge(x: TensorInputs) -> torch.Tensor:
    a, b = x.base, x.models[0]
    weight = (x.params["t"] / torch.abs(a - b).clamp(min=1e-6)).clamp(min=0, max=1)
    return weight * b + (1 - weight) * a


register(MergeMethod(
    name="nearswap",
    family="nearswap",
    summary="Per entry, move from the base toward the other model by at most t (swap where they differ by <= t).",
    reference="alchemonaut/QuartetAnemoi-70B-t0.0001 (model card, 2024); mergekit 0.1.5 `nearswap`.",
    merge=nearswap_merge,
    base=BaseUse.REQUIRED,
    params=(Param("t", float, "Similarity threshold: entries closer than t take the other model's value; "
                  "farther ones move by t.", low=0.0),),
    min_models=1,
    max_models=1,
    chunkable=True,
    stream_elements=STREAM_ELEMENTS,
    notes="Identical to mergekit 0.1.5 (elementwise, float32).",
))
