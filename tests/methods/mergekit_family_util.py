"""Test helpers for the mergekit-family methods: build TensorInputs, run a method whole or in row chunks.

The engine is not involved: this mimics what it hands a method (parameters defaulted from the
method's ``Param`` list, ``prepare_tensor`` over a re-iterable stream of row chunks, ``merge`` per chunk).
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from mergelab.methods.registry import MergeMethod, ModelScope, TensorInputs, TensorSource, get_method


def resolved(method: MergeMethod, params: Optional[dict], model_params, n: int):
    """Global and per-model parameters with the method's defaults filled in."""
    g = {p.name: p.default for p in method.params if not p.required}
    g.update(params or {})
    if model_params is None or isinstance(model_params, dict):
        model_params = [dict(model_params or {}) for _ in range(n)]
    per = []
    for mp in model_params:
        d = {p.name: p.default for p in method.model_params if not p.required}
        d.update(mp)
        per.append(d)
    for p in method.params:
        if p.name in g and g[p.name] is not None:  # None: unset, a default the method resolves (as the engine)
            g[p.name] = p.check(g[p.name], "test")
    for d in per:
        for p in method.model_params:
            if p.name in d:
                d[p.name] = p.check(d[p.name], "test")
    return g, per


def _row_ranges(rows: int, chunks: int):
    chunks = max(1, min(chunks, rows))
    edges = [round(i * rows / chunks) for i in range(chunks + 1)]
    return [(edges[i], edges[i + 1]) for i in range(chunks) if edges[i + 1] > edges[i]]


def run(
    method: Union[str, MergeMethod],
    base: Optional[torch.Tensor],
    models: Sequence[torch.Tensor],
    params: Optional[dict] = None,
    model_params=None,
    chunks: int = 1,
    name: str = "layers.0.weight",
    seed: int = 0,
) -> torch.Tensor:
    """Merge one tensor with ``method``, optionally split into ``chunks`` row chunks."""
    m = get_method(method) if isinstance(method, str) else method
    models = [t.to(torch.float32) for t in models]
    base = None if base is None else base.to(torch.float32)
    g, per = resolved(m, params, model_params, len(models))
    if m.validate is not None:
        m.validate(g, per)
    shape = tuple(models[0].shape)
    if chunks > 1:
        assert m.chunkable, f"{m.name} is not chunkable"
        assert len(shape) >= 1
        ranges = _row_ranges(shape[0], chunks)
    else:
        ranges = [(0, shape[0] if shape else 0)]

    def piece(t, r):
        if t is None:
            return None
        return t if (len(shape) == 0 or r == (0, shape[0])) else t[r[0]:r[1]]

    def chunk_inputs(i, r, tensor_stats=None, model_stats=None):
        return TensorInputs(
            name=name, shape=shape, base=piece(base, r), models=[piece(t, r) for t in models],
            params=g, model_params=per, seed=seed, chunk=i, rows=r,
            tensor_stats=tensor_stats, model_stats=model_stats,
        )

    def stream():
        return (chunk_inputs(i, r) for i, r in enumerate(ranges))

    tensor_stats = None
    model_stats = None
    if m.prepare_model is not None:
        model_stats = m.prepare_model(ModelScope(g, per, len(models), stream))
    if m.prepare_tensor is not None:
        src = TensorSource(name, shape, g, per, len(models), len(ranges), stream)
        tensor_stats = m.prepare_tensor(src)
    outs = [m.merge(chunk_inputs(i, r, tensor_stats, model_stats)) for i, r in enumerate(ranges)]
    for o in outs:
        assert o.dtype == torch.float32
    if len(outs) == 1:
        return outs[0]
    return torch.cat(outs, dim=0)


def inputs(method: Union[str, MergeMethod], base, models, params=None, model_params=None, name="t", seed=0):
    """A whole-tensor :class:`TensorInputs` with defaults filled in (no statistics)."""
    m = get_method(method) if isinstance(method, str) else method
    g, per = resolved(m, params, model_params, len(models))
    shape = tuple(models[0].shape)
    return TensorInputs(name=name, shape=shape, base=base, models=list(models), params=g, model_params=per,
                        seed=seed, rows=(0, shape[0] if shape else 0))


def ulp_diff(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in float32 units in the last place between two tensors (0 when equal)."""
    a = a.to(torch.float32).contiguous().reshape(-1)
    b = b.to(torch.float32).contiguous().reshape(-1)
    if a.numel() == 0:
        return 0
    ia = a.view(torch.int32).to(torch.int64)
    ib = b.view(torch.int32).to(torch.int64)
    # Map the sign-magnitude float order onto a monotone integer line.
    ia = torch.where(ia < 0, -(ia & 0x7FFFFFFF), ia)
    ib = torch.where(ib < 0, -(ib & 0x7FFFFFFF), ib)
    return int((ia - ib).abs().max().item())
