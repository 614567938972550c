"""Vocabularies: merges of models whose tokenizers differ, and tokenizer transplants.

* :mod:`mergelab.vocab.build`: the output vocabulary of ``tokenizer_source: base | union | MODEL``,
  every model's rows matched to it by token string;
* :mod:`mergelab.vocab.embed`: each input's vocabulary tensors re-indexed to it before the merge
  method runs, with the ``missing_tokens`` rule for tokens only some models have;
* :mod:`mergelab.vocab.transplant`: ``mergelab transplant-tokenizer``, a model's embeddings rebuilt
  for another tokenizer, new tokens by orthogonal matching pursuit (mergekit-tokensurgeon's ``omp``).

:func:`align_checkpoints` is what :func:`mergelab.merge.merge` calls for a recipe with
``tokenizer_source`` (or ``tokenizer:``); :func:`write_tokenizer` writes the output's tokenizer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from mergelab.vocab.build import OutputVocab, build_output_vocab
from mergelab.vocab.embed import (MISSING_TOKENS, VocabAlignedCheckpoint, VocabAlignment, aligned_rows,
                                  check_token_sources)

__all__ = ["MISSING_TOKENS", "OutputVocab", "VocabAlignment", "VocabAlignedCheckpoint", "align_checkpoints",
           "aligned_rows", "build_output_vocab", "check_token_sources", "write_tokenizer"]


def align_checkpoints(recipe: Any, checkpoints: Dict[str, Any]) -> Tuple[Dict[str, Any], Optional[OutputVocab]]:
    """``checkpoints`` (``ref -> checkpoint``, base first) wrapped so that their vocabulary tensors follow the
    output vocabulary of ``recipe.tokenizer_source``; returns them and that vocabulary (``None``, and the
    checkpoints as they are, when no input has a tokenizer: see :func:`build_output_vocab`)."""
    refs = list(checkpoints)
    ckpts = [checkpoints[r] for r in refs]
    out = build_output_vocab(recipe.tokenizer_source, refs, ckpts, recipe.base_model, recipe.pad_to_multiple_of,
                             getattr(recipe, "tokens", None))
    if out is None:
        return checkpoints, None
    base = refs.index(recipe.base_model) if recipe.base_model in refs else None
    alignment = VocabAlignment(out, ckpts, base, recipe.missing_tokens or "base")
    return {r: VocabAlignedCheckpoint(c, alignment, i) for i, (r, c) in enumerate(zip(refs, ckpts))}, out


_TOKENIZER_OUTPUT = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                     "added_tokens.json", "merges.txt", "vocab.json", "vocab.txt", "spiece.model")


def write_tokenizer(out: OutputVocab, folder: Path) -> list:
    """Write the output tokenizer into ``folder`` (after the donor's files were copied there): for ``union``
    the built tokenizer replaces every tokenizer file copied from the donor; for ``base``/``MODEL`` the
    source's files, copied as they are, are it. Returns the names written."""
    if out.copy_from is not None:
        return []
    for name in _TOKENIZER_OUTPUT:
        p = Path(folder) / name
        if p.is_file():
            p.unlink()
    before = set(p.name for p in Path(folder).iterdir())
    out.tokenizer.save_pretrained(str(folder))
    return sorted(set(p.name for p in Path(folder).iterdir()) - before)

