"""Stream a base and its fine-tuned models tensor by tensor (in row chunks) into :class:`Diagnostics`.

Only the base's floating-point tensors are measured (non-float tensors such as position ids are
copied from the base by a merge, never merged; they are listed under ``skipped``). Before a byte of
data is read, every model's header is checked: a model missing one of these tensors, holding it with
another shape, or as a non-float dtype is an error naming the tensor and the model, unless
``skip_mismatched`` is set, in which case that tensor is left out for every model and listed.
Tensors a model holds but the base lacks are listed as skipped too.

Memory: one chunk of at most ``chunk_elements`` entries per model (a few float32/float64 copies of
``k`` such chunks), whatever the model size. With a ``density``, each tensor is read twice: once to
find the per-model trim thresholds (exact streaming select, :mod:`mergelab.methods.select`), once for
the statistics.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from mergelab.errors import CheckpointError, NonFiniteError
from mergelab.inspect.diagnostics import (EMBEDDINGS, OTHER, Diagnostics, GroupStats, TaskVectorStats,
                                          chunk_stats, interpret)

DEFAULT_CHUNK_ELEMENTS = 1 << 20
_EMBEDDING_NAME = re.compile(r"(embed|\bwte\b|\bwpe\b|lm_head|(^|\.)shared\.weight$)")


def group_of(name: str) -> Tuple[str, Optional[int]]:
    """``(group name, layer index)`` of a tensor: its block index, else ``embeddings`` or ``other``."""
    from mergelab.plan import layer_index

    layer = layer_index(name)
    if layer is not None:
        return str(layer), layer
    return (EMBEDDINGS if _EMBEDDING_NAME.search(name) else OTHER), None


def _group_order(group: str) -> tuple:
    if group == EMBEDDINGS:
        return (0, 0)
    if group == OTHER:
        return (2, 0)
    return (1, int(group))


def _labels(refs: Sequence[str]) -> List[str]:
    """Short unique labels: the folder (or file) name, with as many parent folders as it takes to
    tell repeated names apart (``run1/model``, ``run2/model``); ``#i`` (1-based position among the
    arguments, the base being 1) when the same path is given twice."""
    parts = [Path(str(r).rstrip("/") or str(r)).parts or (str(r),) for r in refs]
    labels = []
    for i, p in enumerate(parts):
        others = [q for q in parts if q != p]
        depth = 1
        while depth < len(p) and any("/".join(q[-depth:]) == "/".join(p[-depth:]) for q in others):
            depth += 1
        lab = "/".join(p[-depth:])
        labels.append(f"{lab}#{i + 1}" if parts.count(p) > 1 else lab)
    return labels


def _row_chunks(shape: tuple, chunk_elements: int) -> List[Optional[tuple]]:
    """Row ranges ``[start, stop)`` of dim 0 covering a tensor in chunks of about ``chunk_elements``."""
    if not shape or shape[0] == 0:
        return [None]
    per_row = 1
    for s in shape[1:]:
        per_row *= s
    rows = max(1, chunk_elements // max(per_row, 1))
    if rows >= shape[0]:
        return [None]
    return [(a, min(a + rows, shape[0])) for a in range(0, shape[0], rows)]


def _check_finite(s: TaskVectorStats, name: str, base_ck, cks) -> None:
    if not math.isfinite(s.base_sumsq):
        raise NonFiniteError(f"tensor '{name}' in the base '{base_ck.label}' holds NaN or inf")
    for i, ck in enumerate(cks):
        if not math.isfinite(float(s.gram[i, i])):
            raise NonFiniteError(f"tensor '{name}' in model '{ck.label}' holds NaN or inf "
                                 f"(or its difference from the base overflows float32)")


def inspect_models(
    base: str,
    models: Sequence[str],
    rtol: float = 1e-3,
    density: Optional[float] = None,
    skip_mismatched: bool = False,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    progress: Optional[Callable[[str, int], None]] = None,
    device: str = "cpu",
) -> Diagnostics:
    """Measure the task vectors ``models[i] - base`` (local folders or ``.safetensors`` files).

    ``rtol``: near-zero tolerance relative to the base weight. ``density``: also count sign conflicts
    after a per-tensor TIES trim keeping that share of each task vector (``0 < density <= 1``).
    ``progress(name, numel)`` is called after each tensor. ``device``: where the arithmetic runs
    (``cpu``, ``cuda``, ``cuda:N``); the numbers do not depend on it beyond float rounding. See :mod:`mergelab.inspect.diagnostics`
    for the meaning of every number.
    """
    from mergelab.io.adapted import open_model
    from mergelab.methods.select import cuts_in_memory, flat_offset, keep_count, top_cuts

    if not models:
        raise CheckpointError("inspect needs at least one model besides the base")
    if rtol < 0:
        raise ValueError("rtol must be >= 0")
    if density is not None and not 0 < density <= 1:
        raise ValueError("density must be in (0, 1]")
    if chunk_elements < 1:
        raise ValueError("chunk_elements must be >= 1")

    labels = _labels([base] + list(models))
    base_ck = open_model(str(base), label=labels[0])
    cks = [open_model(str(m), label=lab) for m, lab in zip(models, labels[1:])]
    k = len(cks)

    # ---- validate every header before reading data
    skipped: List[dict] = []
    names: List[str] = []
    for name, info in base_ck.tensors.items():
        if not info.is_float:
            skipped.append({"tensor": name, "reason": f"non-float dtype {info.dtype} in the base (never merged)"})
            continue
        problem = None
        for ck in cks:
            other = ck.tensors.get(name)
            if other is None:
                problem = f"tensor '{name}' is missing from model '{ck.label}' ({ck.path}) but present in the base"
            elif tuple(other.shape) != tuple(info.shape):
                problem = (f"tensor '{name}' has shape {tuple(other.shape)} in model '{ck.label}' ({ck.path}) "
                           f"but {tuple(info.shape)} in the base '{base_ck.label}' ({base_ck.path})")
            elif not other.is_float:
                problem = (f"tensor '{name}' is {other.dtype} in model '{ck.label}' ({ck.path}) but "
                           f"{info.dtype} in the base")
            if problem:
                break
        if problem:
            if not skip_mismatched:
                raise CheckpointError(problem + "; pass --skip-mismatched to leave such tensors out")
            skipped.append({"tensor": name, "reason": problem})
            continue
        names.append(name)
    for ck in cks:
        for name in ck.tensors:
            if name not in base_ck.tensors:
                skipped.append({"tensor": name, "reason": f"in model '{ck.label}' but not in the base"})

    groups_of = {n: group_of(n) for n in names}
    names.sort(key=lambda n: (_group_order(groups_of[n][0]), n))

    # ---- stream
    per_tensor: Dict[str, TaskVectorStats] = {}
    for name in names:
        shape = tuple(base_ck.tensors[name].shape)
        chunks = _row_chunks(shape, chunk_elements)

        def deltas(rows, name=name) -> Tuple[torch.Tensor, torch.Tensor]:
            b = base_ck.read(name, rows=rows, dtype=torch.float32, device=device)
            d = torch.empty((k,) + tuple(b.shape), dtype=torch.float32, device=device)
            for i, ck in enumerate(cks):
                torch.sub(ck.read(name, rows=rows, dtype=torch.float32, device=device), b, out=d[i])
            return b, d

        thresholds = None
        first = None
        if density is not None:
            keep = keep_count(density, base_ck.tensors[name].numel, "mergekit")
            if len(chunks) == 1:  # one read serves both the thresholds and the statistics
                first = deltas(chunks[0])
                thresholds = [cuts_in_memory(first[1][i], [keep])[0] for i in range(k)]
            else:
                def stream(chunks=chunks, deltas=deltas) -> Iterator[torch.Tensor]:
                    for rows in chunks:
                        yield deltas(rows)[1]

                thresholds = top_cuts(stream, [keep] * k)
        total = TaskVectorStats(k)
        for rows in chunks:
            b, d = first if first is not None else deltas(rows)
            first = None
            part = chunk_stats(b, d, rtol=rtol, thresholds=thresholds,
                               offset=0 if rows is None else flat_offset(rows, shape))
            del b, d
            _check_finite(part, name, base_ck, cks)
            total = total + part
        if density is not None and total.trimmed_conflicts is None:  # empty tensor
            total.trimmed_conflicts, total.trimmed_overlap = 0, 0
        total.tensors = 1
        per_tensor[name] = total
        if progress is not None:
            progress(name, base_ck.tensors[name].numel)

    # ---- pool
    by_group: Dict[str, List[TaskVectorStats]] = {}
    for name in names:
        by_group.setdefault(groups_of[name][0], []).append(per_tensor[name])
    groups = [
        GroupStats(g, None if g in (EMBEDDINGS, OTHER) else int(g), TaskVectorStats.pool(items, k))
        for g, items in sorted(by_group.items(), key=lambda kv: _group_order(kv[0]))
    ]
    overall = TaskVectorStats.pool(per_tensor.values(), k)
    if density is not None and overall.trimmed_conflicts is None:
        overall.trimmed_conflicts, overall.trimmed_overlap = 0, 0
    if not names:
        raise CheckpointError(f"no floating-point tensor of the base '{base_ck.label}' can be compared")
    model_labels = labels[1:]
    return Diagnostics(
        base={"label": base_ck.label, "path": str(base_ck.path)},
        models=[{"label": ck.label, "path": str(ck.path)} for ck in cks],
        settings={"rtol": rtol, "density": density, "trim": "per tensor, max(1, int(density*n)) kept (mergekit)"
                  if density is not None else None, "skip_mismatched": skip_mismatched,
                  "chunk_elements": chunk_elements, "device": device},
        overall=overall,
        groups=groups,
        tensors=per_tensor,
        tensor_groups={n: groups_of[n][0] for n in names},
        skipped=skipped,
        interpretation=interpret(overall, groups, model_labels),
    )
