"""A PyTorch optimizer checkpoint (``optimizer.pt``) read as a checkpoint of Adam second moments.

The Hugging Face Trainer saves ``torch.save(optimizer.state_dict())`` beside each checkpoint:
``{"state": {index: {"step", "exp_avg", "exp_avg_sq", ...}}, "param_groups": [{"params": [index, ...],
...}, ...]}``. The parameters are numbered, not named, so the indices are mapped to parameter names:

1. If every param group stores ``param_names`` (optimizers built from ``model.named_parameters()``),
   those names are used.
2. Otherwise the Trainer's grouping is rebuilt from the model's architecture, instantiated from the
   model folder's ``config.json`` on the meta device (no weights read): the class named in
   ``architectures`` (the one ``from_pretrained`` builds), else ``AutoModel``. The Trainer puts
   ``model.named_parameters()`` (tied parameters once, in that order) into two groups: first those that
   get weight decay, then the rest. A parameter gets no decay if it lies inside an ``nn.LayerNorm``, or
   if its lower-cased name contains ``bias``, ``layernorm`` or ``rmsnorm``, or has a ``norm`` or
   ``*_norm`` component (transformers' ``Trainer.get_decay_parameter_names`` as of 5.24). Two
   fallbacks are tried after it: the older rule (``nn.LayerNorm`` modules and ``bias`` only) and a
   single group of all parameters (``AdamW(model.parameters())``).
3. The assignment is verified: each group's parameter count and every state tensor's shape must match
   the names assigned. Otherwise a :class:`CheckpointError` names the file, the first mismatching
   index and name, and the expected and found shapes.

A parameter with no state (never stepped) is simply absent from :attr:`tensors`.

Adafactor keeps, for a tensor of two or more dimensions, only the running means of the squared
gradient over its last dimension (``exp_avg_sq_row``, shape ``[..., m]``) and over its second-to-last
(``exp_avg_sq_col``, shape ``[..., n]``). Its update multiplies the gradient by transformers'
``Adafactor._approx_sq_grad(row, col) = rsqrt(row / mean(row)) * rsqrt(col)`` (outer product), the
inverse square root of the rank-1 estimate ``v[..., i, j] = row[..., i] / mean(row[..., :]) * col[..., j]``
(the same ``r c^T / total`` as OTA's ``rank1_approx``). :meth:`OptimizerStateCheckpoint.read` returns
that ``v`` (0 where ``mean(row)`` is 0); Adafactor's vectors keep a dense ``exp_avg_sq``.

Files are loaded with ``torch.load(map_location="cpu", weights_only=True, mmap=True)`` only: never
unpickled arbitrarily. Reads go through one mapping of the file, made afresh after every GiB read, so
the pages of the whole file do not stay resident in the process (loading costs ~0.1 s per thousand
tensors, too much to repeat for every tensor).
"""

from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from mergelab.errors import CheckpointError
from mergelab.io.checkpoint import TensorInfo, owned_tensor

OPTIMIZER_FILE = "optimizer.pt"
REMAP_BYTES = 1 << 30  # bytes read through one mapping of the file before it is mapped afresh
OPTIMIZER_SUFFIXES = (".pt", ".bin")
# Safetensors files of a Hugging Face checkpoint folder that hold the model itself, not second moments.
_MODEL_WEIGHTS = re.compile(r"^(model|adapter_model)(-\d+-of-\d+)?\.safetensors$")
# Lower-cased parameter names the Trainer exempts from weight decay (besides nn.LayerNorm modules).
_NO_DECAY_NAMES = re.compile(r"bias|layernorm|rmsnorm|(^|\.)norm($|\.)|_norm($|\.)")
_HINT = ("save the second moments as a safetensors file of exp_avg_sq tensors named like the parameters "
         "instead (e.g. {name: optimizer.state[p]['exp_avg_sq'] for name, p in model.named_parameters()})")


def optimizer_state_path(ref: str) -> Optional[Path]:
    """The optimizer file ``ref`` names, or ``None`` when ``ref`` is a safetensors file or folder.

    ``ref`` names an optimizer state when it is a file ending in ``.pt`` or ``.bin`` (its content is
    checked when opened), or a folder holding ``optimizer.pt`` and no safetensors file besides the
    model's own weights (``model.safetensors``, ``model-*-of-*.safetensors``, ``adapter_model.safetensors``):
    a Hugging Face Trainer checkpoint folder.
    """
    path = Path(os.path.expanduser(ref))
    if path.is_file():
        return path if path.suffix in OPTIMIZER_SUFFIXES else None
    if path.is_dir() and (path / OPTIMIZER_FILE).is_file():
        if not any(not _MODEL_WEIGHTS.match(p.name) for p in path.glob("*.safetensors")):
            return path / OPTIMIZER_FILE
    return None


def _load(path: Path) -> Any:
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise CheckpointError(
            f"cannot load optimizer state '{path}' with torch.load(weights_only=True, mmap=True) (corrupt, "
            f"unsafe or legacy-format pickle?): {e}. Re-save it with torch.save(optimizer.state_dict(), ...) "
            f"or {_HINT}"
        ) from None


def _is_optimizer_state(obj: Any) -> bool:
    return (isinstance(obj, dict) and isinstance(obj.get("state"), dict)
            and isinstance(obj.get("param_groups"), list)
            and all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in obj["param_groups"]))


def _shape(t: Any) -> Optional[tuple]:
    return tuple(t.shape) if isinstance(t, torch.Tensor) else None


def _fmt(shape: Optional[tuple]) -> str:
    return "none" if shape is None else "(" + ", ".join(str(d) for d in shape) + ")"


@dataclass(frozen=True)
class _Entry:
    index: Any            # key in the optimizer's "state"
    factored: bool        # Adafactor exp_avg_sq_row / exp_avg_sq_col instead of exp_avg_sq


def _entry_shape(st: dict) -> Tuple[Optional[tuple], bool, Optional[torch.dtype]]:
    """(shape of the dense second moments, factored?, dtype) of one state entry; shape None if absent."""
    if isinstance(st.get("exp_avg_sq"), torch.Tensor):
        t = st["exp_avg_sq"]
        return tuple(t.shape), False, t.dtype
    row, col = st.get("exp_avg_sq_row"), st.get("exp_avg_sq_col")
    if isinstance(row, torch.Tensor) and isinstance(col, torch.Tensor) and row.dim() >= 1 and col.dim() >= 1 \
            and tuple(row.shape[:-1]) == tuple(col.shape[:-1]):
        return tuple(row.shape) + (col.shape[-1],), True, row.dtype
    return None, False, None


def factored_second_moments(row: torch.Tensor, col: torch.Tensor, rows: Optional[tuple] = None) -> torch.Tensor:
    """Adafactor's dense estimate ``v[..., i, j] = row[..., i] / mean(row[..., :]) * col[..., j]`` (float32).

    The inverse square of transformers' ``Adafactor._approx_sq_grad(row, col)``; rows of zero mean
    give 0. ``rows`` selects ``[start, stop)`` of dim 0 of the result without building the rest.
    """
    row = row.float()
    mean = row.mean(-1, keepdim=True)
    if rows is not None:
        if row.dim() > 1:  # a tensor of 3+ dims: dim 0 is a batch dim of row, mean and col
            mean, col = mean[rows[0]:rows[1]], col[rows[0]:rows[1]]
        row = row[rows[0]:rows[1]]
    positive = mean > 0
    r = torch.where(positive, row / torch.where(positive, mean, torch.ones_like(mean)), torch.zeros_like(row))
    return r.unsqueeze(-1) * col.float().unsqueeze(-2)


# ---------------------------------------------------------------------------------------------
# Naming the optimizer's parameters.


def _meta_model(folder: Path, optimizer: Path) -> torch.nn.Module:
    """The model in ``folder`` (its ``config.json``) instantiated on the meta device."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import transformers
    from transformers import AutoConfig, AutoModel

    try:
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:
        raise CheckpointError(
            f"optimizer state '{optimizer}' has no param_names, so its parameters are named from the model's "
            f"architecture, but '{folder}/config.json' cannot be read: {e}. Either {_HINT}, or give a model "
            f"folder with its config.json"
        ) from None
    classes: List[Any] = []
    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None) if isinstance(arch, str) else None
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            classes.append(cls)
    errors = []
    for cls in classes + [AutoModel]:
        try:
            with torch.device("meta"):
                return AutoModel.from_config(config) if cls is AutoModel else cls(config)
        except Exception as e:  # an architecture transformers cannot build offline: try the next
            errors.append(f"{cls.__name__}: {e}")
    raise CheckpointError(
        f"optimizer state '{optimizer}' has no param_names and the architecture of '{folder}' cannot be "
        f"instantiated to name its parameters ({'; '.join(errors)}); {_HINT}"
    )


def _in_layernorm(model: torch.nn.Module, name: str) -> bool:
    parts = name.split(".")[:-1]
    for k in range(1, len(parts) + 1):
        if isinstance(model.get_submodule(".".join(parts[:k])), torch.nn.LayerNorm):
            return True
    return False


def trainer_groupings(model: torch.nn.Module) -> List[Tuple[str, List[List[Tuple[str, tuple]]]]]:
    """Candidate groupings ``(description, [[(name, shape), ...] per group])``, most likely first."""
    params = [(n, tuple(p.shape)) for n, p in model.named_parameters() if p.requires_grad]
    layernorm = {n for n, _ in params if _in_layernorm(model, n)}

    def split(no_decay) -> List[List[Tuple[str, tuple]]]:
        decay = [(n, s) for n, s in params if n not in layernorm and not no_decay(n.lower())]
        rest = [(n, s) for n, s in params if n in layernorm or no_decay(n.lower())]
        return [decay, rest]

    return [
        ("the Hugging Face Trainer's two groups (weight decay, then none)",
         split(lambda n: bool(_NO_DECAY_NAMES.search(n)))),
        ("the older Trainer's two groups (decay unless bias or nn.LayerNorm)", split(lambda n: "bias" in n)),
        ("one group of all parameters", [params]),
    ]


def _shape_mismatch(state: dict, groups: list, named: List[List[Tuple[str, tuple]]]) -> Optional[str]:
    """Why ``named`` (names and expected shapes per param group) does not fit the file, or ``None``."""
    if len(named) != len(groups):
        return f"it has {len(groups)} param group(s), expected {len(named)}"
    for g, (group, names) in enumerate(zip(groups, named)):
        for index, (name, shape) in zip(group["params"], names):
            found, _, _ = _entry_shape(state[index]) if index in state else (shape, False, None)
            if found != shape:
                return (f"index {index} (param group {g}) is assigned '{name}' of shape {_fmt(shape)} but its "
                        f"exp_avg_sq has shape {_fmt(found)}")
        if len(group["params"]) != len(names):
            return (f"param group {g} holds {len(group['params'])} parameters, expected {len(names)}"
                    + (f" (first unmatched: '{names[len(group['params'])][0]}')"
                       if len(group["params"]) < len(names) else
                       f" (first unmatched: index {group['params'][len(names)]})"))
    return None


def _with_checkpoint_names(name: str, model: torch.nn.Module, known: set) -> str:
    """``name`` as the model checkpoint spells it (with or without the base model prefix)."""
    if name in known:
        return name
    prefix = getattr(model, "base_model_prefix", "") or ""
    if prefix and name.startswith(prefix + ".") and name[len(prefix) + 1:] in known:
        return name[len(prefix) + 1:]
    if prefix and f"{prefix}.{name}" in known:
        return f"{prefix}.{name}"
    return name


class OptimizerStateCheckpoint:
    """The second moments in a PyTorch optimizer checkpoint, named like the model's parameters.

    Same reading interface as :class:`~mergelab.io.checkpoint.Checkpoint`: ``tensors``, ``label``,
    ``path``, ``info(name)``, ``read(name, rows, dtype, device)``.
    """

    format = "optimizer"

    def __init__(self, path: Path, label: str, entries: Dict[str, _Entry], tensors: Dict[str, TensorInfo],
                 naming: str, mapped: Optional[dict] = None):
        self.path = path
        self.label = label
        self.files = [path]
        self.entries = entries
        self.tensors = tensors
        self.naming = naming
        self._lock = threading.Lock()
        self._mapped: Optional[dict] = mapped  # the file's "state", memory-mapped
        self._mapped_bytes = 0

    @classmethod
    def open(cls, path: Path, label: str, model: Any = None) -> "OptimizerStateCheckpoint":
        """Open the optimizer file ``path``; ``model`` is the opened checkpoint of the model it trained
        (its folder's ``config.json`` names the parameters when the file has no ``param_names``)."""
        path = Path(path)
        obj = _load(path)
        if not _is_optimizer_state(obj):
            raise CheckpointError(
                f"'{path}' is not an optimizer state: expected torch.save(optimizer.state_dict()), a dict with "
                f"'state' and 'param_groups'. second_moments takes such a file (.pt/.bin), a Hugging Face "
                f"checkpoint folder with optimizer.pt, or a safetensors file or folder of exp_avg_sq tensors "
                f"named like the parameters"
            )
        state, groups = obj["state"], obj["param_groups"]
        listed = {i for g in groups for i in g["params"]}
        stray = [i for i in state if i not in listed]
        if stray:
            raise CheckpointError(f"optimizer state '{path}' is inconsistent: state entry {stray[0]} is in no "
                                  f"param group; {_HINT}")
        shapes = {i: _entry_shape(st) for i, st in state.items()}
        bad = [i for i, (s, _, _) in shapes.items() if s is None]
        if bad:
            keys = ", ".join(sorted(str(k) for k in state[bad[0]])) or "nothing"
            raise CheckpointError(
                f"optimizer state '{path}': entry {bad[0]} holds no Adam exp_avg_sq (nor Adafactor's "
                f"exp_avg_sq_row/exp_avg_sq_col), only {keys}; {_HINT}"
            )
        known = set(getattr(model, "tensors", {}) or {})
        if groups and all(isinstance(g.get("param_names"), list) for g in groups):
            naming = "param_names"
            named = []
            for g in groups:
                if len(g["param_names"]) != len(g["params"]):
                    raise CheckpointError(f"optimizer state '{path}': a param group lists {len(g['params'])} "
                                          f"parameters but {len(g['param_names'])} param_names; {_HINT}")
                names = [str(n) for n in g["param_names"]]
                named.append([(n, model.tensors[n].shape if n in known else shapes[i][0] if i in shapes else None)
                              for n, i in zip(names, g["params"])])
            why = _shape_mismatch(state, groups, named)
            if why:
                raise CheckpointError(f"optimizer state '{path}' does not match model "
                                      f"'{getattr(model, 'label', '?')}': {why}; {_HINT}")
        else:
            folder = _config_folder(path, model)
            meta = _meta_model(folder, path)
            candidates = trainer_groupings(meta)
            named = None
            reasons = []
            for naming, cand in candidates:
                why = _shape_mismatch(state, groups, cand)
                if why is None:
                    named = [[(_with_checkpoint_names(n, meta, known), s) for n, s in g] for g in cand]
                    break
                reasons.append(why)
            if named is None:
                raise CheckpointError(
                    f"optimizer state '{path}' has no param_names and does not match the parameters of "
                    f"'{folder}' ({type(meta).__name__}) grouped as the Hugging Face Trainer does: {reasons[0]} "
                    f"(saved for another model, or with frozen parameters or custom param groups?); {_HINT}"
                )
        entries: Dict[str, _Entry] = {}
        tensors: Dict[str, TensorInfo] = {}
        for group, names in zip(groups, named):
            for index, (name, _) in zip(group["params"], names):
                if index not in state:
                    continue  # never stepped: no second moments
                shape, factored, dtype = shapes[index]
                entries[name] = _Entry(index, factored)
                tensors[name] = TensorInfo(name, dtype, shape, path)
        return cls(path, label, entries, tensors, naming, mapped=state)

    # ------------------------------------------------------------------ reading
    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(f"tensor '{name}' is missing from {self.label} ('{self.path}'): the optimizer "
                                  f"holds no state for it")

    def read(self, name: str, rows: Optional[tuple] = None, dtype: Optional[torch.dtype] = None,
             device: str = "cpu") -> torch.Tensor:
        """The second moments of ``name`` (rows ``[start, stop)`` of dim 0 if given) as ``dtype`` on ``device``.

        The result owns its memory. The file stays mapped between reads (loading it costs ~0.1 s per
        thousand tensors) and is mapped afresh after every :data:`REMAP_BYTES` read through it, so at most
        about that much of its pages stays resident in the process.
        """
        info = self.info(name)
        entry = self.entries[name]
        with self._lock:
            if self._mapped is None or self._mapped_bytes >= REMAP_BYTES:
                self._mapped = None  # drop the previous mapping before making the next
                self._mapped = _load(self.path)["state"]
                self._mapped_bytes = 0
            st = self._mapped[entry.index]
            if entry.factored:
                row, col = st["exp_avg_sq_row"], st["exp_avg_sq_col"]
                self._mapped_bytes += row.nbytes + col.nbytes
                v = factored_second_moments(row, col, rows)
                return v.to(device=device, dtype=dtype or info.dtype)
            t = st["exp_avg_sq"]
            if rows is not None and t.dim() > 0:
                t = t[rows[0]:rows[1]]
            self._mapped_bytes += t.nbytes
            return owned_tensor(t, dtype, device)

    def release(self) -> None:
        """Unmap the file (the next read maps it again)."""
        with self._lock:
            self._mapped = None

    def config(self) -> None:
        return None

    def fingerprint(self) -> dict:
        return {"path": str(self.path.resolve()), "format": self.format, "naming": self.naming,
                "files": [{"name": self.path.name, "bytes": self.path.stat().st_size}],
                "tensors": len(self.tensors)}


def _config_folder(optimizer: Path, model: Any) -> Path:
    """The folder whose config.json describes the model: the model's own, else the optimizer's."""
    folder = getattr(model, "path", None)
    if folder is not None and (Path(folder) / "config.json").is_file():
        return Path(folder)
    if (optimizer.parent / "config.json").is_file():
        return optimizer.parent
    raise CheckpointError(
        f"optimizer state '{optimizer}' has no param_names, so its parameters are named from the model's "
        f"architecture, but neither the model folder '{folder}' nor '{optimizer.parent}' has a config.json; {_HINT}"
    )
