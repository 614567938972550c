"""Drive a registered method over a small in-memory model the way the local executor does.

Statistics passes (``prepare_model`` over every chunk of every tensor, ``prepare_tensor`` per tensor),
row chunks of chunkable methods, per-chunk auxiliary inputs, then ``merge`` per chunk, concatenated.
Used by the paper-method tests to check chunked == whole and whole-model statistics on several
tensors without files. Parameters: global ones by name; per-model ones as one value or a list.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch

from mergelab.methods.registry import REQUIRED, ModelScope, TensorInputs, TensorSource, get_method


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def resolve(method_name: str, num_models: int, params: dict) -> tuple:
    """Global and per-model parameter dicts from the method's defaults and ``params``."""
    m = get_method(method_name)
    params = dict(params)
    glob = {p.name: params.pop(p.name, p.default) for p in m.params}
    per_model: List[dict] = []
    for i in range(num_models):
        row = {}
        for p in m.model_params:
            v = params.get(p.name, p.default)
            row[p.name] = v[i] if isinstance(v, (list, tuple)) else v
        per_model.append(row)
    unknown = set(params) - {p.name for p in m.model_params}
    assert not unknown, f"unknown parameters {unknown} for {method_name}"
    for v in list(glob.values()) + [v for r in per_model for v in r.values()]:
        assert v is not REQUIRED, f"test must give every required parameter of {method_name}"
    return glob, per_model


def _ranges(shape: tuple, chunk_rows: Optional[int], chunkable: bool) -> list:
    if not shape:
        return [(0, 0)]
    rows = shape[0]
    if not chunkable or chunk_rows is None or len(shape) < 2 or chunk_rows >= rows:
        return [(0, rows)]
    return [(a, min(rows, a + chunk_rows)) for a in range(0, rows, chunk_rows)]


def merge_model(method_name: str, tensors: Dict[str, dict], num_layers: Optional[int] = None,
                chunk_rows: Optional[int] = None, seed: int = 0, post: Optional[list] = None,
                **params) -> Dict[str, torch.Tensor]:
    """Merge ``tensors`` (``name -> {"base", "models", "layer", "aux"}``) with ``method_name``.

    ``post`` is a list of ``(post_step, step_params)`` applied to the merged delta of each chunk, with
    ``x.params`` replaced by the step's parameters, as the executor does.
    """
    m = get_method(method_name)
    n = len(next(iter(tensors.values()))["models"])
    glob, per_model = resolve(method_name, n, params)
    if m.validate is not None:
        m.validate(glob, per_model)

    def chunk(name: str, spec: dict, c: int, rows: tuple, chunked: bool, tstats=None, mstats=None) -> TensorInputs:
        def cut(t):
            return t[rows[0]:rows[1]] if chunked else t

        base = spec.get("base")
        aux = {k: [cut(v) for v in vs] for k, vs in spec.get("aux", {}).items()}
        return TensorInputs(
            name=name, shape=tuple(spec["models"][0].shape), base=None if base is None else cut(base),
            models=[cut(t) for t in spec["models"]], params=glob, model_params=per_model, seed=seed, chunk=c,
            rows=rows, layer=spec.get("layer"), num_layers=num_layers, tensor_stats=tstats, model_stats=mstats,
            aux=aux,
        )

    def all_chunks():
        for name, spec in tensors.items():
            ranges = _ranges(tuple(spec["models"][0].shape), chunk_rows, m.chunkable)
            for c, rows in enumerate(ranges):
                yield chunk(name, spec, c, rows, len(ranges) > 1)

    model_stats = None
    if m.prepare_model is not None:
        model_stats = m.prepare_model(ModelScope(glob, per_model, n, all_chunks))
    out = {}
    for name, spec in tensors.items():
        shape = tuple(spec["models"][0].shape)
        chunkable = m.chunkable and all(step.chunkable for step, _ in (post or []))
        ranges = _ranges(shape, chunk_rows, chunkable)
        chunked = len(ranges) > 1
        tensor_stats = None
        if m.prepare_tensor is not None:
            src = TensorSource(name, shape, glob, per_model, n, len(ranges),
                               lambda: (chunk(name, spec, c, r, chunked) for c, r in enumerate(ranges)))
            tensor_stats = m.prepare_tensor(src)
        parts = []
        for c, rows in enumerate(ranges):
            x = chunk(name, spec, c, rows, chunked, tensor_stats, model_stats)
            y = m.merge(x)
            for step, step_params in post or []:
                px = TensorInputs(**{**x.__dict__, "params": step_params})
                y = x.base + step.apply(px, y - x.base)
            parts.append(y)
        out[name] = torch.cat(parts) if chunked else parts[0]
    return out


def merge_one(method_name: str, base, models, name: str = "w", layer=None, num_layers=None,
              chunk_rows=None, aux=None, **params) -> torch.Tensor:
    """One tensor (its own whole-model scope)."""
    spec = {"base": base, "models": list(models), "layer": layer, "aux": aux or {}}
    return merge_model(method_name, {name: spec}, num_layers=num_layers, chunk_rows=chunk_rows, **params)[name]
