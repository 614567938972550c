"""Statistics on disk: one safetensors file per statistic, tensors named like the model's, with metadata.

A calibration folder holds, per model::

    gram.safetensors         RegMean input Gram matrices, one per linear weight (see below)
    fisher.safetensors       diagonal Fisher, one per float tensor of the checkpoint, same shape
    activations.safetensors  inputs, attention masks, hidden states and logits of the examples
    calibration.json         what produced them: model, data (suite/task/split or file), settings, cost

Each file's safetensors header carries ``format`` (``mergelab-statistics/1``), ``statistic`` and
``mergelab`` (a JSON document: producer and version, model path and fingerprint, data source, settings,
examples, seconds). The merge engine reads a statistic by the name of the tensor being merged, so a
recipe names the file directly, e.g. ``statistics: calib/expert_a/gram.safetensors``.

``gram.safetensors`` holds the ``[d_in, d_in]`` Gram of every linear weight under that weight's
checkpoint name, and for every *other* float tensor of the checkpoint a 0-d tensor holding the
number of calibration rows: RegMean averages those tensors, and the engine requires an entry for every
merged tensor. The metadata lists the linear weights, their layout (``linear`` = ``[d_out, d_in]``,
``conv1d`` = GPT-2's ``[d_in, d_out]``) and rows.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mergelab.errors import CheckpointError

FORMAT = "mergelab-statistics/1"
STATISTICS = ("gram", "fisher", "activations")
FILENAMES = {s: f"{s}.safetensors" for s in STATISTICS}


def save_statistic(folder, statistic: str, tensors: Dict[str, torch.Tensor], metadata: dict) -> Path:
    """Write ``tensors`` to ``folder/<statistic>.safetensors`` (aside, then renamed) with ``metadata``."""
    if statistic not in STATISTICS:
        raise ValueError(f"unknown statistic {statistic!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / FILENAMES[statistic]
    tmp = path.with_name(path.name + ".partial")
    header = {"format": FORMAT, "statistic": statistic, "mergelab": json.dumps(metadata, sort_keys=True, default=str)}
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=header)
    os.replace(tmp, path)
    return path


def statistic_path(path, statistic: Optional[str] = None) -> Path:
    """``path`` itself if it is a file, else ``path/<statistic>.safetensors`` (which must exist)."""
    p = Path(path)
    if p.is_dir():
        if statistic is None:
            raise CheckpointError(f"'{p}' is a calibration folder: name the statistic file inside it "
                                  f"({', '.join(FILENAMES.values())})")
        p = p / FILENAMES[statistic]
    if not p.is_file():
        raise CheckpointError(f"statistics file '{p}' does not exist (run `mergelab calibrate` first)")
    return p


def read_metadata(path, statistic: Optional[str] = None) -> dict:
    """The metadata of a statistics file: ``{"format", "statistic", **mergelab document}``."""
    p = statistic_path(path, statistic)
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"'{p}' is not a readable safetensors file: {e}") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"'{p}' is not a mergelab statistics file (format {meta.get('format')!r}, expected "
                              f"{FORMAT!r})")
    if statistic is not None and meta.get("statistic") != statistic:
        raise CheckpointError(f"'{p}' holds '{meta.get('statistic')}' statistics, expected '{statistic}'")
    doc = json.loads(meta.get("mergelab", "{}"))
    return {"format": meta["format"], "statistic": meta.get("statistic"), **doc}


def load_statistic(path, statistic: Optional[str] = None) -> Tuple[Dict[str, torch.Tensor], dict]:
    """``(tensors, metadata)`` of a statistics file (whole file in memory: for small models and tests)."""
    meta = read_metadata(path, statistic)
    p = statistic_path(path, statistic)
    with safe_open(str(p), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return tensors, meta


def check_consistent(paths, statistic: str) -> list:
    """Metadata of several models' statistics files, checked to be comparable.

    Refuses a mix of Gram reductions (``mean`` vs ``sum``) or padding policies, and of Fisher modes:
    merging statistics that mean different things would silently weight the models unequally.
    """
    metas = [read_metadata(p, statistic) for p in paths]
    keys = {"gram": ("gram_reduction", "mask_padding"), "fisher": ("fisher_mode",), "activations": ()}[statistic]
    for key in keys:
        values = {json.dumps(m.get("settings", {}).get(key)) for m in metas}
        if len(values) > 1:
            listing = ", ".join(f"{p}: {m.get('settings', {}).get(key)}" for p, m in zip(paths, metas))
            raise CheckpointError(f"{statistic} statistics disagree on '{key}' ({listing}); recompute them with "
                                  f"the same setting")
    return metas


def folder_size(folder) -> int:
    """Bytes of the statistics files in ``folder``."""
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))
