"""Forward hooks on linear layers that stream input Gram matrices (the RegMean statistic).

For a linear layer ``y = x W^T + b`` (``nn.Linear``, weight ``[d_out, d_in]``), GPT-2's ``Conv1D``
(``y = x W + b``, weight ``[d_in, d_out]``) or a kernel-size-1 ``nn.Conv1d``, the hook receives the
layer input ``x`` (``[..., d_in]``, or ``[B, d_in, T]`` for ``Conv1d``), keeps the rows that are real
tokens, and adds ``x^T x`` to a float64 accumulator with the row count. Memory is one ``d_in x d_in``
accumulator per layer, whatever the amount of data: raw activations are never kept.

Semantics follow RegMean's reference code (bloomberg/dataless-model-merging,
``src/model_merge/local_trainer.py::compute_grams``: a forward hook on every ``nn.Linear``,
``nn.Conv1d`` and ``Conv1D``, count-weighted running mean of ``x^T x / n``), with one deliberate
difference, exposed as an option: padding positions are dropped (``mask_padding=True``). The reference
flattens ``[B, T, d]`` including padding; pass ``mask_padding=False`` to reproduce it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

LINEAR = "linear"  # weight [d_out, d_in]
CONV1D = "conv1d"  # GPT-2 transformers.pytorch_utils.Conv1D, weight [d_in, d_out]
CONV1D_TORCH = "torch_conv1d"  # nn.Conv1d with kernel size 1, weight [d_out, d_in, 1]


def _gpt2_conv1d_class():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    return Conv1D


@dataclass(frozen=True)
class LinearLayer:
    """A hookable linear layer: its module path, module, kind and input width."""

    name: str
    module: nn.Module
    kind: str
    d_in: int

    @property
    def weight_name(self) -> str:
        return f"{self.name}.weight" if self.name else "weight"


def linear_layers(model: nn.Module) -> List[LinearLayer]:
    """Every ``nn.Linear``, GPT-2 ``Conv1D`` and kernel-1 ``nn.Conv1d`` of ``model``, in module order."""
    conv1d_cls = _gpt2_conv1d_class()
    out = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            out.append(LinearLayer(name, module, LINEAR, module.in_features))
        elif conv1d_cls is not None and isinstance(module, conv1d_cls):
            out.append(LinearLayer(name, module, CONV1D, module.weight.shape[0]))
        elif isinstance(module, nn.Conv1d) and module.kernel_size == (1,) and module.groups == 1:
            out.append(LinearLayer(name, module, CONV1D_TORCH, module.in_channels))
    return out


@dataclass
class GramAccumulator:
    """Streaming ``sum_n x_n x_n^T`` (float64) and the row count ``n`` for one layer."""

    d_in: int
    total: Optional[torch.Tensor] = None
    rows: int = 0

    def add(self, x: torch.Tensor) -> None:
        """Add the rows of ``x`` (``[n, d_in]``)."""
        if x.shape[-1] != self.d_in:
            raise ValueError(f"Gram accumulator expects rows of width {self.d_in}, got {tuple(x.shape)}")
        x = x.detach().to(torch.float64)
        if self.total is None:
            self.total = torch.zeros(self.d_in, self.d_in, dtype=torch.float64, device=x.device)
        self.total.addmm_(x.T, x)
        self.rows += x.shape[0]

    def result(self, reduction: str = "mean") -> torch.Tensor:
        """The Gram matrix: ``X^T X / n`` (``mean``, the reference code) or ``X^T X`` (``sum``, the paper)."""
        if self.total is None or self.rows == 0:
            return torch.zeros(self.d_in, self.d_in, dtype=torch.float64)
        if reduction == "mean":
            return self.total / self.rows
        if reduction == "sum":
            return self.total.clone()
        raise ValueError(f"gram reduction must be 'mean' or 'sum', got {reduction!r}")


def layer_rows(x: torch.Tensor, kind: str, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """The input rows ``[n, d_in]`` of one call of a layer of ``kind``; ``mask`` ``[B, T]`` drops padding."""
    if kind == CONV1D_TORCH:  # [B, d_in, T] -> [B, T, d_in]
        x = x.transpose(1, 2)
    if mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
        return x[mask.bool()]
    return x.reshape(-1, x.shape[-1])


@dataclass
class GramCollector:
    """Registers Gram hooks on the given layers; use as a context manager around forward passes.

    Set :attr:`mask` (``[B, T]`` attention mask) before each forward when ``mask_padding`` is on; inputs
    whose leading dims are ``[B, T]`` then keep only the rows where the mask is 1 (pooler and head
    inputs, ``[B, d]``, keep every row).
    """

    layers: List[LinearLayer]
    mask_padding: bool = True
    mask: Optional[torch.Tensor] = None
    accumulators: Dict[str, GramAccumulator] = field(default_factory=dict)
    _handles: list = field(default_factory=list)

    def __enter__(self) -> "GramCollector":
        for layer in self.layers:
            self.accumulators.setdefault(layer.name, GramAccumulator(layer.d_in))
            self._handles.append(layer.module.register_forward_pre_hook(self._hook(layer)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, layer: LinearLayer):
        def hook(module, args):
            x = args[0]
            self.accumulators[layer.name].add(layer_rows(x, layer.kind, self.mask if self.mask_padding else None))
        return hook

    def grams(self, reduction: str = "mean") -> Dict[str, Tuple[torch.Tensor, int]]:
        """``{layer name: (Gram, rows)}`` for every hooked layer."""
        return {name: (acc.result(reduction), acc.rows) for name, acc in self.accumulators.items()}
