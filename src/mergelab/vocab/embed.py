"""Per-model embedding rows re-indexed to the output vocabulary, before the merge method runs.

Every vocabulary tensor (``embed_tokens``, ``lm_head``, ...) of every input is rebuilt with the output
vocabulary's rows (:class:`~mergelab.vocab.build.OutputVocab`), as mergekit 0.1.5's
``PermutedVocabulary`` does; the recipe's method then merges these matrices like any other tensor:

* a token every model has: each model's own row, merged by the method;
* a token only some models have (``missing_tokens``, a mergelab recipe key): the models that lack
  it get one shared row,

  - ``base`` (default, mergekit's rule): the base model's row for the token when the base has it,
    else the mean of the rows of the models that have it (a token one model added is that model's
    row);
  - ``mean``: the mean of the rows of the models that have it, the base among them if it has it
    (the ``embed_slerp``-era linear average over the models holding a token);

  so a token a single expert added keeps that expert's row after any merge that returns its input
  when every input is equal (the means, task arithmetic, TIES...);
* a token no model has: zeros (a warning);
* a token of the recipe's ``tokenizer: {tokens: ...}`` (mergekit's per-token sources): when some model
  lacks it, or with ``force: true``, the models lacking it (with ``force``: every model) get the row of
  its source instead: ``zero``, a model's row of the same token, or a model's row of another token
  (``model_token``, by string or id in that model's own vocabulary); the other rules do not apply to it;
* padding rows (no token has their id): each model's mean token row (mergekit's choice, after
  Hewitt's vocabulary-expansion note).

:class:`VocabAlignedCheckpoint` wraps an input checkpoint so that the planner and executor see the
re-indexed tensors with their new shapes and nothing else changes; a tied head (no ``lm_head`` in the
checkpoint) stays tied.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Dict, List, Optional

import torch

from mergelab.errors import MergeLabError
from mergelab.io.checkpoint import TensorInfo, owned_tensor
from mergelab.vocab.build import OutputVocab, vocab_tensor_names

MISSING_TOKENS = ("base", "mean")


def aligned_rows(out: OutputVocab, tensors: List[torch.Tensor], base: Optional[int],
                 missing_tokens: str = "base") -> List[torch.Tensor]:
    """Each input's vocabulary tensor (vocabulary on dim 0) rebuilt with ``out``'s rows (module docstring).

    ``tensors[i]`` belongs to checkpoint ``i`` of ``out.perms``; ``base`` is the base's index (None: no
    base, so ``missing_tokens: base`` is the mean). Computed in float32, returned in float32.
    """
    if missing_tokens not in MISSING_TOKENS:
        raise ValueError(f"missing_tokens must be one of {MISSING_TOKENS}, got {missing_tokens!r}")
    size, rest = out.size, tuple(tensors[0].shape[1:])
    present = [out.present(i) for i in range(len(tensors))]
    rows = []
    for i, t in enumerate(tensors):
        r = torch.zeros((size,) + rest, dtype=torch.float32)
        r[present[i]] = t[out.perms[i][present[i]]].to(torch.float32)
        rows.append(r)
    count = torch.stack(present).sum(0)
    partial = out.token_mask & (count < len(tensors))
    if bool(partial.any()):
        shape = (-1,) + (1,) * len(rest)
        total = sum(torch.where(p.view(shape), r, 0.0) for p, r in zip(present, rows))
        default = total / count.clamp(min=1).to(torch.float32).view(shape)
        if missing_tokens == "base" and base is not None:
            take = present[base].view(shape)
            default = torch.where(take, rows[base], default)
        for p, r in zip(present, rows):
            fill = partial & ~p
            r[fill] = default[fill]
    for j, (tok, kind, m, src, force) in out.rules.items():
        lacking = [i for i, p in enumerate(present) if not bool(p[j])]
        if not force and not lacking:
            continue
        if kind == "zero":
            row = torch.zeros(rest, dtype=torch.float32)
        elif kind == "model":
            row = tensors[m][int(out.perms[m][j])].to(torch.float32)
        else:
            row = tensors[m][src].to(torch.float32)
        for i in (range(len(tensors)) if force else lacking):
            rows[i][j] = row
    pad = ~out.token_mask
    if bool(pad.any()):
        for r in rows:
            r[pad] = r[out.token_mask].mean(0)
    return rows


class VocabAlignment:
    """The re-indexed vocabulary tensors of every input, computed once per tensor name and shared by the
    inputs' :class:`VocabAlignedCheckpoint` wrappers (the two most recent names are kept: the executor
    reads one tensor ahead)."""

    def __init__(self, out: OutputVocab, checkpoints: List[Any], base: Optional[int], missing_tokens: str):
        self.out = out
        self.checkpoints = checkpoints
        self.base = base
        self.missing_tokens = missing_tokens
        self.names = [set(vocab_tensor_names(c, r)) for c, r in zip(checkpoints, out.rows)]
        self._cache: "OrderedDict[str, List[torch.Tensor]]" = OrderedDict()
        self._lock = threading.Lock()

    def is_vocab(self, i: int, name: str) -> bool:
        return name in self.names[i]

    def check_sources(self, name: str) -> List[int]:
        """The inputs holding vocabulary tensor ``name``; a ``tokenizer.tokens`` rule whose source model is not
        among them (e.g. a tied model asked for an ``lm_head`` row) is an error naming the token, the model
        and the tensor. :func:`check_token_sources` runs it at planning, before anything is written."""
        holders = [k for k, names in enumerate(self.names) if name in names]
        for tok, kind, m, src, force in self.out.rules.values():
            if m is not None and m not in holders:
                tied = " (its head is tied to its embedding)" if ("lm_head" in name or "embed_out" in name) else ""
                raise MergeLabError(f"tokenizer.tokens[{tok!r}] takes its row from model "
                                    f"'{self.checkpoints[m].label}', which has no tensor '{name}'{tied}; "
                                    f"take the row from a model that has '{name}'")
        return holders

    def rows(self, name: str, i: int) -> torch.Tensor:
        with self._lock:
            if name not in self._cache:
                holders = self.check_sources(name)
                tensors = [self.checkpoints[k].read(name, None, torch.float32, "cpu") for k in holders]
                rules = {j: (tok, kind, holders.index(m) if m is not None else None, src, force)
                         for j, (tok, kind, m, src, force) in self.out.rules.items()}
                sub = OutputVocab(self.out.source, None, self.out.vocab, self.out.size,
                                  [self.out.perms[k] for k in holders], self.out.token_mask,
                                  [self.out.rows[k] for k in holders], None, rules=rules)
                base = holders.index(self.base) if self.base in holders else None
                merged = aligned_rows(sub, tensors, base, self.missing_tokens)
                self._cache[name] = dict(zip(holders, merged))
                while len(self._cache) > 2:
                    self._cache.popitem(last=False)
            return self._cache[name][i]


class VocabAlignedCheckpoint:
    """Checkpoint ``i`` of a :class:`VocabAlignment`, with its vocabulary tensors re-indexed to the output
    vocabulary and its ``config.json`` ``vocab_size`` set to the output's; everything else is the
    wrapped checkpoint's."""

    def __init__(self, inner: Any, alignment: VocabAlignment, index: int):
        self._inner = inner
        self._alignment = alignment
        self._index = index
        size = alignment.out.size
        self.tensors: Dict[str, TensorInfo] = {
            name: (TensorInfo(name, info.dtype, (size,) + tuple(info.shape[1:]), info.file)
                   if alignment.is_vocab(index, name) else info)
            for name, info in inner.tensors.items()
        }

    @property
    def alignment(self) -> VocabAlignment:
        """The :class:`VocabAlignment` this checkpoint is re-indexed by."""
        return self._alignment

    def is_vocab(self, name: str) -> bool:
        """Whether tensor ``name`` of this checkpoint is a vocabulary tensor read through the alignment."""
        return self._alignment.is_vocab(self._index, name)

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("_"):  # never reached for the wrapper's own fields once they are set
            raise AttributeError(attr)
        return getattr(self._inner, attr)

    def info(self, name: str) -> TensorInfo:
        if name not in self.tensors:
            return self._inner.info(name)  # its own error, naming the model
        return self.tensors[name]

    def read(self, name: str, rows: Optional[tuple] = None, dtype: Optional[torch.dtype] = None,
             device: str = "cpu") -> torch.Tensor:
        if not self.is_vocab(name):
            return self._inner.read(name, rows, dtype, device)
        t = self._alignment.rows(name, self._index)
        if rows is not None:
            t = t[rows[0]:rows[1]]
        return owned_tensor(t, dtype or self.tensors[name].dtype, device)

    def config(self) -> Optional[dict]:
        cfg = self._inner.config() if hasattr(self._inner, "config") else None
        if cfg is None:
            return None
        cfg = dict(cfg)
        if "vocab_size" in cfg:
            cfg["vocab_size"] = self._alignment.out.size
        if isinstance(cfg.get("text_config"), dict) and "vocab_size" in cfg["text_config"]:
            cfg["text_config"] = {**cfg["text_config"], "vocab_size": self._alignment.out.size}
        return cfg


def check_token_sources(plan: Any) -> None:
    """Before anything is written: every vocabulary tensor the plan reads through a
    :class:`VocabAlignedCheckpoint` has each ``tokenizer.tokens`` source model among its holders
    (:meth:`VocabAlignment.check_sources`), so such a recipe fails at planning, not while merging."""
    seen = set()
    for job in plan.jobs:
        for src in ([job.base] if job.base is not None else []) + list(job.models):
            ckpt = plan.checkpoints[src.checkpoint]
            if not isinstance(ckpt, VocabAlignedCheckpoint) or (src.name in seen):
                continue
            if ckpt.is_vocab(src.name):
                seen.add(src.name)
                ckpt.alignment.check_sources(src.name)
