"""Tiny trained causal-LM experts for the search tests.

A tiny Llama base (``tests/llmmix/test_run.py``'s: 2 layers, hidden 64, a 400-token BPE) fine-tuned
for a few AdamW steps on two llmmix tasks (``llmmix.finetune``), float32: real task vectors, small
enough that one candidate merges and scores in well under a second. Built once per session (set
``MERGELAB_SEARCH_CACHE=DIR`` to keep them between runs while working on the tests).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

TASKS = ("language_id", "refusal")
SIZES = {"train": 32, "validation": 6, "test": 4}
STEPS = 16


@dataclass
class Family:
    root: Path
    base: Path
    experts: list


def _build(root: Path) -> Family:
    import torch

    from mergelab.llmmix.finetune import FinetuneConfig, finetune
    from mergelab.llmmix.tasks import build_task
    from tests.llmmix.test_run import save_base

    base = root / "base"
    experts = [root / name / "final" for name in TASKS]
    if all((e / "model.safetensors").is_file() for e in experts):
        return Family(root, base, experts)
    threads = torch.get_num_threads()
    try:
        save_base(base)
        cfg = FinetuneConfig(steps=STEPS, batch_size=8, lr=3e-3, checkpoint_every=1000, threads=1, eval_limit=1,
                             replay_batch=0)
        for name in TASKS:
            finetune(base, [build_task(name, seed=0, sizes=SIZES)], root / name, cfg, log=lambda m: None,
                     progress=False)
    finally:
        torch.set_num_threads(threads)  # training with threads=1 sets it for the whole process
    return Family(root, base, experts)


@pytest.fixture(scope="session")
def family(tmp_path_factory) -> Family:
    cache = os.environ.get("MERGELAB_SEARCH_CACHE")
    root = Path(cache) if cache else tmp_path_factory.mktemp("search-family")
    root.mkdir(parents=True, exist_ok=True)
    return _build(root)


def config(family: Family, method: str = "ties", max_evals: int = 6, popsize: int = 3, **genome) -> dict:
    """A search config over the family: loss on the two tasks' validation splits."""
    g = {"models": [str(e) for e in family.experts], "merge_method": method}
    if method != "slerp" and method != "linear":
        g["base_model"] = str(family.base)
    g.update(genome)
    return {"genome": g,
            "fitness": {"suite": "llmmix", "tasks": list(TASKS), "examples": SIZES, "metric": "loss"},
            "search": {"max_evals": max_evals, "popsize": popsize, "seed": 3}}
