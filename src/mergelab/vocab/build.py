"""The output vocabulary of a merge: ``tokenizer_source: base | union | MODEL`` (mergekit's semantics).

Every model's embedding rows are matched to the output vocabulary **by token string**, never by
index: :func:`build_output_vocab` loads each input's tokenizer and gives, per input, the map
``output id -> that model's row`` (``-1`` where the model lacks the token).

* ``base``: the base model's tokenizer (the first model's without ``base_model``), as it is.
* ``MODEL``: that model's tokenizer (it must be one of the recipe's models).
* ``union``: the base tokenizer plus, in the recipe's order (base first, then ``models:``), every
  regular token of the other tokenizers it lacks, then their added tokens with their settings
  (special or not), each appended as an added token, as mergekit 0.1.5's ``build_union_tokenizer``
  does. mergekit walks the models in ``set`` order; mergelab's order is the recipe's, so two runs give
  the same ids. As in mergekit, a regular token of another tokenizer becomes an *added* token of the
  output, matched before the base's own segmentation.

A tokenizer token whose id is not below its model's embedding rows is not a row of that model (as in
mergekit, which warns). The output's row count is at least what its tokenizer needs (highest id + 1)
and never below the source model's own row count (a padded vocabulary keeps its padding: mergekit
#425 cut Qwen2.5's 152064 rows to the tokenizer's 151665), rounded up to ``pad_to_multiple_of``.
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from mergelab.errors import CheckpointError, RecipeError

# Tensors whose first axis is the vocabulary (token embeddings, output heads and their biases).
VOCAB_TENSOR = re.compile(r"(^|\.)(embed_tokens|lm_head|wte|word_embeddings|embed_out|shared)\.(weight|bias)$")
_INPUT_EMBEDDING = re.compile(r"(^|\.)(embed_tokens|wte|word_embeddings|shared)\.weight$")
_OUTPUT_HEAD = re.compile(r"(^|\.)(lm_head|embed_out)\.weight$")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                    "spiece.model")


def embedding_rows(ckpt: Any) -> int:
    """Rows of a checkpoint's token embedding (its input embedding, else its output head)."""
    for pattern in (_INPUT_EMBEDDING, _OUTPUT_HEAD):
        for name, info in ckpt.tensors.items():
            if pattern.search(name) and len(info.shape) == 2:
                return int(info.shape[0])
    raise CheckpointError(f"model '{ckpt.label}' has no token embedding tensor (embed_tokens, lm_head, wte, "
                          f"word_embeddings, embed_out or shared .weight): it cannot take part in a merge with "
                          f"tokenizer_source")


def vocab_tensor_names(ckpt: Any, rows: int) -> List[str]:
    """The tensors of ``ckpt`` whose first axis is its vocabulary of ``rows`` rows."""
    return [n for n, info in ckpt.tensors.items()
            if VOCAB_TENSOR.search(n) and info.shape and int(info.shape[0]) == rows and info.is_float]


def has_tokenizer(folder: Optional[Path]) -> bool:
    return folder is not None and any((Path(folder) / f).is_file() for f in _TOKENIZER_FILES)


def load_tokenizer(folder: Path, label: str):
    """A model folder's tokenizer (fast when it can be), or a :class:`CheckpointError` naming the folder."""
    from transformers import AutoTokenizer

    if not has_tokenizer(folder):
        raise CheckpointError(f"model '{label}' ('{folder}') has no tokenizer (none of {', '.join(_TOKENIZER_FILES)})")
    try:
        return AutoTokenizer.from_pretrained(str(folder), use_fast=True)
    except Exception as e:  # transformers raises many kinds for a broken tokenizer folder
        raise CheckpointError(f"cannot load the tokenizer of model '{label}' from '{folder}': "
                              f"{type(e).__name__}: {e}")


def copy_tokenizer(tok):
    """An independent copy of a tokenizer (saved and reloaded: adding tokens to it leaves ``tok`` alone)."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as d:
        tok.save_pretrained(d)
        return AutoTokenizer.from_pretrained(d, use_fast=True)


@dataclass
class OutputVocab:
    """The merge's output vocabulary and, per input checkpoint, where each output row comes from.

    ``perms[i][j]`` is checkpoint ``i``'s row for output id ``j`` (``-1``: the model lacks that token);
    ``token_mask[j]`` says whether some token of the output tokenizer has id ``j`` (rows without one
    are padding). ``size`` is the output's row count; ``tokenizer`` is written with the output unless
    ``copy_from`` names the folder whose tokenizer files are copied as they are (``base``/``MODEL``).
    """

    source: str
    tokenizer: Any
    vocab: Dict[str, int]
    size: int
    perms: List[torch.Tensor]
    token_mask: torch.Tensor
    rows: List[int]
    copy_from: Optional[Path]
    notes: List[str] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)
    # tokenizer: {tokens: ...}: output id -> (token, kind, model index or None, source row or None, force)
    rules: Dict[int, tuple] = field(default_factory=dict)

    def present(self, i: int) -> torch.Tensor:
        return self.perms[i] >= 0


def _usable_vocab(tok, rows: int) -> Dict[str, int]:
    return {t: i for t, i in tok.get_vocab().items() if i < rows}


def build_output_vocab(source: str, refs: Sequence[str], checkpoints: Sequence[Any], base_ref: Optional[str],
                       pad_to_multiple_of: Optional[int] = None,
                       tokens: Optional[Dict[str, dict]] = None) -> Optional[OutputVocab]:
    """The output vocabulary for ``tokenizer_source: source`` over the opened ``checkpoints`` (in the order
    of ``refs``, the recipe's model references, base first).

    Every input needs its tokenizer for ``union``; for ``base`` or ``MODEL`` an input without one is
    read as having the base's tokenizer when its embedding has the base's row count (mergekit assumes
    so silently; mergelab says so), and is an error otherwise. ``None`` when no input has a tokenizer
    and every embedding has the same rows (``base``/``MODEL``: nothing to match, rows stay as they are).

    ``tokens`` (the recipe's ``tokenizer: {tokens: ...}``, checked by the recipe): each token the output
    tokenizer lacks is added to it (a plain added token, as mergekit's ``add_tokens``), and its embedding
    source becomes a rule of :attr:`OutputVocab.rules` (applied by :func:`mergelab.vocab.embed.aligned_rows`).
    """
    refs = list(refs)
    base_ref = base_ref or refs[0]
    if source not in ("base", "union") and source not in refs:
        raise RecipeError(f"tokenizer_source: '{source}' is not 'base', 'union' or one of the recipe's models "
                          f"({', '.join(refs)})")
    base_i = refs.index(base_ref)
    rows = [embedding_rows(c) for c in checkpoints]
    folders = [getattr(c, "path", None) for c in checkpoints]
    tokenizers: List[Any] = [None] * len(refs)
    notes: List[str] = []
    for i, ref in enumerate(refs):
        if has_tokenizer(folders[i]):
            tokenizers[i] = load_tokenizer(Path(folders[i]), ref)
    missing = [i for i, t in enumerate(tokenizers) if t is None]
    if source == "union" and missing:
        i = missing[0]
        raise CheckpointError(
            f"tokenizer_source: union needs every model's tokenizer, and model '{refs[i]}' ('{folders[i]}') has none "
            f"(none of {', '.join(_TOKENIZER_FILES)}); add its tokenizer files, or use tokenizer_source: base if it "
            f"shares the base's vocabulary")
    src_i = base_i if source in ("base", "union") else refs.index(source)
    if tokenizers[src_i] is None:
        if len(set(rows)) == 1 and len(missing) == len(refs) and not tokens:
            return None  # nothing to match by string: rows stay as they are (the caller notes it)
        raise CheckpointError(f"tokenizer_source: {source} needs the tokenizer of '{refs[src_i]}' "
                              f"('{folders[src_i]}'), which has none (none of {', '.join(_TOKENIZER_FILES)})")
    fallback = base_i if tokenizers[base_i] is not None else src_i
    for i in missing:
        if rows[i] != rows[fallback]:
            raise CheckpointError(
                f"model '{refs[i]}' ('{folders[i]}') has no tokenizer and {rows[i]} embedding rows where "
                f"'{refs[fallback]}' has {rows[fallback]}: its rows cannot be matched to tokens; add its tokenizer "
                f"files")
        tokenizers[i] = tokenizers[fallback]
        notes.append(f"model '{refs[i]}' has no tokenizer: its embedding rows are read as the vocabulary of "
                     f"'{refs[fallback]}' (same row count)")
    vocabs = [_usable_vocab(t, r) for t, r in zip(tokenizers, rows)]
    warnings: List[str] = []
    for i, (tok, r) in enumerate(zip(tokenizers, rows)):
        beyond = len(tok.get_vocab()) - len(vocabs[i])
        if beyond:
            warnings.append(f"the tokenizer of model '{refs[i]}' has {beyond} token(s) with ids at or beyond its "
                            f"{r} embedding rows; they are not rows of that model")

    if source == "union":
        out_tok, copy_from = _union_tokenizer(tokenizers, vocabs, base_i), None
    else:
        out_tok, copy_from = tokenizers[src_i], Path(folders[src_i])
    new_tokens = [t for t in (tokens or {}) if t not in out_tok.get_vocab()]
    if new_tokens:  # the source's files no longer are the output's tokenizer
        out_tok = copy_tokenizer(out_tok) if copy_from is not None else out_tok
        copy_from = None
        for t in new_tokens:  # one at a time, in the recipe's order, as mergekit
            out_tok.add_tokens(t)
        notes.append(f"tokenizer.tokens: added {len(new_tokens)} token(s) to the output tokenizer: "
                     f"{', '.join(repr(t) for t in new_tokens)}")
    vocab = out_tok.get_vocab()
    needed = max(vocab.values()) + 1 if vocab else 0
    size = max(needed, rows[src_i])
    if pad_to_multiple_of and size % pad_to_multiple_of:
        size = (size // pad_to_multiple_of + 1) * pad_to_multiple_of
    token_mask = torch.zeros(size, dtype=torch.bool)
    ids = torch.tensor(sorted(vocab.values()), dtype=torch.long)
    token_mask[ids] = True
    perms = []
    for v in vocabs:
        p = torch.full((size,), -1, dtype=torch.long)
        for tok, j in vocab.items():
            k = v.get(tok)
            if k is not None:
                p[j] = k
        perms.append(p)
    rules = _token_rules(tokens or {}, refs, vocab, vocabs, perms, rows)
    counts = torch.stack([p >= 0 for p in perms]).sum(0)
    ruled = torch.zeros(size, dtype=torch.bool)
    ruled[list(rules)] = True
    orphan = int((token_mask & (counts == 0) & ~ruled).sum())
    if orphan:
        warnings.append(f"{orphan} token(s) of the output tokenizer are in no model's embedding; their rows are zero")
    lacking = [f"'{refs[i]}' {int((token_mask & (p < 0)).sum())}" for i, p in enumerate(perms)]
    notes.append(f"tokenizer_source {source}: output vocabulary of {len(vocab)} tokens in {size} rows (inputs' rows: "
                 f"{', '.join(str(r) for r in rows)}); tokens each input lacks: {', '.join(lacking)}")
    return OutputVocab(source=source, tokenizer=out_tok, vocab=vocab, size=size, perms=perms, token_mask=token_mask,
                       rows=rows, copy_from=copy_from, notes=notes, warnings=warnings, rules=rules)


def _token_rules(tokens: Dict[str, dict], refs: List[str], vocab: Dict[str, int], vocabs: List[Dict[str, int]],
                 perms: List[torch.Tensor], rows: List[int]) -> Dict[int, tuple]:
    """``output id -> (token, kind, model index, source row, force)`` for the recipe's ``tokens``; a source
    that cannot give the row the token needs is an error here, before any tensor is read (mergekit fails
    the same cases during the merge)."""
    out: Dict[int, tuple] = {}
    for tok, cfg in tokens.items():
        j, src = vocab[tok], cfg["source"]
        where = f"tokenizer.tokens[{tok!r}]"
        needed = cfg["force"] or any(int(p[j]) < 0 for p in perms)
        m = refs.index(src["model"]) if "model" in src else None
        row = None
        if src["kind"] == "model" and needed and int(perms[m][j]) < 0:
            raise RecipeError(f"{where}: source model '{src['model']}' does not have the token {tok!r}; use "
                              f"{{kind: model_token, model, token}} to take another token's row")
        if src["kind"] == "model_token":
            if "token" in src:
                if src["token"] not in vocabs[m]:
                    raise RecipeError(f"{where}: token {src['token']!r} is not in the vocabulary of model "
                                      f"'{src['model']}'")
                row = vocabs[m][src["token"]]
            else:
                row = src["token_id"]
                if row >= rows[m]:
                    raise RecipeError(f"{where}: token_id {row} is out of range for model '{src['model']}' "
                                      f"({rows[m]} embedding rows)")
        out[j] = (tok, src["kind"], m, row, cfg["force"])
    return out


def _union_tokenizer(tokenizers: List[Any], vocabs: List[Dict[str, int]], base_i: int):
    """The base tokenizer plus the other tokenizers' tokens it lacks (module docstring)."""
    order = [base_i] + [i for i in range(len(tokenizers)) if i != base_i]
    regular: Dict[str, None] = {}
    added: Dict[str, Any] = {}
    for i in order:
        decoder = tokenizers[i].added_tokens_decoder
        added_here = {info.content: info for info in decoder.values()}
        for tok in vocabs[i]:
            if tok in added_here:
                if tok not in added:
                    added[tok] = added_here[tok]
            elif tok not in regular:
                regular[tok] = None
    out = copy_tokenizer(tokenizers[base_i])
    have = set(out.get_vocab())
    new_regular = [t for t in regular if t not in have and t not in added]
    if new_regular:
        out.add_tokens(new_regular)
    have = set(out.get_vocab())
    new_added = [info for t, info in added.items() if t not in have]
    for info in new_added:  # one at a time, each with its own settings (special or not), as mergekit
        out.add_tokens(info)
    return out
