"""Sharded safetensors output written in place, tensor by tensor, with resumable shards.

Every output tensor's name, dtype and shape is known from the plan before any is computed, so each
shard's safetensors header (and so every tensor's byte offset) is fixed up front. A shard is created
as ``<name>.incomplete`` at its final size with its header, each tensor (or row chunk) is written at its
offset as soon as it is computed, and the file is renamed to its final name when its last byte lands.
Nothing is buffered beyond the tensor being written: memory does not grow with the shard size.

``--resume`` keeps shards that are complete (final name, right size, same plan fingerprint) and redoes
the rest, so a killed merge ends with the same bytes as an uninterrupted one.

An operating-system error while writing (no space left, quota exceeded, permission lost) becomes an
:class:`OutputWriteError` naming the file and what failed; the completed shards stay, so ``--resume``
continues once the cause is fixed.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

import torch

from mergelab.errors import OutputError

_ST_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
PROGRESS_FILE = ".mergelab-progress.json"


class OutputWriteError(OutputError):
    """Writing the output failed at the operating-system level (no space, quota, permission...).

    Raised with the file and the operation; ``OUT.partial`` keeps its completed shards (the merge
    removes the unfinished ones), so the same command with ``--resume`` continues once it is fixed.
    """

    def __init__(self, what: str, path, error: OSError, partial=None):
        self.path = path
        self.error = error
        code = error.errno
        reason = error.strerror or str(error)
        if code in (errno.ENOSPC, errno.EDQUOT):
            fix = "free some space on that filesystem (or raise the quota)"
        elif code in (errno.EACCES, errno.EPERM, errno.EROFS):
            fix = "make the folder writable again"
        else:
            fix = "fix the cause"
        kept = f"; the shards completed so far are kept in '{partial}'" if partial else ""
        super().__init__(
            f"cannot {what} '{path}': {reason} (errno {errno.errorcode.get(code, code)}). The merge stopped{kept}: "
            f"{fix}, then run the same command with --resume to continue where it stopped"
        )


def parse_size(text) -> int:
    """Bytes from ``5GB``, ``500MB``, ``2GiB``, ``1e9`` or an int. Decimal units are powers of 10."""
    if isinstance(text, int):
        return text
    s = str(text)
    try:
        return int(float(s))
    except ValueError:
        pass
    m = _SIZE.match(s)
    unit = (m.group(2) or "").lower() if m else None
    if not m or unit not in _UNITS:
        raise OutputError(f"--shard-size '{text}' is not a size; expected bytes like 5GB, 500MB, 2GiB or 1000000")
    return int(float(m.group(1)) * _UNITS[unit])


@dataclass
class ShardEntry:
    name: str
    dtype: torch.dtype
    shape: tuple
    offset: int = 0  # from the start of the data section

    @property
    def nbytes(self) -> int:
        return self.dtype.itemsize * math.prod(self.shape)


@dataclass
class Shard:
    filename: str
    entries: List[ShardEntry] = field(default_factory=list)
    header: bytes = b""

    @property
    def data_bytes(self) -> int:
        return sum(e.nbytes for e in self.entries)

    @property
    def file_bytes(self) -> int:
        return len(self.header) + self.data_bytes


def _header(entries: List[ShardEntry]) -> bytes:
    meta: Dict[str, dict] = {"__metadata__": {"format": "pt"}}
    for e in entries:
        meta[e.name] = {"dtype": _ST_NAMES[e.dtype], "shape": list(e.shape),
                        "data_offsets": [e.offset, e.offset + e.nbytes]}
    body = json.dumps(meta, separators=(",", ":")).encode()
    body += b" " * (-(len(body) + 8) % 8)
    return len(body).to_bytes(8, "little") + body


def layout_shards(tensors: Iterable[Tuple[str, torch.dtype, tuple]], max_bytes: int) -> List[Shard]:
    """Pack tensors, in order, into shards of at most ``max_bytes`` per file (header included).

    A tensor larger than ``max_bytes`` gets a shard of its own. Inside a shard, tensors are laid out by
    decreasing element size so every tensor is aligned to its element size.
    """
    groups: List[List[ShardEntry]] = [[]]
    size = 0
    for name, dtype, shape in tensors:
        e = ShardEntry(name, dtype, tuple(shape))
        cost = e.nbytes + 64 + len(name) + 12 * len(shape)
        if groups[-1] and size + cost > max_bytes - 64:
            groups.append([])
            size = 0
        groups[-1].append(e)
        size += cost
    n = len(groups)
    shards = []
    for i, group in enumerate(groups):
        order = sorted(range(len(group)), key=lambda k: (-group[k].dtype.itemsize, k))
        offset = 0
        entries = []
        for k in order:
            group[k].offset = offset
            offset += group[k].nbytes
            entries.append(group[k])
        filename = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        shards.append(Shard(filename, entries, _header(entries)))
    return shards


class ShardWriter:
    """Writes the planned shards into ``folder`` (the ``OUT.partial`` directory).

    A shard is renamed to its final name only once its last byte is written, so a killed or failed
    merge never leaves a shard that looks complete. ``durable`` also fsyncs each shard before the
    rename, so a renamed shard survives an operating-system crash or power loss too. That is off by
    default, as in mergekit, safetensors and transformers' ``save_pretrained``: the final fsync
    waits for the disk (0.3-0.5 s for a 320 MB shard here, about a tenth of a task-arithmetic merge).
    """

    def __init__(self, folder: Path, shards: List[Shard], fingerprint: str, resume: bool = False,
                 durable: bool = False, record_progress: bool = True):
        self.folder = folder
        self.record_progress = record_progress
        self.durable = durable
        self.shards = shards
        self.fingerprint = fingerprint
        self._where: Dict[str, Tuple[Shard, ShardEntry]] = {}
        for s in shards:
            for e in s.entries:
                self._where[e.name] = (s, e)
        self._remaining: Dict[str, int] = {}
        self._fds: Dict[str, int] = {}
        self.completed_on_start: List[str] = []
        self._start(resume)

    def _failed(self, what: str, path: Path, error: OSError) -> OutputWriteError:
        return OutputWriteError(what, path, error, self.folder)

    def _start(self, resume: bool) -> None:
        progress = self.folder / PROGRESS_FILE
        if resume and progress.exists():
            try:
                recorded = json.loads(progress.read_text()).get("plan_fingerprint")
            except json.JSONDecodeError:
                recorded = None
            if recorded != self.fingerprint:
                raise OutputError(
                    f"'{self.folder}' holds a merge of a different recipe, inputs or options; "
                    f"remove it or run with --overwrite to start over"
                )
        try:
            if self.record_progress:  # not by a distributed worker, which writes some of the shards
                progress.write_text(json.dumps({"plan_fingerprint": self.fingerprint}))
        except OSError as e:
            raise self._failed("write", progress, e)
        for s in self.shards:
            final = self.folder / s.filename
            if resume and final.exists() and final.stat().st_size == s.file_bytes:
                with open(final, "rb") as f:
                    if f.read(len(s.header)) == s.header:
                        self.completed_on_start.append(s.filename)
                        continue
            self._remaining[s.filename] = s.data_bytes
            if s.data_bytes == 0:
                self._create(s)
                self._finish_shard(s)

    def bytes_to_write(self) -> int:
        """File bytes of the shards still to write (all of them, unless resuming)."""
        return sum(s.file_bytes for s in self.shards if s.filename in self._remaining)

    def reclaimable_bytes(self) -> int:
        """Disk space held by unfinished shards of an earlier run, which are rewritten from scratch."""
        total = 0
        for name in self._remaining:
            try:
                total += (self.folder / (name + ".incomplete")).stat().st_blocks * 512
            except (OSError, AttributeError):
                pass
        return total

    def _pwrite(self, fd: int, data, pos: int) -> int:
        """One ``os.pwrite``; the only call that writes data (tests inject write errors here)."""
        return os.pwrite(fd, data, pos)

    def _write_all(self, fd: int, data, pos: int) -> None:
        view = memoryview(data).cast("B")
        while view.nbytes:
            written = self._pwrite(fd, view, pos)
            pos += written
            view = view[written:]

    def _create(self, s: Shard) -> int:
        path = self.folder / (s.filename + ".incomplete")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        except OSError as e:
            raise self._failed("create", path, e)
        self._fds[s.filename] = fd
        try:
            os.ftruncate(fd, s.file_bytes)
            self._write_all(fd, s.header, 0)
        except OSError as e:
            raise self._failed("write the header of", path, e)
        return fd

    def _finish_shard(self, s: Shard) -> None:
        fd = self._fds.pop(s.filename)
        path = self.folder / (s.filename + ".incomplete")
        try:
            if self.durable:
                os.fsync(fd)
        except OSError as e:
            os.close(fd)
            raise self._failed("flush", path, e)
        try:
            os.close(fd)
        except OSError as e:  # e.g. NFS reports a failed delayed write here
            raise self._failed("close", path, e)
        try:
            os.replace(path, self.folder / s.filename)
        except OSError as e:
            raise self._failed(f"rename to '{s.filename}'", path, e)
        del self._remaining[s.filename]

    def adopt(self, filenames: Iterable[str]) -> None:
        """Count shards written by other processes (a distributed executor's workers) as complete: each
        must be in the folder under its final name with its planned size and header."""
        for name in filenames:
            s = next(x for x in self.shards if x.filename == name)
            path = self.folder / name
            ok = path.is_file() and path.stat().st_size == s.file_bytes
            if ok:
                with open(path, "rb") as f:
                    ok = f.read(len(s.header)) == s.header
            if not ok:
                raise OutputError(f"shard '{path}' was not written completely by its worker")
            self._remaining.pop(name, None)
            fd = self._fds.pop(name, None)
            if fd is not None:
                os.close(fd)
                (self.folder / (name + ".incomplete")).unlink(missing_ok=True)

    def is_complete(self, name: str) -> bool:
        """Whether the shard holding ``name`` was already complete when the writer started."""
        return self._where[name][0].filename not in self._remaining

    def write(self, name: str, tensor: torch.Tensor, row_start: int = 0) -> None:
        """Write ``tensor`` (all of output tensor ``name``, or its rows from ``row_start``)."""
        shard, entry = self._where[name]
        if tensor.dtype != entry.dtype:
            raise OutputError(f"internal: tensor '{name}' is {tensor.dtype}, planned {entry.dtype}")
        fd = self._fds.get(shard.filename)
        if fd is None:
            fd = self._create(shard)
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        row_bytes = entry.nbytes // entry.shape[0] if entry.shape and entry.shape[0] else 0
        pos = len(shard.header) + entry.offset + row_start * row_bytes
        try:
            self._write_all(fd, data, pos)
        except OSError as e:
            raise self._failed(f"write tensor '{name}' into", self.folder / (shard.filename + ".incomplete"), e)
        self._remaining[shard.filename] -= data.nbytes
        if self._remaining[shard.filename] == 0:
            self._finish_shard(shard)

    def finish(self) -> dict:
        """Write the weight index (sharded output) and return it; every shard must be complete. The
        progress file stays until :meth:`forget_progress`, so that a failure while the other files
        are written still resumes with the fingerprint check."""
        if self._remaining:
            raise OutputError(f"internal: shards not fully written: {sorted(self._remaining)}")
        total = sum(s.data_bytes for s in self.shards)
        index = {"metadata": {"total_size": total},
                 "weight_map": {e.name: s.filename for s in self.shards for e in s.entries}}
        if len(self.shards) > 1:
            path = self.folder / "model.safetensors.index.json"
            try:
                path.write_text(json.dumps(index, indent=2))
            except OSError as e:
                raise self._failed("write", path, e)
        return index

    def forget_progress(self) -> None:
        """Remove the progress file: the folder is complete and about to be published."""
        (self.folder / PROGRESS_FILE).unlink(missing_ok=True)

    def close(self) -> None:
        for fd in self._fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds.clear()

    def discard_unfinished(self) -> None:
        """Close and delete the unfinished shards (``*.incomplete``), freeing their space after a failed
        write; the completed ones stay for ``--resume``, which rewrites the rest from scratch."""
        self.close()
        for name in self._remaining:
            try:
                (self.folder / (name + ".incomplete")).unlink(missing_ok=True)
            except OSError:
                pass
