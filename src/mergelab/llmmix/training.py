"""What the llmmix training loops (pretraining a base, fine-tuning experts) share: the split of a run's
settings into its identity and how it runs (:class:`RunConfig`), the learning-rate schedule, RNG state
for exact resumption, the loss log, atomic JSON records and the answer-only loss."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import random
from pathlib import Path

import numpy as np


class RunConfig:
    """Base of a training run's frozen config dataclass (``PretrainConfig``, ``FinetuneConfig``).

    Every field is part of the run's identity except those named in ``RUNTIME``, which only say how
    it runs (checkpoint interval, evaluation size, device, threads) and may change between a run and
    its resumption. :meth:`settings` is that identity as recorded in the run's JSON and checkpoint and
    compared on resumption: the fields in declaration order, ``warmup`` resolved to
    :meth:`warmup_steps`, tuples as lists (as JSON reads them back). A subclass sets ``RUNTIME`` and
    ``WARMUP_CAP`` and has the fields ``steps`` and ``warmup`` (``None``: ``min(WARMUP_CAP, steps // 10)``).
    """

    RUNTIME = ()
    WARMUP_CAP = 200

    def warmup_steps(self) -> int:
        return self.warmup if self.warmup is not None else min(self.WARMUP_CAP, self.steps // 10)

    def settings(self) -> dict:
        d = dataclasses.asdict(self)
        d["warmup"] = self.warmup_steps()
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items() if k not in self.RUNTIME}


def differing(saved: dict, settings: dict) -> list:
    """The keys, sorted, whose values differ between a recorded run's settings and ``settings``."""
    return sorted(k for k in set(saved) | set(settings) if saved.get(k) != settings.get(k))


def lr_schedule(cfg):
    """Linear warm-up over ``cfg.warmup_steps()`` steps, then a cosine decay to ``cfg.min_lr_ratio``
    of the peak at ``cfg.steps`` (a ``LambdaLR`` multiplier)."""
    warm = cfg.warmup_steps()

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, cfg.steps - warm)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def rng_state() -> dict:
    """Python, numpy and torch (and CUDA) RNG states, for a checkpoint a run resumes from exactly."""
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore the states of :func:`rng_state`."""
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def read_log(path: Path, upto: int) -> list:
    """Loss-log records with ``step <= upto`` (later ones were written after the last checkpoint)."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            rec = json.loads(line)
            if rec["step"] <= upto:
                out.append(rec)
    return out


def on_main_thread() -> bool:
    """Whether this is the main thread (only it may install signal handlers)."""
    import threading

    return threading.current_thread() is threading.main_thread()


def write_json(path: Path, data: dict) -> None:
    """Write ``data`` to ``path`` atomically (a partial file, then a rename)."""
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def restores_torch_threads(fn):
    """Decorate a training entry point that sets torch's thread count (``--threads``: one thread is
    faster on a busy machine) so that the caller's count is back when it returns or raises."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import torch

        threads = torch.get_num_threads()
        try:
            return fn(*args, **kwargs)
        finally:
            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)

    return wrapper


def answer_loss(model, batch: dict):
    """The causal-LM loss transformers computes for ``model(**batch).loss`` (labels shifted one to the
    left, positions labelled -100 ignored, the mean over the rest, logits in float32), with the LM head
    applied only to the labelled positions. A fine-tuning example labels its answer alone (about a fifth
    of a padded batch here), and the head over an 8k vocabulary is a third of a small model's
    multiply-adds per token, so this makes a fine-tuning step about 20% cheaper; the value and the
    gradients are the same up to float32 rounding. For decoder models whose logits are the head's
    output as is (Llama, Mistral, Qwen); ``model`` may be wrapped by PEFT (its adapters are in place)."""
    import torch

    hidden = model.get_decoder()(input_ids=batch["input_ids"],
                                 attention_mask=batch.get("attention_mask")).last_hidden_state
    labels = batch["labels"][:, 1:]
    keep = labels != -100
    logits = model.get_output_embeddings()(hidden[:, :-1][keep])
    return torch.nn.functional.cross_entropy(logits.float(), labels[keep])
