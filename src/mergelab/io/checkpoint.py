"""Lazy checkpoints: a local Hugging Face model folder read one tensor (or row range) at a time.

Accepted layouts, in this order of preference:

* ``model.safetensors.index.json`` with its shards, or a single ``model.safetensors``
  (any other lone ``*.safetensors`` file in the folder, or a path to a ``.safetensors`` file, too);
* ``pytorch_model.bin.index.json`` with its shards, or ``pytorch_model.bin``, loaded with
  ``torch.load(weights_only=True, mmap=True)``: never unpickled arbitrarily.

Safetensors files are opened with the ``safetensors`` library, which validates the header (dtypes,
shapes, offsets, that the data covers the file exactly) before a byte of data is read. Each read then
copies the requested rows straight from the file into a buffer of its own with one positional read
(``os.preadv``) at the offset the header gives, and converts that buffer once to the dtype asked
for. Nothing is memory-mapped: a merge touches every page of every input, and a mapping kept open
would keep those pages resident in the process (memory growing with the model size), while mapping
and unmapping for each read costs a page fault per 4 KiB, more than the copy itself on some VMs.

Nothing is ever downloaded: a hub id is rejected with a message saying to download it first.
"""

from __future__ import annotations

import math
import hashlib
import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

import torch
from safetensors import SafetensorError, safe_open

from mergelab.errors import CheckpointError

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*(@[\w.-]+)?$")


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives and what it is, known from headers alone."""

    name: str
    dtype: torch.dtype
    shape: tuple
    file: Path
    offset: Optional[int] = None  # absolute byte offset of the data in a safetensors file

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    @property
    def is_float(self) -> bool:
        return self.dtype.is_floating_point


def _header_digest(path: Path) -> str:
    """sha256 of a safetensors file's header (its length prefix and JSON): cheap and content-bound."""
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            return hashlib.sha256(prefix).hexdigest()
        (n,) = struct.unpack("<Q", prefix)
        return hashlib.sha256(prefix + f.read(min(n, 100_000_000))).hexdigest()


def owned_tensor(t: torch.Tensor, dtype: Optional[torch.dtype], device: str) -> torch.Tensor:
    """``t`` converted to ``dtype``/``device`` in a buffer of its own (never a view of a mapping)."""
    out = t.to(device=device, dtype=dtype or t.dtype)
    if out.data_ptr() == t.data_ptr():
        out = out.clone()
    return out


class Checkpoint:
    """A model's weights, opened lazily. Construct with :meth:`open`."""

    def __init__(self, path: Path, label: str, tensors: Dict[str, TensorInfo], files: list, fmt: str):
        self.path = path
        self.label = label
        self.tensors = tensors
        self.files = files
        self.format = fmt
        self._bin_cache: Dict[Path, dict] = {}
        self._fds: Dict[Path, int] = {}

    def __del__(self) -> None:
        for fd in getattr(self, "_fds", {}).values():
            try:
                os.close(fd)
            except OSError:
                pass

    def _pread(self, info: TensorInfo, rows: Optional[tuple]) -> torch.Tensor:
        """The stored bytes of ``info`` (rows ``[start, stop)`` if given) as a tensor of its dtype."""
        shape = tuple(info.shape)
        row_bytes = math.prod(shape[1:]) * info.dtype.itemsize if shape else info.dtype.itemsize
        start, stop = (rows if rows is not None and shape else (0, shape[0] if shape else 1))
        offset = info.offset + start * row_bytes
        out_shape = ((stop - start),) + shape[1:] if shape else ()
        buf = torch.empty((stop - start) * row_bytes, dtype=torch.uint8)
        fd = self._fds.get(info.file)
        if fd is None:
            fd = self._fds[info.file] = os.open(info.file, os.O_RDONLY)
        view = memoryview(buf.numpy())
        done = 0
        while done < len(view):
            got = os.preadv(fd, [view[done:]], offset + done)
            if got <= 0:
                raise CheckpointError(f"'{info.file}' ended while reading tensor '{info.name}' (truncated?)")
            done += got
        return buf.view(info.dtype).reshape(out_shape)

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, ref: str, label: Optional[str] = None) -> "Checkpoint":
        """Open the checkpoint at local path ``ref`` (a folder or a ``.safetensors`` file)."""
        label = label or ref
        path = Path(os.path.expanduser(ref))
        if not path.exists():
            if _HUB_ID.match(ref) and not ref.startswith((".", "/", "~")):
                raise CheckpointError(
                    f"model '{ref}' is not a local folder. mergelab never downloads: fetch it first "
                    f"(e.g. `huggingface-cli download {ref.split('@')[0]} --local-dir ./{ref.split('/')[-1]}`) "
                    f"and give the local path"
                )
            raise CheckpointError(f"model path '{ref}' does not exist")
        if (path / "skillpack.json").is_file():
            raise CheckpointError(f"'{ref}' is a SkillPack (made by `mergelab compress`), not a model folder: "
                                  f"rebuild it on its base with `mergelab graft BASE {ref} -o OUT`")
        if path.is_file():
            if path.suffix != ".safetensors":
                raise CheckpointError(f"'{ref}' is a file but not a .safetensors file; give a model folder")
            return cls(path.parent, label, cls._read_safetensors(path), [path], "safetensors")
        for index_name, fmt in (("model.safetensors.index.json", "safetensors"),
                                ("pytorch_model.bin.index.json", "bin")):
            index = path / index_name
            if index.exists():
                return cls._open_index(path, label, index, fmt)
        single = path / "model.safetensors"
        if not single.exists():
            candidates = sorted(path.glob("*.safetensors"))
            single = candidates[0] if len(candidates) == 1 else single
        if single.exists():
            return cls(path, label, cls._read_safetensors(single), [single], "safetensors")
        binfile = path / "pytorch_model.bin"
        if binfile.exists():
            return cls(path, label, cls._read_bin_headers(binfile), [binfile], "bin")
        raise CheckpointError(
            f"no weights in folder '{path}': expected model.safetensors, model.safetensors.index.json with "
            f"its shards, pytorch_model.bin or pytorch_model.bin.index.json"
        )

    @classmethod
    def _open_index(cls, folder: Path, label: str, index: Path, fmt: str) -> "Checkpoint":
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            assert isinstance(weight_map, dict)
        except Exception as e:
            raise CheckpointError(f"index '{index}' is not a valid weight index (expected JSON with a 'weight_map'): {e}")
        tensors: Dict[str, TensorInfo] = {}
        files = []
        for shard_name in sorted(set(weight_map.values())):
            shard = folder / shard_name
            if not shard.exists():
                raise CheckpointError(f"shard '{shard}' listed in '{index}' does not exist")
            files.append(shard)
            infos = cls._read_safetensors(shard) if fmt == "safetensors" else cls._read_bin_headers(shard)
            for name, info in infos.items():
                if weight_map.get(name) == shard_name:
                    tensors[name] = info
        missing = [n for n, s in weight_map.items() if n not in tensors]
        if missing:
            raise CheckpointError(
                f"tensor '{missing[0]}' is listed in '{index}' under shard '{weight_map[missing[0]]}' "
                f"but that shard does not hold it" + (f" ({len(missing) - 1} more)" if len(missing) > 1 else "")
            )
        return cls(folder, label, tensors, files, fmt)

    @staticmethod
    def _read_safetensors(path: Path) -> Dict[str, TensorInfo]:
        try:
            with safe_open(str(path), framework="pt") as f:  # validates the header and the data's extent
                out = {}
                for name in f.keys():
                    sl = f.get_slice(name)
                    dtype = _ST_DTYPES.get(sl.get_dtype())
                    if dtype is None:
                        raise CheckpointError(f"tensor '{name}' in '{path}' has unsupported dtype {sl.get_dtype()}")
                    out[name] = TensorInfo(name, dtype, tuple(sl.get_shape()), path)
            with open(path, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(n))
            for name, info in out.items():
                out[name] = TensorInfo(info.name, info.dtype, info.shape, path, 8 + n + header[name]["data_offsets"][0])
            return out
        except SafetensorError as e:
            raise CheckpointError(f"'{path}' is not a valid safetensors file (truncated or corrupt?): {e}")
        except (OSError, ValueError) as e:
            raise CheckpointError(f"cannot read '{path}': {e}")

    @staticmethod
    def _load_bin(path: Path) -> dict:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:
            # Legacy (non-zip) pickles cannot be memory-mapped; still weights-only.
            try:
                state = torch.load(str(path), map_location="cpu", weights_only=True)
            except Exception as e:
                raise CheckpointError(f"cannot load '{path}' with weights_only=True (corrupt or unsafe pickle?): {e}")
        except Exception as e:
            raise CheckpointError(f"cannot load '{path}' with weights_only=True (corrupt or unsafe pickle?): {e}")
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"'{path}' does not hold a flat state dict of tensors")
        return state

    @classmethod
    def _read_bin_headers(cls, path: Path) -> Dict[str, TensorInfo]:
        state = cls._load_bin(path)
        return {k: TensorInfo(k, v.dtype, tuple(v.shape), path) for k, v in state.items()}

    # ------------------------------------------------------------------ reading
    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(f"tensor '{name}' is missing from model '{self.label}' ({self.path})")

    def read(self, name: str, rows: Optional[tuple] = None, dtype: Optional[torch.dtype] = None,
             device: str = "cpu") -> torch.Tensor:
        """The tensor ``name`` (rows ``[start, stop)`` of dim 0 if given) as ``dtype`` on ``device``.

        ``dtype=None`` keeps the stored dtype. The result owns its memory: nothing stays mapped
        after the call, and the stored bytes are copied once (straight into the converted tensor).
        """
        info = self.info(name)
        if self.format == "bin":
            state = self._bin_cache.get(info.file)
            if state is None:
                state = self._bin_cache[info.file] = self._load_bin(info.file)
            t = state[name]
            return owned_tensor(t[rows[0]:rows[1]] if rows else t, dtype, device)
        try:
            t = self._pread(info, rows)
        except OSError as e:
            raise CheckpointError(f"cannot read tensor '{name}' from '{info.file}': {e}")
        return t.to(device=device, dtype=dtype or t.dtype)  # t is a buffer of our own already

    # ------------------------------------------------------------------ metadata
    def config(self) -> Optional[dict]:
        """The folder's ``config.json`` (read once), or None if there is none; a file that is not a
        JSON object is a :class:`CheckpointError` naming it."""
        if not hasattr(self, "_config"):
            self._config = self._read_config()
        return self._config

    def _read_config(self) -> Optional[dict]:
        cfg = self.path / "config.json"
        if not cfg.exists():
            return None
        try:
            data = json.loads(cfg.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"'{cfg}' (config of model '{self.label}') is not valid JSON: {e}")
        except (OSError, UnicodeDecodeError) as e:
            raise CheckpointError(f"cannot read '{cfg}' (config of model '{self.label}'): {e}")
        if not isinstance(data, dict):
            raise CheckpointError(f"'{cfg}' (config of model '{self.label}') is not a JSON object but a "
                                  f"{type(data).__name__}: expected a Hugging Face config")
        return data

    def fingerprint(self) -> dict:
        """Sizes and header hashes of every weight file: identifies the inputs without hashing data."""
        return {
            "path": str(self.path.resolve()),
            "format": self.format,
            "files": [
                {"name": f.name, "bytes": f.stat().st_size,
                 "header_sha256": _header_digest(f) if self.format == "safetensors" else None}
                for f in self.files
            ],
            "tensors": len(self.tensors),
        }
