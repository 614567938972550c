"""Checks shared by the compression commands: a base and a fine-tuned model that belong together."""

from __future__ import annotations

from pathlib import Path

from mergelab.errors import CheckpointError, MergeLabError
from mergelab.io.checkpoint import Checkpoint


def check_same_tensors(base, model) -> None:
    """Base and model hold the same tensor names with the same shapes; else a clear error naming one."""
    missing = sorted(set(base.tensors) - set(model.tensors))
    extra = sorted(set(model.tensors) - set(base.tensors))
    if missing or extra:
        name, where = (missing[0], f"missing from model '{model.label}' ({model.path})") if missing else \
            (extra[0], f"in model '{model.label}' ({model.path}) but not in base '{base.label}' ({base.path})")
        raise CheckpointError(f"tensor '{name}' is {where}: base and model must hold the same tensors")
    for name, info in model.tensors.items():
        if tuple(info.shape) != tuple(base.tensors[name].shape):
            raise CheckpointError(f"tensor '{name}' has shape {tuple(info.shape)} in model '{model.label}' but "
                                  f"{tuple(base.tensors[name].shape)} in base '{base.label}': the model must be a "
                                  f"fine-tune of this base")


def open_pair(base: str, model: str, out, overwrite: bool):
    """``(base, model)`` opened as checkpoints (labels ``base`` and ``model``) and checked with
    :func:`check_same_tensors`, after refusing an existing output ``out`` unless ``overwrite``."""
    out_path = Path(out)
    if out_path.exists() and not overwrite:
        raise MergeLabError(f"output '{out_path}' exists; pass --overwrite to replace it")
    b = Checkpoint.open(base, label="base")
    m = Checkpoint.open(model, label="model")
    check_same_tensors(b, m)
    return b, m
