"""Per-input mixtures of weight deltas, applied in the forward pass without forming per-input weights.

For a module with shared weights ``W`` and expert deltas ``D_k`` mixed per input ``b`` by weights
``w[b, k]`` (a :class:`Mixture` set by a router before the module runs)::

    W(b) = W + sum_k w[b, k] D_k     =>     f_{W(b)}(x_b) = f_W(x_b) + sum_k w[b, k] f_{D_k}(x_b)

for the linear parts (Linear: ``x D_k^T + d_k``; Embedding: ``D_k[ids]``; a LayerNorm's affine part; an
RMSNorm's weight: Llama / Qwen / Mistral ``w * n(x)`` and Gemma's ``(1 + w) * n(x)`` are both linear in
``w``, so a weight delta ``d_k`` adds ``n(x) * d_k`` with ``n(x) = x / sqrt(mean(x^2) + eps)``).
So a batch runs in one forward with K extra (low-rank: cheap) products per module, and the result is
exactly the forward of the assembled per-input weights. A delta is a dense tensor, a low-rank triple
``(U, S, Vh)`` (``D = U diag(S) Vh``), or ``None`` (zero for that expert).

Twin-Merging wraps every module whose tensors it routes under one global mixture; WEMoE wraps each
layer's MLP linears under that layer's mixture.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence, Union

import torch
from torch import nn
from torch.nn import functional as F

from mergelab.errors import MergeLabError

Delta = Union[None, torch.Tensor, tuple]


class Mixture:
    """The current per-input expert weights ``w`` [B, K] (set by a router, read by the routed modules)."""

    def __init__(self, n: int):
        self.n = n
        self.w: Optional[torch.Tensor] = None

    def get(self) -> torch.Tensor:
        if self.w is None:
            raise MergeLabError("routed module called before its router set the mixture weights")
        return self.w


def _scale(w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``w`` [B] broadcast over the trailing dims of ``y`` [B, ...] (or [1, ...], broadcast to B)."""
    return w.reshape((-1,) + (1,) * (y.dim() - 1)) * y


def dense(delta: Delta) -> Optional[torch.Tensor]:
    if delta is None or torch.is_tensor(delta):
        return delta
    U, S, Vh = delta
    return (U * S) @ Vh


def _linear_delta(x: torch.Tensor, delta: Delta) -> torch.Tensor:
    if torch.is_tensor(delta):
        return x @ delta.T
    U, S, Vh = delta
    return ((x @ Vh.T) * S) @ U.T


class _Routed(nn.Module):
    def __init__(self, mixture: Mixture, deltas: Dict[str, Sequence[Delta]]):
        super().__init__()
        self.mixture = mixture
        for name, ds in deltas.items():
            if len(ds) != mixture.n:
                raise MergeLabError(f"routed module: {len(ds)} deltas for '{name}', the mixture has {mixture.n} experts")
        self.deltas = {name: list(ds) for name, ds in deltas.items()}

    def _mix(self, name: str, fn, y: torch.Tensor) -> torch.Tensor:
        w = self.mixture.get()
        for k, d in enumerate(self.deltas.get(name, ())):
            if d is not None:
                y = y + _scale(w[:, k], fn(d))
        return y


class RoutedLinear(_Routed):
    """With dense weight deltas for every expert (WEMoE's MLP task vectors) and inputs of ``T > 1``
    tokens, two exact ways to apply ``W(b) = W + sum_k w[b, k] D_k`` (``W`` [O, I], ``B`` inputs):

    - ``"formed"``: each input's weights formed and applied by one batched product, ``(K + T) O I``
      multiply-adds per input and ``B O I`` numbers held (autograd keeps them for the backward pass);
    - ``"deltas"``: ``x W^T + sum_k w[b, k] (x D_k^T)``, the ``K`` products as one matrix product with
      the stacked deltas (read once per batch, not once per input), ``(K + 1) T O I`` multiply-adds per
      input and ``B T K O`` numbers held.

    ``path = "auto"`` (the class default) takes ``"deltas"`` when it holds fewer numbers (``T K < I``) and
    ``"formed"`` otherwise; both are the same function with the same gradients
    (``tests/routed/test_layers.py``). A single token, or a routed batch of another size than the
    input's, takes the generic per-delta sum."""

    path = "auto"

    def __init__(self, base: nn.Linear, mixture: Mixture, deltas: Dict[str, Sequence[Delta]]):
        super().__init__(mixture, deltas)
        self.base = base
        ds = self.deltas.get("weight", [])
        self._stack = None
        if ds and all(torch.is_tensor(d) for d in ds):
            self._stack = torch.stack([d.float() for d in ds])  # [K, O, I]
            self.deltas["weight"] = list(self._stack.unbind(0))  # views: stored once

    def _choose(self, x: torch.Tensor) -> str:
        if self.path != "auto":
            if self.path not in ("formed", "deltas"):
                raise MergeLabError(f"RoutedLinear.path must be 'auto', 'formed' or 'deltas', got {self.path!r}")
            return self.path
        k, _, i = self._stack.shape
        return "deltas" if x.shape[1] * k < i else "formed"

    def forward(self, x):
        w = self.mixture.get()
        if self._stack is not None and x.dim() == 3 and x.shape[1] > 1 and w.shape[0] == x.shape[0]:
            if self._choose(x) == "formed":
                weight = self.base.weight + torch.einsum("bk,koi->boi", w.to(self._stack.dtype), self._stack)
                y = torch.bmm(x, weight.transpose(1, 2).to(x.dtype))
                if self.base.bias is not None:
                    y = y + self.base.bias
            else:
                k, o, i = self._stack.shape
                b, t = x.shape[:2]
                per = (x @ self._stack.view(k * o, i).T.to(x.dtype)).view(b, t, k, o)  # x D_k^T for every k
                y = self.base(x) + torch.matmul(w.to(x.dtype).view(b, 1, 1, k), per).view(b, t, o)
        else:
            y = self.base(x)
            y = self._mix("weight", lambda d: _linear_delta(x, d), y)
        shape = y.shape
        return self._mix("bias", lambda d: d.expand(shape), y) if "bias" in self.deltas else y


class RoutedEmbedding(_Routed):
    def __init__(self, base: nn.Embedding, mixture: Mixture, deltas: Dict[str, Sequence[Delta]]):
        super().__init__(mixture, deltas)
        self.base = base

    def forward(self, ids):
        def lookup(d):
            if torch.is_tensor(d):
                return F.embedding(ids, d)
            U, S, Vh = d
            return (F.embedding(ids, U) * S) @ Vh

        return self._mix("weight", lookup, self.base(ids))


class RoutedLayerNorm(_Routed):
    def __init__(self, base: nn.LayerNorm, mixture: Mixture, deltas: Dict[str, Sequence[Delta]]):
        super().__init__(mixture, deltas)
        self.base = base

    def forward(self, x):
        b = self.base
        y = b(x)
        if "weight" in self.deltas:
            normed = F.layer_norm(x, b.normalized_shape, None, None, b.eps)
            y = self._mix("weight", lambda d: normed * d, y)
        shape = y.shape
        return self._mix("bias", lambda d: d.expand(shape), y)


class RoutedRMSNorm(_Routed):
    """An RMSNorm (any module class named ``*RMSNorm`` with a 1-D ``weight`` and ``variance_epsilon`` or
    ``eps``) whose weight takes dense per-expert deltas; the output is exactly the norm with weight
    ``w + sum_k w[b, k] d_k`` (the weight enters linearly)."""

    def __init__(self, base: nn.Module, mixture: Mixture, deltas: Dict[str, Sequence[Delta]]):
        super().__init__(mixture, deltas)
        self.base = base
        self.eps = float(getattr(base, "variance_epsilon", getattr(base, "eps", 1e-6)))

    def forward(self, x):
        y = self.base(x)
        xf = x.float()
        normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        return self._mix("weight", lambda d: normed * dense(d), y)


def is_rms_norm(m: nn.Module) -> bool:
    w = getattr(m, "weight", None)
    return (type(m).__name__.endswith("RMSNorm") and isinstance(w, torch.Tensor) and w.dim() == 1
            and (hasattr(m, "variance_epsilon") or hasattr(m, "eps")))


WRAPPERS = ((nn.Linear, RoutedLinear), (nn.Embedding, RoutedEmbedding), (nn.LayerNorm, RoutedLayerNorm))


def attach(module: nn.Module, deltas: Mapping[str, Sequence[Delta]], mixture: Mixture,
           tied: Optional[Mapping[str, str]] = None) -> List[str]:
    """Wrap the submodules owning the tensors of ``deltas`` (full names, e.g. ``encoder.layer.0.output.dense.weight``).

    Every named tensor must belong to a Linear, Embedding or LayerNorm (else an error naming it).
    With ``tied`` (``{tensor name: name of the tensor tied to it}``, e.g. a tied ``lm_head.weight`` to
    ``model.embed_tokens.weight``), the tied module gets the same deltas, so the assembled model stays
    tied. Returns the wrapped module names.
    """
    deltas = dict(deltas)
    for src, dst in (tied or {}).items():
        if src in deltas and dst not in deltas:
            deltas[dst] = deltas[src]
    by_module: Dict[str, Dict[str, Sequence[Delta]]] = {}
    for key, ds in deltas.items():
        if all(d is None for d in ds):
            continue
        owner, _, attr = key.rpartition(".")
        by_module.setdefault(owner, {})[attr] = ds
    wrapped = []
    for owner, ds in by_module.items():
        try:
            sub = module.get_submodule(owner)
        except AttributeError:
            raise MergeLabError(f"tensor '{owner}.{next(iter(ds))}' has no module in {type(module).__name__}") from None
        for cls, wrapper in WRAPPERS:
            if type(sub) is cls or (isinstance(sub, cls) and not isinstance(sub, _Routed)):
                break
        else:
            if not is_rms_norm(sub):
                raise MergeLabError(f"tensor '{owner}.{next(iter(ds))}' belongs to a {type(sub).__name__}; per-input "
                                    "routing supports Linear, Embedding, LayerNorm and RMSNorm modules")
            wrapper = RoutedRMSNorm
        for attr in ds:
            if attr not in ("weight", "bias") or (wrapper is RoutedRMSNorm and attr != "weight"):
                raise MergeLabError(f"tensor '{owner}.{attr}': only weight and bias can be routed "
                                    "(an RMSNorm: its weight)")
        parent_name, _, child = owner.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, child, wrapper(sub, mixture, ds))
        wrapped.append(owner)
    return wrapped
