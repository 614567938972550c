"""Small helpers on what a method receives (:class:`~mergelab.methods.registry.TensorInputs`), shared
by the methods so that none imports another method's file: task vectors of a chunk, a whole tensor as
its own statistics source, the final ``base + lambda * merged``, per-model parameters that must hold
for the whole model."""

from __future__ import annotations

import torch

from mergelab.errors import RecipeError
from mergelab.methods.registry import ModelScope, TensorInputs, TensorSource


def deltas_of(x: TensorInputs) -> torch.Tensor:
    """Stacked task vectors ``[n, *chunk]`` of a chunk: ``models[i] - base``."""
    return torch.stack([m - x.base for m in x.models])


def finish(x: TensorInputs, merged: torch.Tensor) -> torch.Tensor:
    """``base + lambda * merged`` (the multiply skipped for ``lambda`` 1)."""
    if x.params["lambda"] != 1:
        merged = merged * x.params["lambda"]
    return x.base + merged


def whole_source(x: TensorInputs) -> TensorSource:
    """A one-chunk :class:`TensorSource` over ``x``, to compute statistics the engine did not provide.

    Only a whole tensor can stand for itself; a row chunk without its statistics is a contract error.
    """
    if tuple(x.models[0].shape) != tuple(x.shape):
        raise RuntimeError(
            f"tensor '{x.name}': a row chunk reached merge without the statistics of prepare_tensor"
        )
    return TensorSource(x.name, tuple(x.shape), x.params, x.model_params, len(x.models), 1, lambda: iter([x]))


def uniform_model_param(scope: ModelScope, name: str) -> list:
    """A per-model parameter that must be one value over the whole model (whole-model statistics)."""
    values = None
    for c in scope.chunks():
        v = c.model_param(name)
        if values is None:
            values = v
        elif v != values:
            raise RecipeError(
                f"parameter '{name}' must be one value per model with semantics: paper (the trim is over "
                f"the whole model), but it varies across tensors (tensor '{c.name}': {v} vs {values})"
            )
    return values or []
