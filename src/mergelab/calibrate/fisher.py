"""Diagonal Fisher information of a model on calibration inputs.

``F = (1/N) sum_n E_y[(d/dtheta log p_theta(y | x_n))^2]`` elementwise, for every parameter. Modes:

* ``exact`` (default for classifiers): per example, the expectation over the model's own predictive
  distribution, ``sum_c p(c|x) (grad log p(c|x))^2`` -- one backward pass per class and example. This
  is the Fisher of Matena & Raffel, "Merging Models with Fisher-Weighted Averaging", NeurIPS 2022
  (arXiv:2111.09832), as computed by their reference code (mmatena/model_merging,
  ``model_merging/fisher.py``: per-example gradients, expectation over classes).
* ``sampled`` (default for causal LMs): per example, one label drawn from the model's own prediction,
  ``(grad log p(y~|x))^2`` -- an unbiased Monte-Carlo estimate of the same Fisher, one backward per
  example. For a causal LM every real position draws its next token from the model and the example's
  log-likelihood is the sum over positions (a *sequence-level* Fisher; the exact expectation over a
  vocabulary is not computed).
* ``empirical``: the true labels (classifiers: the task labels; causal LMs: the next tokens).
* ``batched``: the fast approximation of MergeLM / FusionBench
  (``fusion_bench/method/fisher_merging/clip_fisher_merging.py``): one gradient per *batch* of
  ``sum_n sum_c sqrt(p_nc).detach() log p_nc``, squared, summed over batches and divided by ``N``.
  Squaring a sum over examples and classes brings in cross terms, so this is **not** the Fisher; it is
  offered for speed and parity only, and the statistics file says so.

Memory: one accumulator per parameter (the model's size in float32) plus one gradient.
"""

from __future__ import annotations

from typing import Callable, Dict, Iterable, Optional, Tuple

import torch

from mergelab.calibrate.data import Batch
from mergelab.calibrate.model import CAUSAL_LM, CLASSIFIER, CalibrationModel
from mergelab.errors import MergeLabError
from mergelab.methods.randomness import stream_seed

FISHER_MODES = ("exact", "sampled", "empirical", "batched")


def default_mode(kind: str) -> str:
    return "exact" if kind == CLASSIFIER else "sampled"


def _params(model: CalibrationModel):
    seen, out = set(), []
    for name, p in model.module.named_parameters():
        if id(p) not in seen and p.is_floating_point():
            seen.add(id(p))
            out.append((name, p))
    return out


def _add_sq(acc: Dict[str, torch.Tensor], names, grads, weight: float = 1.0) -> None:
    for name, g in zip(names, grads):
        if g is None:
            continue
        if weight == 1.0:
            acc[name].addcmul_(g, g)
        else:
            acc[name].addcmul_(g, g, value=weight)


def diagonal_fisher(model: CalibrationModel, batches: Iterable[Batch], mode: str = "auto", seed: int = 0,
                    progress: Optional[Callable[[int], None]] = None) -> Tuple[Dict[str, torch.Tensor], int]:
    """``({parameter name: diagonal Fisher}, number of examples)``; parameter names are the module's.

    ``progress(n)`` is called with the number of examples just processed.
    """
    if mode == "auto":
        mode = default_mode(model.kind)
    if mode not in FISHER_MODES:
        raise MergeLabError(f"Fisher mode must be one of {', '.join(FISHER_MODES)} (or auto), got '{mode}'")
    if model.kind not in (CLASSIFIER, CAUSAL_LM):
        raise MergeLabError(f"Fisher information needs a model with an output head; '{model.path}' is a bare "
                            f"{model.kind}")
    if mode == "exact" and model.kind == CAUSAL_LM:
        raise MergeLabError("the exact Fisher of a causal LM sums over the whole vocabulary at every position; "
                            "use --fisher-mode sampled (labels drawn from the model) or empirical")
    params = _params(model)
    names = [n for n, _ in params]
    tensors = [p for _, p in params]
    saved = [p.requires_grad for p in tensors]
    acc = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params}
    examples = 0
    try:
        for p in tensors:
            p.requires_grad_(True)
        for batch in batches:
            if mode == "batched":
                _batched(model, batch, names, tensors, acc)
                examples += len(batch)
                if progress:
                    progress(len(batch))
                continue
            for i in range(len(batch)):
                one = batch.select(i)
                _per_example(model, one, mode, names, tensors, acc, stream_seed(seed, "fisher", examples))
                examples += 1
                if progress:
                    progress(1)
    finally:
        for p, s in zip(tensors, saved):
            p.requires_grad_(s)
    if examples == 0:
        raise MergeLabError("Fisher information needs at least one calibration example")
    for v in acc.values():
        v.div_(examples)
    return acc, examples


def _log_probs(model: CalibrationModel, batch: Batch):
    logits = model.logits(batch.input_ids, batch.attention_mask)
    rows, example, targets = model.scored_rows(logits, batch.input_ids, batch.attention_mask)
    return torch.log_softmax(rows.float(), dim=-1), example, targets


def _per_example(model, one: Batch, mode, names, tensors, acc, seed: int) -> None:
    logp, _, targets = _log_probs(model, one)
    if logp.shape[0] == 0:
        return
    if mode == "exact":
        probs = logp.detach().exp()[0]
        classes = logp.shape[1]
        for c in range(classes):
            grads = torch.autograd.grad(logp[0, c], tensors, retain_graph=c < classes - 1, allow_unused=True)
            _add_sq(acc, names, grads, float(probs[c]))
        return
    if mode == "sampled":
        g = torch.Generator(device="cpu").manual_seed(seed)
        y = torch.multinomial(logp.detach().exp().cpu(), 1, generator=g)[:, 0].to(logp.device)
    else:  # empirical
        if model.kind == CLASSIFIER:
            if one.labels is None:
                raise MergeLabError("the empirical Fisher needs labelled calibration data (a task split, or "
                                    "--label-field for a JSONL file)")
            y = one.labels.to(logp.device)
        else:
            y = targets
    ll = logp.gather(1, y[:, None]).sum()
    grads = torch.autograd.grad(ll, tensors, allow_unused=True)
    _add_sq(acc, names, grads)


def _batched(model, batch: Batch, names, tensors, acc) -> None:
    logp, _, _ = _log_probs(model, batch)
    objective = (logp.detach().exp().sqrt() * logp).sum()
    grads = torch.autograd.grad(objective, tensors, allow_unused=True)
    _add_sq(acc, names, grads)
