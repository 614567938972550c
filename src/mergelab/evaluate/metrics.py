"""Merge-quality metrics computed from per-example correctness.

Every metric here is a function of which test examples a model got right, so a report that stores
those bits (as ``"0110..."`` strings, one character per test example in file order) can be checked by
anyone: accuracy is the share of ``1``, normalised accuracy the ratio of two accuracies, a negative
flip an example that is ``1`` for the reference and ``0`` for the merge.

* accuracy: correct / N on one task's test split.
* normalised accuracy (FusionBench, "What Matters at Scale", MergeBench): merged accuracy on a task
  divided by that task's individual expert's accuracy; averaged over the merged tasks.
* negative-flip rate (MUSCLE, Echterhoff et al. 2024): (1/N) * #{examples the expert got right and
  the merge gets wrong}, against each task's own expert; positive flips are the converse.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import torch


def correct_bits(pred: Sequence[int] | torch.Tensor, gold: Sequence[int] | torch.Tensor) -> str:
    """``"1"`` where ``pred[i] == gold[i]`` else ``"0"``, one character per example."""
    p, g = torch.as_tensor(pred), torch.as_tensor(gold)
    if p.shape != g.shape:
        raise ValueError(f"predictions {tuple(p.shape)} and labels {tuple(g.shape)} differ in shape")
    return "".join("1" if x else "0" for x in (p == g).tolist())


def accuracy(bits: str) -> float:
    """Share of ``1`` in ``bits``; an empty split has no accuracy (ValueError)."""
    if not bits:
        raise ValueError("accuracy of an empty split is undefined")
    return bits.count("1") / len(bits)


def _check(a: str, b: str) -> None:
    if len(a) != len(b):
        raise ValueError(f"correctness strings differ in length ({len(a)} vs {len(b)}): not the same split")


def negative_flip_rate(reference: str, new: str) -> float:
    """(1/N) * #{i: reference right, new wrong}."""
    _check(reference, new)
    return sum(1 for r, n in zip(reference, new) if r == "1" and n == "0") / len(reference)


def positive_flip_rate(reference: str, new: str) -> float:
    """(1/N) * #{i: reference wrong, new right}."""
    _check(reference, new)
    return sum(1 for r, n in zip(reference, new) if r == "0" and n == "1") / len(reference)


def mean(values) -> Optional[float]:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def summarise(correct: Mapping[str, str], tasks: Sequence[str], expert_correct: Mapping[str, str],
              held_out: Optional[Mapping[str, float]] = None) -> dict:
    """Per-task and mean metrics of one model on the merged ``tasks``, against the experts.

    ``correct`` and ``expert_correct`` map task -> correctness bits on the test split. Returns
    ``accuracy``, ``normalised_accuracy``, ``negative_flip_rate``, ``positive_flip_rate`` (each a
    task -> value map) and their means (``mean_*``); ``held_out`` (task -> accuracy) is copied with
    its mean. Normalised accuracy is ``None`` for a task whose expert scored 0.
    """
    acc = {t: accuracy(correct[t]) for t in tasks}
    norm, nfr, pfr = {}, {}, {}
    for t in tasks:
        ref = expert_correct.get(t)
        if ref is None:
            norm[t] = nfr[t] = pfr[t] = None
            continue
        ref_acc = accuracy(ref)
        norm[t] = acc[t] / ref_acc if ref_acc > 0 else None
        nfr[t] = negative_flip_rate(ref, correct[t])
        pfr[t] = positive_flip_rate(ref, correct[t])
    out = {
        "accuracy": acc, "mean_accuracy": mean(acc.values()),
        "normalised_accuracy": norm, "mean_normalised_accuracy": mean(norm.values()),
        "negative_flip_rate": nfr, "mean_negative_flip_rate": mean(nfr.values()),
        "positive_flip_rate": pfr, "mean_positive_flip_rate": mean(pfr.values()),
    }
    if held_out is not None:
        out["held_out_accuracy"] = dict(held_out)
        out["mean_held_out_accuracy"] = mean(held_out.values())
    return out
