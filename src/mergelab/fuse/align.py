"""Token alignment between two tokenizers (FuseLLM, Wan et al. 2024, arXiv:2401.10491, section 3.3).

Two tokenizers cut the same text into different token sequences. FuseLLM aligns the two sequences by a
minimum-edit-distance dynamic program over the token strings (implemented in the reference code as
dynamic time warping), then carries each source step's next-token distribution over to the target
step it is aligned with:

* :func:`align_tokens`: DTW over the two sequences. The cost of a pair is the Levenshtein distance of
  the two token strings after removing the word-start markers (``Ġ`` of byte-level BPE, ``▁`` of
  SentencePiece); the table has infinite borders, each cell is its cost plus the least of its three
  predecessors; the path is traced back from the last pair, preferring the diagonal step, then the step
  that drops a source token, then the one that drops a target token. Every token of either sequence is
  on the path at least once.
* A target position is **aligned one-to-one** when the path gives it exactly one source position and
  the two strings are equal once markers are made the same (:func:`canonical`): "▁hello" and "Ġhello"
  are the same token. Only such positions receive the source's distribution; every other target
  position (a mismatch, or one target token covering several source tokens) receives a one-hot
  distribution on the target's own token, as in FuseLLM's ``transform_step_logits``.
* :class:`VocabMap`: each source token id in a distribution is carried to a target id by exact string
  (markers made the same) first, special tokens by role (BOS to BOS, EOS to EOS, PAD to PAD), and
  otherwise to the target token at minimum edit distance (lowest id on a tie; FuseLLM's ``default``
  vocabulary mapping). Special tokens are never the target of an edit-distance match.

Only the facts of the reference (``FuseLLM/src/utils/others.py``, ``vocab_mapping.py``) are used here.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from rapidfuzz import process
from rapidfuzz.distance import Levenshtein

MARKERS = ("Ġ", "▁")  # word-start markers: byte-level BPE (GPT-2, Llama 3, Qwen) and SentencePiece (Llama 2)


def canonical(token: str) -> str:
    """``token`` with any word-start marker written as ``▁`` (so ``Ġhello`` == ``▁hello``)."""
    return token.replace(MARKERS[0], MARKERS[1])


def stripped(token: str) -> str:
    """``token`` without word-start markers (what the alignment cost compares)."""
    for m in MARKERS:
        token = token.replace(m, "")
    return token


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions and substitutions cost 1), by rapidfuzz."""
    return Levenshtein.distance(a, b)


def align_tokens(source: Sequence[str], target: Sequence[str]) -> List[List[int]]:
    """For each target position, the source positions the minimum-edit-distance path pairs with it.

    ``source`` and ``target`` are token strings (``tokenizer.convert_ids_to_tokens``) of the same text.
    """
    n, m = len(source), len(target)
    if n == 0 or m == 0:
        return [[] for _ in range(m)]
    s = [stripped(t) for t in source]
    t = [stripped(x) for x in target]
    inf = float("inf")
    d = np.full((n + 1, m + 1), inf)
    d[0, 0] = 0.0
    for i in range(1, n + 1):
        si = s[i - 1]
        row, prev = d[i], d[i - 1]
        for j in range(1, m + 1):
            row[j] = edit_distance(si, t[j - 1]) + min(prev[j - 1], prev[j], row[j - 1])
    out: List[List[int]] = [[] for _ in range(m)]
    i, j = n, m
    while True:
        out[j - 1].append(i - 1)
        if i == 1 and j == 1:
            break
        # diagonal first, then "up" (drop a source token), then "left" (drop a target token)
        moves = ((d[i - 1, j - 1], i - 1, j - 1), (d[i - 1, j], i - 1, j), (d[i, j - 1], i, j - 1))
        best = min(v for v, _, _ in moves)
        _, i, j = next(mv for mv in moves if mv[0] == best)
    return [sorted(x) for x in out]


def one_to_one(source: Sequence[str], target: Sequence[str], alignment: List[List[int]]) -> List[Optional[int]]:
    """Per target position, the source position aligned one-to-one with it (same canonical string), else None."""
    out: List[Optional[int]] = []
    for j, srcs in enumerate(alignment):
        ok = len(srcs) == 1 and canonical(source[srcs[0]]) == canonical(target[j])
        out.append(srcs[0] if ok else None)
    return out


def _special_roles(tok) -> Dict[str, int]:
    roles = {}
    for role in ("bos", "eos", "pad", "unk"):
        i = getattr(tok, f"{role}_token_id", None)
        if i is not None:
            roles[role] = int(i)
    return roles


class VocabMap:
    """Source token id -> target token id (see the module doc); computed on first use and remembered."""

    def __init__(self, source_tokenizer, target_tokenizer):
        self.src_tokens = _id_to_token(source_tokenizer)
        self.tgt_tokens = _id_to_token(target_tokenizer)
        self._exact: Dict[str, int] = {}
        for i, tok in enumerate(self.tgt_tokens):
            if tok is not None:
                self._exact.setdefault(canonical(tok), i)
        src_roles, tgt_roles = _special_roles(source_tokenizer), _special_roles(target_tokenizer)
        self._special = {src_roles[r]: tgt_roles[r] for r in src_roles if r in tgt_roles}
        self._src_special = set(getattr(source_tokenizer, "all_special_ids", []) or [])
        tgt_special = set(getattr(target_tokenizer, "all_special_ids", []) or [])
        cand = [i for i, tok in enumerate(self.tgt_tokens) if tok is not None and i not in tgt_special]
        self._cand_ids = np.array(cand, dtype=np.int64)  # ascending: argmin's first hit is the lowest id
        self._cand_strings = [canonical(self.tgt_tokens[i]) for i in cand]
        self._memo: Dict[int, Optional[int]] = {}
        self.exact_matches = sum(1 for tok in self.src_tokens if tok is not None and canonical(tok) in self._exact)

    def __call__(self, src_id: int) -> Optional[int]:
        src_id = int(src_id)
        if src_id in self._memo:
            return self._memo[src_id]
        out = self._map(src_id)
        self._memo[src_id] = out
        return out

    def _map(self, src_id: int) -> Optional[int]:
        if src_id in self._special:
            return self._special[src_id]
        if src_id < 0 or src_id >= len(self.src_tokens) or self.src_tokens[src_id] is None:
            return None
        if src_id in self._src_special:
            return None  # a special token without a counterpart (no role match): never spelled out
        s = canonical(self.src_tokens[src_id])
        if s in self._exact:
            return self._exact[s]
        return self._nearest(s)

    def _nearest(self, s: str) -> Optional[int]:
        """The target id at least edit distance from ``s`` (lowest id on a tie)."""
        if not self._cand_strings:
            return None
        d = process.cdist([s], self._cand_strings, scorer=Levenshtein.distance, dtype=np.int32)[0]
        return int(self._cand_ids[int(np.argmin(d))])


def _id_to_token(tok) -> List[Optional[str]]:
    vocab = tok.get_vocab()
    size = max(vocab.values()) + 1 if vocab else 0
    out: List[Optional[str]] = [None] * size
    for s, i in vocab.items():
        out[i] = s
    return out


def aligned_fraction(source_tokenizer, target_tokenizer, texts: Sequence[str]) -> float:
    """The share of the target's tokens of ``texts`` that align one-to-one with a source token."""
    hit = total = 0
    for text in texts:
        s = source_tokenizer.convert_ids_to_tokens(source_tokenizer(text, add_special_tokens=False)["input_ids"])
        t = target_tokenizer.convert_ids_to_tokens(target_tokenizer(text, add_special_tokens=False)["input_ids"])
        pairs = one_to_one(s, t, align_tokens(s, t))
        hit += sum(p is not None for p in pairs)
        total += len(pairs)
    return hit / total if total else 0.0


def transfer_distribution(ids: Sequence[int], logits: Sequence[float], vmap: VocabMap,
                          temperature: float = 1.0) -> Tuple[List[int], List[float]]:
    """A source step's top-k ``(ids, logits)`` as a distribution over target ids: ids mapped by ``vmap``,
    unknown ids and later duplicates dropped, softmax of the kept logits over ``temperature``."""
    kept_ids, kept = [], []
    seen = set()
    for i, lg in zip(ids, logits):
        t = vmap(int(i))
        if t is None or t in seen:
            continue
        seen.add(t)
        kept_ids.append(t)
        kept.append(float(lg) / temperature)
    if not kept:
        return [], []
    x = np.array(kept, dtype=np.float64)
    p = np.exp(x - x.max())
    p /= p.sum()
    return kept_ids, p.tolist()
