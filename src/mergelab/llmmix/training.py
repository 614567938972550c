"""What the llmmix training loops (pretraining a base, fine-tuning experts) share: the learning-rate
schedule, RNG state for exact resumption, the loss log and atomic JSON records."""

from __future__ import annotations

import functools
import json
import math
import os
import random
from pathlib import Path

import numpy as np


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
