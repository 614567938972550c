"""Train a target causal LM on the fused next-token distributions of source LMs (FuseLLM / FuseChat).

:func:`fuse_train` is ``llmmix`` fine-tuning (:func:`mergelab.llmmix.finetune.finetune`: the same data
order, schedule, replay of the target's pretraining text, resumable checkpoints, final validation
accuracy) with the task loss replaced by :class:`FusionObjective`'s
``lambda * L_CLM + (1 - lambda) * L_fuse`` (:mod:`mergelab.fuse.fusion`).

For every training example (prompt + answer + EOS, rendered as fine-tuning renders it) and every
candidate (each source, and with ``include_target`` the target's own starting weights, as FuseLLM's
``distill_with_ref_model``), the candidate's tokenizer encodes the same text, the frozen candidate
predicts every step, and its per-sequence cross-entropy on the answer tokens (the gold) is recorded
with its top-``top_k`` logits per step. A source's steps are carried to the target's tokens by
:mod:`mergelab.fuse.align` (one-to-one aligned positions keep the source's distribution, with ids mapped
through :class:`~mergelab.fuse.align.VocabMap`; the others become one-hot on the target's token). The
candidates are fused per sequence with MinCE or AvgCE, on the answer positions (those the CLM loss
learns). Each example's fused distribution is computed once, when first drawn, and kept.

FuseChat (arXiv:2402.16107) fuses a pivot with one source at a time (pairwise fusion, ``sources`` of
length 1) and merges the fused targets with VaRM or SCE (:func:`chat_merge`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from mergelab.errors import MergeLabError
from mergelab.fuse.fusion import FUSIONS, LOSSES, fusion_loss, fusion_weights

MIN_ALIGNED = 0.2  # below this share of one-to-one aligned target tokens a source cannot teach the target


class FuseError(MergeLabError):
    """A fusion cannot run as asked."""


@dataclass(frozen=True)
class FuseSettings:
    lam: float = 0.9  # weight of the CLM loss (FuseLLM's lambda / lm_loss_weight; 1.0 = plain fine-tuning)
    fusion: str = "min_ce"
    loss: str = "ce"
    top_k: int = 10
    temperature: float = 1.0
    include_target: bool = True
    min_aligned: float = MIN_ALIGNED  # not part of the run's identity

    def check(self) -> None:
        if not (0.0 <= self.lam <= 1.0):
            raise FuseError(f"--lambda {self.lam}: the CLM weight must lie in [0, 1] (FuseLLM uses 0.9)")
        if self.fusion not in FUSIONS:
            raise FuseError(f"--fusion {self.fusion!r}: expected one of {', '.join(FUSIONS)}")
        if self.loss not in LOSSES:
            raise FuseError(f"--loss {self.loss!r}: expected one of {', '.join(LOSSES)}")
        if self.top_k < 1:
            raise FuseError(f"--top-k {self.top_k}: must be >= 1")
        if not self.temperature > 0:
            raise FuseError(f"--temperature {self.temperature}: must be > 0")


def _load_tokenizer(folder: Path, what: str):
    from transformers import AutoTokenizer

    folder = Path(folder)
    if not folder.is_dir():
        raise FuseError(f"{what} {folder}: no such folder")
    if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise FuseError(f"{what} {folder}: no tokenizer (tokenizer.json, tokenizer.model or vocab.json); each "
                        "model's own tokenizer is needed to align its tokens")
    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:  # noqa: BLE001 - any loader failure is a bad input
        raise FuseError(f"{what} {folder}: its tokenizer does not load ({type(e).__name__}: {e})") from None


def _example_text(ex) -> str:
    from mergelab.llmmix.tasks.format import render_answer, render_prompt

    return render_prompt(ex.prompt) + render_answer(ex.answer)


class FusionObjective:
    """The fusion loss of :func:`mergelab.llmmix.finetune.finetune` (its ``objective`` hook)."""

    def __init__(self, target_dir: Path, sources: Sequence[Path], settings: FuseSettings, device: str = "cpu"):
        from mergelab.llmmix.finetune import base_fingerprint

        settings.check()
        if not sources:
            raise FuseError("fusion needs at least one source model (--source)")
        self.target_dir, self.sources = Path(target_dir), [Path(s) for s in sources]
        self.cfg, self.device = settings, device
        self.target_tok = _load_tokenizer(self.target_dir, "target")
        self.source_toks = [_load_tokenizer(s, "source") for s in self.sources]
        self._fingerprints = [base_fingerprint(s) for s in self.sources]
        self._memo: Dict[int, tuple] = {}
        self.aligned: Dict[str, float] = {}

    def settings(self) -> dict:
        s = dataclasses.asdict(self.cfg)
        s.pop("min_aligned")
        return {**s, "sources": self._fingerprints}

    def check_alignable(self, texts: Sequence[str]) -> None:
        """Refuse a source whose tokens align one-to-one with under ``min_aligned`` of the target's tokens."""
        from mergelab.fuse.align import aligned_fraction

        for src, tok in zip(self.sources, self.source_toks):
            frac = aligned_fraction(tok, self.target_tok, texts)
            self.aligned[str(src)] = frac
            if frac < self.cfg.min_aligned:
                raise FuseError(f"source {src}: only {100 * frac:.1f}% of the target's tokens on the training text "
                                f"align one-to-one with its tokens (need {100 * self.cfg.min_aligned:.0f}%); its "
                                "vocabulary cannot be aligned with the target's")

    # -- the finetune hook
    def bind(self, model, tok, examples: Sequence, feats: List[dict]) -> None:
        """Called once by ``finetune`` with the training examples and their encoded features."""
        from mergelab.fuse.align import VocabMap
        from mergelab.llmmix.generate import load_causal_lm

        self.examples, self.feats = list(examples), feats
        for i, f in enumerate(feats):
            f["fuse_index"] = i
        self.candidates = []
        for src, stok in zip(self.sources, self.source_toks):
            m, _ = load_causal_lm(src, device=self.device)
            m.eval().requires_grad_(False)
            self.candidates.append((m, stok, VocabMap(stok, tok)))
        if self.cfg.include_target:
            m, _ = load_causal_lm(self.target_dir, device=self.device)
            m.eval().requires_grad_(False)
            self.candidates.append((m, tok, None))
        self.vocab = model.config.vocab_size
        names = [str(s) for s in self.sources] + (["target"] if self.cfg.include_target else [])
        self.weight_totals = dict.fromkeys(names, 0.0)  # sum over fused sequences of each candidate's weight

    def loss(self, model, batch_feats: List[dict], batch: dict):
        """``(total, parts)``: the combined loss and the numbers logged per step."""
        import torch

        out = model(**batch)
        clm = out.loss
        if self.cfg.lam >= 1.0:
            return clm, {"clm_loss": round(clm.item(), 6)}
        self._prepare([f["fuse_index"] for f in batch_feats])
        rows, targets = [], []
        logits = out.logits
        for b, f in enumerate(batch_feats):
            pos, ids, probs = self._memo[f["fuse_index"]]
            rows.append(logits[b, pos.to(logits.device) - 1])  # the steps that predict the answer tokens
            dense = torch.zeros(len(pos), logits.shape[-1], device=logits.device)
            dense.scatter_add_(1, ids.to(logits.device), probs.to(logits.device))
            targets.append(dense)
        log_q = torch.log_softmax(torch.cat(rows).float(), dim=-1)
        fuse = fusion_loss(log_q, torch.cat(targets), self.cfg.loss)
        total = self.cfg.lam * clm + (1.0 - self.cfg.lam) * fuse
        return total, {"clm_loss": round(clm.item(), 6), "fuse_loss": round(fuse.item(), 6)}

    # -- fused distributions
    def _prepare(self, indices: Sequence[int]) -> None:
        todo = sorted({i for i in indices if i not in self._memo})
        if not todo:
            return
        per_cand = [self._candidate(m, tok, vmap, todo) for m, tok, vmap in self.candidates]
        for n, i in enumerate(todo):
            ces = [pc[n][0] for pc in per_cand]
            w = fusion_weights(self.cfg.fusion, ces)
            for name, wk in zip(self.weight_totals, w):
                self.weight_totals[name] += wk
            pos = [t for t, lab in enumerate(self.feats[i]["labels"]) if lab != -100 and t >= 1]
            ids_rows, prob_rows = [[] for _ in pos], [[] for _ in pos]
            for k, wk in enumerate(w):
                if wk == 0.0:
                    continue
                dists = per_cand[k][n][1]
                for r, (ids, ps) in enumerate(dists):
                    ids_rows[r] += ids
                    prob_rows[r] += [wk * p for p in ps]
            width = max(len(r) for r in ids_rows)
            ids_t = [r + [0] * (width - len(r)) for r in ids_rows]
            prob_t = [r + [0.0] * (width - len(r)) for r in prob_rows]
            import torch

            self._memo[i] = (torch.tensor(pos, dtype=torch.long), torch.tensor(ids_t, dtype=torch.long),
                             torch.tensor(prob_t, dtype=torch.float32))

    def _candidate(self, model, tok, vmap, indices: Sequence[int]) -> list:
        """Per example: ``(CE on the answer, [(target ids, probs) per target answer position])``."""
        import torch

        from mergelab.fuse.align import align_tokens, one_to_one, transfer_distribution
        from mergelab.llmmix.tasks import collate_for_training, encode_for_training

        feats = [encode_for_training(tok, self.examples[i], None) for i in indices]
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        b = collate_for_training(feats, pad)
        with torch.no_grad():
            logits = model(input_ids=b["input_ids"].to(self.device),
                           attention_mask=b["attention_mask"].to(self.device)).logits.float().cpu()
        logp = torch.log_softmax(logits, dim=-1)
        top_v, top_i = logits.topk(min(self.cfg.top_k, logits.shape[-1]), dim=-1)
        out = []
        for n, i in enumerate(indices):
            f, tf = feats[n], self.feats[i]
            labels = f["labels"]
            gold = [(t, labels[t]) for t in range(1, len(labels)) if labels[t] != -100]
            ce = -sum(logp[n, t - 1, y].item() for t, y in gold) / max(1, len(gold))
            tgt_pos = [t for t, lab in enumerate(tf["labels"]) if lab != -100 and t >= 1]
            if vmap is None:  # the target itself: same tokens, same ids
                src_of = {t: t for t in tgt_pos}
            else:
                s_str = _strings(tok, f["input_ids"], self.target_tok)
                t_str = self.target_tok.convert_ids_to_tokens(tf["input_ids"])
                pairs = one_to_one(s_str, t_str, align_tokens(s_str, t_str))
                src_of = {t: pairs[t] for t in tgt_pos}
            dists = []
            for t in tgt_pos:
                s = src_of[t]
                ids, ps = [], []
                if s is not None and s >= 1:
                    if vmap is None:
                        p = torch.softmax(top_v[n, s - 1] / self.cfg.temperature, dim=-1)
                        ids, ps = top_i[n, s - 1].tolist(), p.tolist()
                    else:
                        ids, ps = transfer_distribution(top_i[n, s - 1].tolist(), top_v[n, s - 1].tolist(), vmap,
                                                        self.cfg.temperature)
                if not ids:  # not aligned one-to-one: one-hot on the target's own token
                    ids, ps = [int(tf["input_ids"][t])], [1.0]
                dists.append((ids, ps))
            out.append((ce, dists))
        return out


def _strings(src_tok, ids: Sequence[int], tgt_tok) -> List[str]:
    """Source token strings, special tokens spelled as the target's token of the same role (BOS, EOS, PAD)."""
    strs = src_tok.convert_ids_to_tokens(list(ids))
    for role in ("bos", "eos", "pad"):
        si, ti = getattr(src_tok, f"{role}_token_id", None), getattr(tgt_tok, f"{role}_token_id", None)
        if si is None or ti is None:
            continue
        name = tgt_tok.convert_ids_to_tokens([ti])[0]
        strs = [name if x == si else s for x, s in zip(ids, strs)]
    return strs


def fuse_train(target_dir: Path, sources: Sequence[Path], tasks: Sequence, run_dir: Path, cfg, settings: FuseSettings,
               replay: Optional[Path] = None, command: str = "", log: Callable[[str], None] = print,
               progress: bool = False, stop_after: Optional[int] = None, fresh: bool = False,
               check_texts: int = 64):
    """Train the model of ``target_dir`` on ``tasks``' training splits with the fusion of ``sources``
    (:class:`FusionObjective`); ``cfg`` is a :class:`~mergelab.llmmix.finetune.FinetuneConfig`.

    Every input is checked (tokenizers present, lambda in range, each source alignable on the first
    ``check_texts`` training texts) before anything is written."""
    from mergelab.llmmix.finetune import finetune

    run_dir = Path(run_dir)
    if not tasks:
        raise FuseError("fusion: no task given (--tasks)")
    objective = FusionObjective(target_dir, sources, settings, device=cfg.device)
    texts = [_example_text(ex) for t in tasks for ex in t.split("train")[:check_texts]]
    objective.check_alignable(texts)
    for src, frac in objective.aligned.items():
        log(f"source {src}: {100 * frac:.1f}% of the target's tokens align one-to-one")
    result = finetune(target_dir, tasks, run_dir, cfg, name=run_dir.name, command=command, log=log,
                      progress=progress, stop_after=stop_after, fresh=fresh, replay=replay, objective=objective)
    trained = hasattr(objective, "weight_totals")  # False when a finished run was found and reused
    if result.final_dir is not None and (trained or not (run_dir / "fuse.json").is_file()):
        rec = {**result.record, "fusion": {"sources": [str(s) for s in objective.sources],
                                           "aligned_fraction": objective.aligned,
                                           "candidate_weight_share": _shares(getattr(objective, "weight_totals", {})),
                                           **dataclasses.asdict(settings)}}
        (run_dir / "fuse.json").write_text(json.dumps(rec, indent=2) + "\n", encoding="utf-8")
    return result


def _shares(totals: dict) -> dict:
    """Each candidate's share of the fusion weight over the sequences fused in this process (for MinCE: how
    often it had the lowest cross-entropy)."""
    s = sum(totals.values())
    return {k: round(v / s, 4) for k, v in totals.items()} if s else {}


def chat_merge(pivot: Path, targets: Sequence[Path], out: Path, method: str = "varm",
               parameters: Optional[dict] = None, overwrite: bool = False):
    """FuseChat's last step: merge the fused targets (all trained from ``pivot``) with VaRM or SCE."""
    from mergelab.merge import merge

    if method not in ("varm", "sce"):
        raise FuseError(f"--method {method!r}: FuseChat merges with varm or sce")
    if len(targets) < 2:
        raise FuseError("FuseChat's merge needs at least two fused targets")
    for t in [pivot, *targets]:
        if not (Path(t) / "config.json").is_file():
            raise FuseError(f"{t}: not a model folder (no config.json)")
    recipe = {"merge_method": method, "base_model": str(pivot), "models": [{"model": str(t)} for t in targets],
              "parameters": dict(parameters or {}), "dtype": "float32", "tokenizer_source": "base"}
    return merge(recipe, out, overwrite=overwrite)
