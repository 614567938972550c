"""A base checkpoint with a PEFT LoRA adapter applied lazily, and the one factory that opens models.

:func:`open_model` is how every recipe reference is opened:

* a path that exists is a model folder or file (:class:`~mergelab.io.checkpoint.Checkpoint`), even
  when its name contains ``+`` (``exp+1/``): an existing path is never split;
* ``BASE+ADAPTER`` (mergekit's syntax; the recipe form ``model: {adapter: PATH}`` is rewritten to
  ``BASE_MODEL+PATH`` by :mod:`mergelab.recipe`) is :class:`AdaptedCheckpoint` over ``BASE`` with the
  PEFT LoRA folder ``ADAPTER``. When several ``+`` could split the reference, the split whose two
  sides both exist is taken; none or more than one is an error naming the reference;
* a bare adapter folder is refused with the two ways to name its base.

:class:`AdaptedCheckpoint` has :class:`Checkpoint`'s reading interface (``tensors``, ``info``,
``read(name, rows, dtype, device)``, ``config()``, ``fingerprint()``). Reading an adapted tensor
reads the base's rows and adds ``s * (B @ A)[rows]`` (:meth:`LoraModule.delta
<mergelab.io.peft_adapter.LoraModule.delta>`) in float32 (float64 if asked) before the cast to the
requested dtype: nothing is densified ahead of time, so memory stays bounded by the tensor (or row
range) being read. Tensors an adapter saves whole (``modules_to_save``) replace the base's; the copy of a
tied output head that PEFT saves next to the embedding (``ensure_weight_tying``) is dropped when the base
stores no head and the copy equals the saved embedding.
mergekit instead merges the adapter into a cached dense copy of the model first (PEFT's
``merge_and_unload`` in the checkpoint's dtype); here the sum is formed in float32 and rounded once.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

from mergelab.errors import CheckpointError
from mergelab.io.checkpoint import Checkpoint, owned_tensor
from mergelab.io.peft_adapter import (CONFIG_NAME, LoraAdapter, is_adapter_folder, read_lora,
                                      recorded_base_mismatch)


def _exists(p: str) -> bool:
    return Path(os.path.expanduser(p)).exists()


def split_adapter_ref(ref: str) -> Optional[Tuple[str, str]]:
    """``(base, adapter)`` if ``ref`` is ``BASE+ADAPTER``, None if it is a plain reference.

    An existing path is never split. Otherwise the one split at a ``+`` whose two sides both exist is
    taken; if no split has both sides existing, mergekit's single-``+`` reading is used when there is
    exactly one ``+`` (so that the missing side is reported by name), else an error.
    """
    if "+" not in ref or _exists(ref):
        return None
    parts = ref.split("+")
    splits = [("+".join(parts[:i]), "+".join(parts[i:])) for i in range(1, len(parts))]
    both = [s for s in splits if _exists(s[0]) and _exists(s[1])]
    if len(both) == 1:
        return both[0]
    if len(both) > 1:
        raise CheckpointError(f"model '{ref}' can be read as BASE+ADAPTER in {len(both)} ways "
                              f"({', '.join(a + ' + ' + b for a, b in both)}); rename a folder or use "
                              f"model: {{adapter: PATH}} with base_model")
    if len(splits) == 1:
        return splits[0]
    raise CheckpointError(f"model '{ref}' does not exist, and no way of reading it as BASE+ADAPTER names two "
                          f"existing paths")


def open_model(ref: str, label: Optional[str] = None):
    """Open the model that recipe reference ``ref`` names (see the module docstring)."""
    split = split_adapter_ref(ref)
    if split is None:
        if is_adapter_folder(ref):
            raise CheckpointError(f"model '{ref}' is a PEFT adapter folder (it has {CONFIG_NAME}), not a model: write "
                                  f"it as BASE+{ref} or as model: {{adapter: {ref}}} with base_model set")
        return Checkpoint.open(ref, label=label)
    base_ref, adapter_ref = split
    if not _exists(adapter_ref):
        raise CheckpointError(f"adapter '{adapter_ref}' (in model '{ref}') does not exist")
    if not is_adapter_folder(adapter_ref):
        raise CheckpointError(f"'{adapter_ref}' (in model '{ref}') is not a PEFT adapter folder: "
                              f"'{Path(adapter_ref) / CONFIG_NAME}' is missing")
    base = Checkpoint.open(base_ref, label=base_ref)
    return AdaptedCheckpoint(base, read_lora(adapter_ref), label or ref)



def adapted_state(base, adapter) -> Dict[str, torch.Tensor]:
    """Every tensor of ``BASE+ADAPTER`` (``W + s * B A`` where the adapter changes ``W``) in float32, for
    in-memory use; position-id buffers (not weights) are left out."""
    ckpt = open_model(f"{base}+{adapter}")
    return {name: ckpt.read(name, dtype=torch.float32) for name in ckpt.tensors
            if not name.endswith("position_ids")}

class AdaptedCheckpoint:
    """``base`` with ``adapter`` applied tensor by tensor on read (see the module docstring).

    Refused when built (:class:`CheckpointError`): an adapter whose recorded local base differs from
    ``base``; a target module with no ``<module>.weight`` in the base; a factor pair whose ``B @ A``
    shape is not the base tensor's; a saved full tensor the base lacks or of another shape.
    """

    def __init__(self, base: Checkpoint, adapter: LoraAdapter, label: str):
        self.base = base
        self.adapter = adapter
        self.label = label
        self.path = base.path
        self.files = base.files
        self.format = "adapted"  # never read around read(): the adapter must be applied
        where = f"adapter '{adapter.folder}'"
        mismatch = recorded_base_mismatch(adapter, base.path)
        if mismatch:
            raise CheckpointError(mismatch)
        self.modules = adapter.by_weight()
        for name, m in self.modules.items():
            info = base.tensors.get(name)
            if info is None:
                raise CheckpointError(f"{where}: target module '{m.name}' is absent from the base '{base.path}' (no "
                                      f"tensor '{name}'): the adapter is for another architecture or naming")
            if tuple(info.shape) != tuple(m.delta_shape):
                raise CheckpointError(f"{where}: module '{m.name}' gives a delta of shape {tuple(m.delta_shape)} "
                                      f"(lora_B {tuple(m.B.shape)} @ lora_A {tuple(m.A.shape)}) but the base "
                                      f"'{base.path}' has '{name}' of shape {tuple(info.shape)}: adapter of another "
                                      f"base")
        self.full: Dict[str, torch.Tensor] = dict(adapter.full)
        for name in [n for n in self.full if n not in base.tensors]:
            if self._tied_copy(name, base):
                del self.full[name]  # PEFT's copy of a tied head (ensure_weight_tying): the embedding carries it
        for name, t in self.full.items():
            info = base.tensors.get(name)
            if info is None or tuple(info.shape) != tuple(t.shape):
                got = "is absent" if info is None else f"has shape {tuple(info.shape)}"
                raise CheckpointError(f"{where}: saved module tensor '{name}' (modules_to_save) of shape "
                                      f"{tuple(t.shape)} does not fit the base '{base.path}', where it {got}")
        self.tensors: Dict[str, TensorInfo] = dict(base.tensors)

    def _tied_copy(self, name: str, base: Checkpoint) -> bool:
        """True when saved tensor ``name`` is an output head the base does not store (tied embeddings) and
        the adapter saves an embedding the base does store with the very same values."""
        if not (base.config() or {}).get("tie_word_embeddings") or not name.endswith("lm_head.weight"):
            return False
        t = self.full[name]
        return any(other in base.tensors and other.endswith("embed_tokens.weight") and other_t.shape == t.shape
                   and torch.equal(other_t, t) for other, other_t in self.full.items())

    info = Checkpoint.info  # same lookup and error over this class's ``tensors``, ``label`` and ``path``

    def read(self, name: str, rows: Optional[tuple] = None, dtype: Optional[torch.dtype] = None,
             device: str = "cpu") -> torch.Tensor:
        """As :meth:`Checkpoint.read`, with the adapter applied: ``W[rows] + s * (B @ A)[rows]``."""
        info = self.info(name)
        full = self.full.get(name)
        if full is not None:
            t = full[rows[0]:rows[1]] if rows is not None and full.dim() else full
            return owned_tensor(t, dtype or info.dtype, device)
        m = self.modules.get(name)
        if m is None:
            return self.base.read(name, rows, dtype, device)
        work = torch.float64 if dtype == torch.float64 else torch.float32
        w = self.base.read(name, rows, work, device)
        w.add_(m.delta(rows, work, device))
        out = dtype or info.dtype
        return w if out == work else w.to(out)

    def config(self) -> Optional[dict]:
        return self.base.config()

    def fingerprint(self) -> dict:
        return {**self.base.fingerprint(), "adapter": self.adapter.fingerprint()}
