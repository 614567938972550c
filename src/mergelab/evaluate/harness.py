"""Evaluate an encoder on a suite's tasks: per-task heads on the merged tasks, probes on held-out tasks.

Protocol (as the FusionBench / TIES / RegMean GLUE setups): one encoder, and for every task the head
of that task's own expert. A task held out of the merge has no expert in it; there we measure what a
linear probe fitted on the task's train split on top of the (frozen) encoder reaches on its test split,
the same recipe as the "pretrained" reference, so held-out accuracy compares the merged encoder's
features with the base's (generalisation, or forgetting when lower).
"""

from __future__ import annotations

import time
from typing import Mapping, Sequence

import torch

from mergelab.evaluate.metrics import accuracy, correct_bits
from mergelab.evaluate.model import ResidentEncoder, fit_probe, head_logits, pooled_features
from mergelab.evaluate.tasks import Suite, Task


def gold(task: Task, split: str) -> torch.Tensor:
    return torch.tensor([ex.label for ex in task.split(split)])


def texts(task: Task, split: str) -> list:
    return [ex.text for ex in task.split(split)]


class Evaluator:
    """Scores encoders on a suite; holds the tokenizer, the config and one resident encoder so repeated
    calls stay cheap."""

    def __init__(self, suite: Suite, config, tokenizer, batch_size: int = 128):
        self.suite = suite
        self.config = config
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.resident = ResidentEncoder(config)

    def encoder(self, state: Mapping[str, torch.Tensor]):
        """The evaluator's one BertModel with ``state`` loaded (:class:`ResidentEncoder`): the next call
        overwrites it, so score one encoder before asking for the next."""
        return self.resident.load(dict(state))

    def features(self, encoder, task: Task, split: str) -> torch.Tensor:
        return pooled_features(encoder, self.tokenizer, texts(task, split), self.batch_size)

    def correct(self, encoder, heads: Mapping[str, dict], tasks: Sequence[str], split: str = "test") -> dict:
        """task -> correctness bits of ``encoder`` with ``heads[task]`` on ``split``."""
        out = {}
        for name in tasks:
            task = self.suite.task(name)
            if name not in heads:
                raise KeyError(f"no head for task '{name}'")
            pred = head_logits(self.features(encoder, task, split), heads[name]).argmax(-1)
            out[name] = correct_bits(pred, gold(task, split))
        return out

    def mean_accuracy(self, encoder, heads: Mapping[str, dict], tasks: Sequence[str], split: str) -> float:
        bits = self.correct(encoder, heads, tasks, split)
        return sum(accuracy(b) for b in bits.values()) / len(bits)

    def probe(self, encoder, name: str, seed: int = 0) -> tuple:
        """Fit a linear probe for task ``name`` on ``encoder``'s train features; ``(head, test bits)``."""
        task = self.suite.task(name)
        head = fit_probe(self.features(encoder, task, "train"), [e.label for e in task.split("train")],
                         task.num_labels, seed=seed)
        pred = head_logits(self.features(encoder, task, "test"), head).argmax(-1)
        return head, correct_bits(pred, gold(task, "test"))

    def held_out(self, encoder, tasks: Sequence[str]) -> dict:
        """task -> test accuracy of a probe refitted on ``encoder`` (see module doc)."""
        return {name: accuracy(self.probe(encoder, name)[1]) for name in tasks}

    def evaluate(self, state: Mapping[str, torch.Tensor], heads: Mapping[str, dict], tasks: Sequence[str],
                 held_out: Sequence[str] = (), split: str = "test") -> dict:
        """Correctness bits on ``tasks`` and probe accuracy on ``held_out``, with the time taken."""
        start = time.perf_counter()
        enc = self.encoder(state)
        result = {"correct": self.correct(enc, heads, tasks, split)}
        if held_out:
            result["held_out"] = self.held_out(enc, held_out)
        result["seconds"] = round(time.perf_counter() - start, 2)
        return result
