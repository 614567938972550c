"""``mergelab transplant-tokenizer MODEL --donor DONOR -o OUT``: MODEL's weights for DONOR's tokenizer.

What mergekit-tokensurgeon does with its default ``omp`` approximation (Minixhofer et al.'s line of
work; mergekit's "Training-Free Tokenizer Transplantation via Orthogonal Matching Pursuit", arXiv
2506.06607). Every vocabulary tensor of MODEL (``embed_tokens``, an untied ``lm_head``) is rebuilt row
by row for DONOR's vocabulary:

* a token MODEL's tokenizer also has (same string; special tokens also by role, DONOR's BOS is
  MODEL's BOS): MODEL's row, copied exactly;
* a new token: orthogonal matching pursuit in DONOR's space. Over the shared tokens' DONOR rows
  ``D`` (atoms, not normalised, as in mergekit), ``k`` greedy steps each pick the atom of largest
  ``|<residual, d_j>|`` and refit the coefficients ``c`` of the picked atoms by least squares; the new
  row is ``sum_i c_i * M[shared_i]``, the coefficients applied to MODEL's rows of the same tokens.
  ``k`` defaults to 64 (mergekit's ``--k``); more than the shared tokens is an error, as in mergekit.
  The embedding and the head are approximated independently (DONOR's embedding for MODEL's, DONOR's
  head, or its embedding when tied, for MODEL's head);
* rows no token has: zeros.

The output has ``max(len(DONOR vocab), highest id + 1, DONOR's rows)`` rows; every other tensor is
MODEL's, copied; ``config.json`` is MODEL's with ``vocab_size`` and DONOR's special token ids; the
tokenizer files are DONOR's. A tied MODEL stays tied.

Not done (mergekit has them): word-start marker normalisation across tokenizer families (``Ġ`` /
``▁``), byte and prefix matching, the other approximation methods.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from mergelab.errors import CheckpointError, MergeLabError
from mergelab.vocab.build import _INPUT_EMBEDDING, _OUTPUT_HEAD, embedding_rows, has_tokenizer, load_tokenizer

DEFAULT_K = 64
_SPECIAL_ROLES = ("bos_token", "eos_token", "pad_token", "unk_token", "mask_token")


def omp(targets: torch.Tensor, atoms: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Orthogonal matching pursuit: for each row of ``targets`` (B, D), ``k`` atoms of ``atoms`` (N, D) and
    their least-squares coefficients. Returns ``(indices (B, k), coefficients (B, k))``.

    Each step picks, per target, the unpicked atom with the largest ``|<residual, atom>|`` and refits all
    picked coefficients by least squares (normal equations in float64), so the residual is orthogonal
    to every picked atom. A target in the span of ``k`` atoms is reproduced exactly (to rounding).
    """
    b, n = targets.shape[0], atoms.shape[0]
    if k > n:
        raise MergeLabError(f"orthogonal matching pursuit with k={k} needs at least {k} shared tokens, there are "
                            f"{n}; lower --k")
    t = targets.to(torch.float32)
    a = atoms.to(torch.float32)
    picked = torch.zeros((b, k), dtype=torch.long)
    taken = torch.zeros((b, n), dtype=torch.bool)
    coeffs = torch.zeros((b, 0), dtype=torch.float64)
    residual = t.clone()
    rows = torch.arange(b)
    for step in range(k):
        score = (residual @ a.T).abs().masked_fill_(taken, -1.0)
        j = score.argmax(1)
        picked[:, step] = j
        taken[rows, j] = True
        sel = a[picked[:, :step + 1]].to(torch.float64)  # (B, s, D)
        gram = sel @ sel.transpose(1, 2)
        rhs = (sel @ t.to(torch.float64).unsqueeze(-1))
        coeffs = torch.linalg.lstsq(gram, rhs).solution.squeeze(-1)  # (B, s)
        residual = (t.to(torch.float64) - (coeffs.unsqueeze(1) @ sel).squeeze(1)).to(torch.float32)
    return picked, coeffs.to(torch.float32)


def _special_ids(tok) -> Dict[str, int]:
    out = {}
    for role in _SPECIAL_ROLES:
        token = getattr(tok, role, None)
        if token is not None:
            i = tok.convert_tokens_to_ids(token)
            if isinstance(i, int):
                out[role] = i
    return out


def match_vocab(model_tok, donor_tok, model_rows: int, donor_rows: int) -> Tuple[Dict[int, int], List[int]]:
    """``{donor id: model id}`` for the tokens both have (by string; special tokens also by role) and the
    donor ids to approximate (tokens the model lacks), ids beyond either's rows left out."""
    model_vocab = {t: i for t, i in model_tok.get_vocab().items() if i < model_rows}
    shared: Dict[int, int] = {}
    for role, d in _special_ids(donor_tok).items():
        m = _special_ids(model_tok).get(role)
        if m is not None and d < donor_rows and m < model_rows:
            shared[d] = m
    new = []
    for token, d in sorted(donor_tok.get_vocab().items(), key=lambda kv: kv[1]):
        if d >= donor_rows or d in shared:
            continue
        m = model_vocab.get(token)
        if m is None:
            new.append(d)
        else:
            shared[d] = m
    return shared, new


def transplant_rows(model_rows: torch.Tensor, donor_rows: torch.Tensor, shared: Dict[int, int], new: List[int],
                    size: int, k: int = DEFAULT_K, batch_size: int = 512) -> torch.Tensor:
    """MODEL's vocabulary tensor rebuilt for DONOR's ids (module docstring): ``size`` rows, float32."""
    out = torch.zeros((size,) + tuple(model_rows.shape[1:]), dtype=torch.float32)
    d_ids = torch.tensor(sorted(shared), dtype=torch.long)
    m_ids = torch.tensor([shared[int(i)] for i in d_ids], dtype=torch.long)
    out[d_ids] = model_rows[m_ids].to(torch.float32)
    if new:
        atoms = donor_rows[d_ids].to(torch.float32)
        basis = model_rows[m_ids].to(torch.float32)
        for start in range(0, len(new), batch_size):
            ids = torch.tensor(new[start:start + batch_size], dtype=torch.long)
            picked, c = omp(donor_rows[ids], atoms, k)
            out[ids] = (c.unsqueeze(1) @ basis[picked]).squeeze(1)
    return out


@dataclass
class TransplantResult:
    out: Path
    seconds: float
    rows: int
    copied_tokens: int
    approximated_tokens: int
    notes: List[str] = field(default_factory=list)


def transplant_tokenizer(model: str, donor: str, out: str, *, k: int = DEFAULT_K, overwrite: bool = False,
                         batch_size: int = 512) -> TransplantResult:
    """Write MODEL's weights re-indexed to DONOR's tokenizer into ``out`` (module docstring). Everything is
    checked before anything is written; the output is built in ``OUT.partial`` and renamed when done."""
    from safetensors.torch import save_file

    from mergelab.io.checkpoint import Checkpoint
    from mergelab.io.output import partial_path, prepare_output, publish

    started = time.perf_counter()
    if k < 1:
        raise MergeLabError(f"--k must be a positive integer, got {k}")
    m_ck, d_ck = Checkpoint.open(model, label=model), Checkpoint.open(donor, label=donor)
    for ck, what in ((m_ck, "model"), (d_ck, "donor")):
        if not has_tokenizer(ck.path):
            raise CheckpointError(f"the {what} '{ck.label}' ('{ck.path}') has no tokenizer: a transplant matches "
                                  f"MODEL's rows to DONOR's tokens by their strings")
    m_tok, d_tok = load_tokenizer(m_ck.path, model), load_tokenizer(d_ck.path, donor)
    m_rows, d_rows = embedding_rows(m_ck), embedding_rows(d_ck)
    m_cfg = m_ck.config() or {}
    names = [n for n, info in m_ck.tensors.items()
             if (_INPUT_EMBEDDING.search(n) or _OUTPUT_HEAD.search(n)) and len(info.shape) == 2
             and info.shape[0] == m_rows]
    d_embed = next((n for n in d_ck.tensors if _INPUT_EMBEDDING.search(n)), None)
    if d_embed is None:
        raise CheckpointError(f"the donor '{donor}' has no token embedding tensor")
    shared, new = match_vocab(m_tok, d_tok, m_rows, d_rows)
    if not shared:
        raise CheckpointError(f"the tokenizers of '{model}' and '{donor}' share no token: nothing to anchor the "
                              f"new tokens' rows on")
    if new and k > len(shared):
        raise MergeLabError(f"--k {k} is more than the {len(shared)} tokens the two tokenizers share; lower --k")
    d_vocab = d_tok.get_vocab()
    size = max(len(d_vocab), max(d_vocab.values()) + 1, d_rows)
    sources = {}
    for n in names:
        d_name = n if n in d_ck.tensors and d_ck.info(n).shape[0] == d_rows else d_embed
        sources[n] = d_name
    partial, _ = prepare_output(Path(out), [m_ck.path, d_ck.path], overwrite, False)
    try:
        state = {}
        for n, info in m_ck.tensors.items():
            t = m_ck.read(n)
            if n in sources:
                rows = transplant_rows(t, d_ck.read(sources[n], None, torch.float32), shared, new, size, k, batch_size)
                t = rows.to(info.dtype)
            state[n] = t
        save_file(state, str(partial / "model.safetensors"), metadata={"format": "pt"})
        cfg = dict(m_cfg)
        cfg["vocab_size"] = size
        for role, i in _special_ids(d_tok).items():
            key = role.replace("_token", "_token_id")
            if key in cfg or role in ("bos_token", "eos_token", "pad_token"):
                cfg[key] = i
        (partial / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        d_tok.save_pretrained(str(partial))
        gen = m_ck.path / "generation_config.json"
        if gen.is_file():
            shutil.copy2(gen, partial / gen.name)
        (partial / "mergelab.json").write_text(json.dumps({
            "transplant_tokenizer": {"model": str(model), "donor": str(donor), "method": "omp", "k": k,
                                     "rows": size, "copied_tokens": len(shared), "approximated_tokens": len(new),
                                     "tensors": sources}}, indent=2) + "\n")
        publish(partial, Path(out), overwrite)
    except BaseException:
        shutil.rmtree(partial_path(Path(out)), ignore_errors=True)
        raise
    return TransplantResult(Path(out), time.perf_counter() - started, size, len(shared), len(new))
