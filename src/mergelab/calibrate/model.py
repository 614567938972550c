"""Models seen by calibration: a module, what its outputs mean, and its checkpoint's tensor names.

Statistics are stored under the names of the *checkpoint* tensors they belong to, because the merge
engine looks an auxiliary input up by the name of the tensor being merged. A Hugging Face module's
parameter names can differ from its file's names (GPT-2 files store ``h.0.attn.c_attn.weight`` for the
module's ``transformer.h.0.attn.c_attn.weight``), and tied parameters have several names; the
:class:`CalibrationModel` keeps the map.

Three kinds of model are understood:

* ``classifier``: ``logits [B, C]`` per example (``*ForSequenceClassification``, or any module with a
  ``logits_fn``), e.g. a BERT encoder with a task head;
* ``causal_lm``: ``logits [B, T, V]``; the prediction at position ``t`` is scored against token
  ``t + 1`` (``*ForCausalLM``, ``GPT2LMHeadModel``);
* ``encoder``: no logits (a bare ``BertModel``); only Gram matrices and activations can be collected.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from mergelab.errors import CheckpointError, MergeLabError

CLASSIFIER = "classifier"
CAUSAL_LM = "causal_lm"
ENCODER = "encoder"
KINDS = (CLASSIFIER, CAUSAL_LM, ENCODER)


@dataclass
class CalibrationModel:
    """A module to calibrate, its kind, and the checkpoint names of its parameters.

    ``names`` maps each parameter name of ``module`` (tied aliases included) to the checkpoint tensor
    name it is stored under; parameters absent from ``names`` are stored under their own name.
    ``logits_fn(module, input_ids, attention_mask)`` overrides how logits are computed.
    """

    module: nn.Module
    kind: str
    names: Dict[str, str] = field(default_factory=dict)
    path: Optional[str] = None
    fingerprint: Optional[dict] = None
    logits_fn: Optional[Callable] = None
    checkpoint_names: Optional[List[str]] = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise MergeLabError(f"model kind must be one of {KINDS}, got {self.kind!r}")

    def checkpoint_name(self, param_name: str) -> str:
        return self.names.get(param_name, param_name)

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.kind == ENCODER:
            raise MergeLabError(
                f"model {self.path or ''} has no output head (a bare encoder): Fisher information and logits "
                "need a *ForSequenceClassification or *ForCausalLM checkpoint"
            )
        if self.logits_fn is not None:
            return self.logits_fn(self.module, input_ids, attention_mask)
        return self.module(input_ids=input_ids, attention_mask=attention_mask).logits

    def scored_rows(self, logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
                    ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """``(row_logits [R, C], example index [R], next-token targets [R] or None)``.

        A classifier has one row per example; a causal LM one row per position whose next token is
        real (both positions unmasked), scored against that next token.
        """
        if self.kind == CLASSIFIER:
            if logits.dim() != 2:
                raise MergeLabError(f"a classifier's logits must be [batch, classes], got {list(logits.shape)}")
            return logits, torch.arange(logits.shape[0], device=logits.device), None
        if logits.dim() != 3:
            raise MergeLabError(f"a causal LM's logits must be [batch, tokens, vocab], got {list(logits.shape)}")
        valid = attention_mask[:, :-1].bool() & attention_mask[:, 1:].bool()
        example = torch.arange(logits.shape[0], device=logits.device)[:, None].expand_as(valid)
        return logits[:, :-1][valid], example[valid], input_ids[:, 1:][valid]


def _kind_from_config(cfg) -> str:
    archs = list(getattr(cfg, "architectures", None) or [])
    if any(a.endswith("ForSequenceClassification") for a in archs):
        return CLASSIFIER
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return CAUSAL_LM
    return ENCODER


def name_map(module: nn.Module, checkpoint_names) -> Dict[str, str]:
    """Map every parameter name of ``module`` (tied aliases included) to a checkpoint tensor name.

    Tries the name itself, then without / with the model's ``base_model_prefix``. Parameters with no
    match keep their own name (their statistics are stored but no merge will look them up).
    """
    names = set(checkpoint_names)
    prefix = getattr(module, "base_model_prefix", "") or ""
    out: Dict[str, str] = {}
    by_tensor: Dict[int, List[str]] = {}
    for pname, p in module.named_parameters(remove_duplicate=False):
        by_tensor.setdefault(id(p), []).append(pname)
        candidates = [pname]
        if prefix and pname.startswith(prefix + "."):
            candidates.append(pname[len(prefix) + 1:])
        elif prefix:
            candidates.append(f"{prefix}.{pname}")
        for c in candidates:
            if c in names:
                out[pname] = c
                break
    return out


def model_folder(ref) -> Path:
    """The Hugging Face folder that holds ``ref``'s config and tokenizer: ``ref`` itself, or for a
    ``BASE+ADAPTER`` reference (:func:`mergelab.io.adapted.split_adapter_ref`) the base."""
    from mergelab.io.adapted import split_adapter_ref

    split = split_adapter_ref(str(ref))
    return Path(split[0] if split else ref)


def load_model(path, kind: str = "auto", dtype: torch.dtype = torch.float32) -> CalibrationModel:
    """Load the Hugging Face folder ``path`` for calibration (float32, eval mode, no downloads).

    ``kind`` is ``auto`` (from ``config.json``'s ``architectures``), ``classifier``, ``causal_lm`` or
    ``encoder``. ``path`` may be ``BASE+ADAPTER`` (a PEFT LoRA folder on a base folder, as in recipes):
    the base's module is loaded and every tensor the adapter changes is replaced by mergelab's reading
    of it (:class:`~mergelab.io.adapted.AdaptedCheckpoint`: ``W + s * B A`` in float32, ``modules_to_save``
    taken whole), so the statistics are those of the adapted model under the base's tensor names.
    """
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    from mergelab.io.adapted import open_model

    ref = str(path)
    path = model_folder(ref)
    if str(path) != ref:  # BASE+ADAPTER
        return _load_adapted(ref, path, kind, dtype)
    if not (path / "config.json").is_file():
        from mergelab.io.peft_adapter import is_adapter_folder

        if is_adapter_folder(path):
            open_model(str(path))  # raises: an adapter folder needs its base (BASE+ADAPTER)
        raise CheckpointError(f"model '{path}': expected a local Hugging Face folder with config.json")
    ckpt = open_model(str(path))
    try:
        cfg = AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}/config.json cannot be read: {e}") from None
    if kind == "auto":
        kind = _kind_from_config(cfg)
    if kind not in KINDS:
        raise MergeLabError(f"--kind must be auto or one of {', '.join(KINDS)}, got '{kind}'")
    cls = {CLASSIFIER: AutoModelForSequenceClassification, CAUSAL_LM: AutoModelForCausalLM, ENCODER: AutoModel}[kind]
    try:
        module = cls.from_pretrained(str(path), dtype=dtype)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"model '{path}' cannot be loaded as a {kind}: {e}") from None
    module.eval()
    float_names = [n for n, info in ckpt.tensors.items() if info.dtype.is_floating_point]
    return CalibrationModel(module, kind, name_map(module, ckpt.tensors), str(path), ckpt.fingerprint(),
                            checkpoint_names=float_names)


def _load_adapted(ref: str, base: Path, kind: str, dtype: torch.dtype) -> CalibrationModel:
    """:func:`load_model` for ``BASE+ADAPTER``: the base's module with the adapted tensors written in."""
    from mergelab.io.adapted import open_model

    ckpt = open_model(ref)  # validates the adapter against the base (shapes, recorded base, variants)
    cal = load_model(base, kind, dtype)
    changed = set(ckpt.modules) | set(ckpt.full)
    params = dict(cal.module.named_parameters(remove_duplicate=False))
    done = set()
    for pname, p in params.items():
        name = cal.checkpoint_name(pname)
        if name in changed:
            with torch.no_grad():
                p.copy_(ckpt.read(name, dtype=torch.float32).to(p.dtype))
            done.add(name)
    missing = sorted(changed - done)
    if missing:
        raise CheckpointError(f"model '{ref}': the adapter changes {missing[:3]}, which the loaded "
                              f"{cal.kind} module of '{base}' has no parameter for")
    cal.path, cal.fingerprint = ref, ckpt.fingerprint()
    return cal


def wrap_module(module: nn.Module, kind: str, logits_fn: Optional[Callable] = None,
                checkpoint_names: Optional[List[str]] = None) -> CalibrationModel:
    """A :class:`CalibrationModel` for an in-memory module whose parameter names are the checkpoint names."""
    module.eval()
    names = name_map(module, checkpoint_names) if checkpoint_names is not None else {}
    return CalibrationModel(module, kind, names, logits_fn=logits_fn, checkpoint_names=checkpoint_names)
