"""``mergelab graft BASE PACK... -o OUT``: rebuild SkillPacks on their base and merge them.

Each pack is opened as a :class:`~mergelab.compress.skillpack.PackCheckpoint` (``BASE + decoded delta``,
formed one tensor at a time) and handed to the ordinary merge engine with a recipe whose models are
the packs: any method of the registry applies, streaming, and nothing is rebuilt on disk first. One
pack with the default ``task_arithmetic`` (lambda 1, weight 1) is the pack's model rebuilt.

GraftLLM's fusion with a router (theta = theta_tgt + sum_i R(delta_i), arXiv 2505.18502) is not in its
released code and is not implemented: packs are merged statically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence

from mergelab.compress.skillpack import PackCheckpoint
from mergelab.errors import MergeLabError
from mergelab.io.checkpoint import Checkpoint


def graft(base: str, packs: Sequence[str], out: str, *, method: str = "task_arithmetic",
          parameters: Optional[Dict[str, Any]] = None, weights: Optional[Sequence[float]] = None,
          dtype: Optional[str] = None, device: str = "cpu", overwrite: bool = False,
          on_warning: Optional[Callable[[str], None]] = None, progress: bool = False):
    """Merge ``packs`` (SkillPack folders made against ``base``) with ``method`` into the model folder
    ``out``; returns :func:`mergelab.merge.merge`'s result. ``weights``: one per pack (the method's
    per-model ``weight``), 1 for each pack when None and the method has one. ``parameters``: the method's global parameters."""
    from mergelab.merge import merge

    if not packs:
        raise MergeLabError("graft: give at least one SkillPack folder after BASE")
    if weights is not None and len(weights) != len(packs):
        raise MergeLabError(f"graft: {len(weights)} --weight values for {len(packs)} packs: give one per pack")
    from mergelab.methods.registry import get_method

    if weights is None and get_method(method).model_param("weight") is not None:
        weights = [1.0] * len(packs)
    base_ck = Checkpoint.open(base, label=base)
    checkpoints: Dict[str, Any] = {base: base_ck}
    models = []
    for i, pack in enumerate(packs):
        ref = str(pack)
        if ref in checkpoints:
            raise MergeLabError(f"graft: pack '{ref}' is given twice")
        checkpoints[ref] = PackCheckpoint(ref, base_ck, label=ref)
        entry: Dict[str, Any] = {"model": ref}
        if weights is not None:
            entry["parameters"] = {"weight": float(weights[i])}
        models.append(entry)
    recipe: Dict[str, Any] = {"merge_method": method, "base_model": base, "models": models,
                              "parameters": dict(parameters or {})}
    if dtype:
        recipe["dtype"] = dtype
    return merge(recipe, Path(out), overwrite=overwrite, device=device, checkpoints=checkpoints,
                 on_warning=on_warning, progress=progress)
