"""The saved-folder format of routed / per-task models, and its size accounting.

A routed model is a folder::

    routed.json            manifest: format, version, method, tasks, model_class, method settings, sizes
    config.json            the Hugging Face config of the (shared) architecture
    <tensors>.safetensors  method-specific files named in ``routed.json["files"]``
    heads.safetensors      optional per-task linear heads (``{task}.weight``, ``{task}.bias``)

It is written to ``OUT.partial/`` and renamed when complete, so a folder that exists is whole; an
existing ``OUT`` is never overwritten (the caller removes it). Bit masks are packed 8 per byte
(``numpy.packbits``, little bit order) and stored as uint8 with their shape in the file's metadata.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Dict, Mapping, Optional

import numpy as np
import torch

from mergelab.errors import CheckpointError, OutputError

FORMAT = "mergelab-routed"
VERSION = 1
MANIFEST = "routed.json"


def begin(out: Path) -> Path:
    """A fresh ``OUT.partial`` to write into; ``OUT`` itself must not exist."""
    out = Path(out)
    if out.exists():
        raise OutputError(f"output folder '{out}' exists; remove it or choose another")
    if not out.parent.exists():
        raise OutputError(f"the parent folder of '{out}' does not exist")
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def commit(tmp: Path, out: Path) -> Path:
    tmp.replace(out)
    return Path(out)


def abort(tmp: Path) -> None:
    shutil.rmtree(tmp, ignore_errors=True)


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def save_tensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Optional[dict] = None) -> int:
    """Write ``tensors`` as safetensors; returns the bytes of the tensor data (headers not counted)."""
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(path),
              metadata={k: str(v) for k, v in (metadata or {}).items()} or None)
    return sum(tensor_bytes(v) for v in tensors.values())


def load_tensors(path: Path) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise CheckpointError(f"routed model: missing file '{path}'")
    return load_file(str(path))


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """A boolean tensor as uint8, 8 entries per byte (little bit order), flattened."""
    bits = np.packbits(mask.reshape(-1).to(torch.bool).numpy(), bitorder="little")
    return torch.from_numpy(bits.copy())


def unpack_mask(packed: torch.Tensor, shape) -> torch.Tensor:
    n = int(np.prod(shape)) if len(shape) else 1
    bits = np.unpackbits(packed.numpy(), count=n, bitorder="little")
    return torch.from_numpy(bits.astype(bool)).reshape(tuple(shape))


def save_masks(path: Path, masks: Mapping[str, torch.Tensor]) -> int:
    """Bit-packed masks with their shapes in the metadata; returns the packed bytes."""
    packed = {k: pack_mask(m) for k, m in masks.items()}
    shapes = {k: list(m.shape) for k, m in masks.items()}
    return save_tensors(path, packed, {"shapes": json.dumps(shapes)})


def load_masks(path: Path) -> Dict[str, torch.Tensor]:
    from safetensors import safe_open

    if not Path(path).is_file():
        raise CheckpointError(f"routed model: missing mask file '{path}'")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        shapes = json.loads(meta.get("shapes", "{}"))
        out = {}
        for k in f.keys():
            if k not in shapes:
                raise CheckpointError(f"{path}: mask '{k}' has no shape in the file's metadata")
            out[k] = unpack_mask(f.get_tensor(k), shapes[k])
    return out


def save_heads(path: Path, heads: Mapping[str, Mapping[str, torch.Tensor]]) -> int:
    flat = {f"{t}.{n}": v.float() for t, h in heads.items() for n, v in h.items()}
    return save_tensors(path, flat)


def load_heads(path: Path) -> Dict[str, Dict[str, torch.Tensor]]:
    out: Dict[str, Dict[str, torch.Tensor]] = {}
    for k, v in load_tensors(path).items():
        task, _, name = k.rpartition(".")
        out.setdefault(task, {})[name] = v
    return out


def write_manifest(folder: Path, manifest: dict) -> None:
    (Path(folder) / MANIFEST).write_text(json.dumps({"format": FORMAT, "version": VERSION, **manifest}, indent=1))


def read_manifest(folder: Path) -> dict:
    folder = Path(folder)
    path = folder / MANIFEST
    if not folder.is_dir():
        raise CheckpointError(f"routed model '{folder}': not a folder")
    if not path.is_file():
        raise CheckpointError(f"'{folder}' is not a routed model: no {MANIFEST}")
    try:
        m = json.loads(path.read_text())
    except ValueError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise CheckpointError(f"{path}: expected \"format\": \"{FORMAT}\"")
    if m.get("version") != VERSION:
        raise CheckpointError(f"{path}: format version {m.get('version')!r}; this mergelab reads version {VERSION}")
    return m


def sizes(one_model_bytes: int, extra_bytes: int, extra_params: int, n_experts: int) -> dict:
    """Size accounting: bytes beyond one model, against one model and against all experts."""
    return {"one_model_bytes": one_model_bytes, "extra_bytes": extra_bytes, "extra_params": extra_params,
            "total_bytes": one_model_bytes + extra_bytes, "experts_bytes": n_experts * one_model_bytes,
            "vs_one_model": round((one_model_bytes + extra_bytes) / max(1, one_model_bytes), 4),
            "vs_all_experts": round((one_model_bytes + extra_bytes) / max(1, n_experts * one_model_bytes), 4)}
