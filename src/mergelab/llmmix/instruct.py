"""``mergelab bench instruct --suite llmmix --size SIZE``: the instruction-tuned variant of a base.

"What Matters for Model Merging at Scale?" (Yadav et al., 2024) compares merges of experts fine-tuned
from a pretrained base (PaLM-2) and from its instruction-tuned version (PaLM-2-IT), and finds that the
instruction-tuned base merges better. The miniature: the pretrained ``llmmix`` base of ``SIZE``
fine-tuned on the instruction mix of :mod:`mergelab.llmmix.tasks.instruct_mix` (eight tasks other than
the suite's, see there), with replay of its pretraining text as for the experts, into::

    CACHE/base-SIZE-instruct/final/       the instruction-tuned base (a normal llmmix base folder)
    CACHE/base-SIZE-instruct/pretrain.json the pretrained base's record, so fine-tuning from this base
                                          replays the same pretraining text
    CACHE/base-SIZE-instruct/finetune.json, loss.jsonl, loss.png, checkpoint/   (the fine-tuning run)

It is then an ordinary base of size name ``SIZE-instruct``: ``bench prepare --size 3m-instruct``
fine-tunes the experts from it (into ``experts-3m-instruct``), ``bench run`` and ``bench scale`` merge
them. Seeded and resumable like every fine-tuning run (:func:`mergelab.llmmix.finetune.finetune`).
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Callable, Optional

from mergelab.llmmix.finetune import FinetuneConfig, FinetuneResult, finetune
from mergelab.llmmix.model import INSTRUCT_SUFFIX, split_size
from mergelab.llmmix.pretrain import PretrainError, base_folder, default_root, replay_tokens
from mergelab.llmmix.tasks.instruct_mix import instruct_tasks

# Steps and rate of the instruction tuning: a third more steps than an expert's 600 for eight tasks at
# once, at the experts' rate; replay as for the experts.
INSTRUCT_STEPS = 800
INSTRUCT_LR = 1e-3


def instruct_folder(size: str, root: Optional[Path] = None) -> Path:
    """``CACHE/base-SIZE-instruct``: where the instruction-tuned variant of ``size`` is trained."""
    return (Path(root) if root else default_root()) / f"base-{size}{INSTRUCT_SUFFIX}"


def instruct_base(size: str, root: Optional[Path] = None, cfg: Optional[FinetuneConfig] = None,
                  base_dir: Optional[Path] = None, task_seed: int = 0, sizes: Optional[dict] = None,
                  command: str = "", log: Callable[[str], None] = print, progress: bool = True,
                  stop_after: Optional[int] = None, fresh: bool = False) -> FinetuneResult:
    """Train (or resume) ``base-SIZE-instruct`` from the pretrained base of ``size`` (``base_dir``
    overrides where that base is read). Returns the fine-tuning result; its ``final_dir`` is the new base."""
    shape, instruct = split_size(size)
    if instruct:
        raise PretrainError(f"--size {size}: give the pretrained base's size ({shape}); "
                            f"the instruction-tuned one is written as {shape}{INSTRUCT_SUFFIX}")
    root = Path(root) if root else default_root()
    cfg = cfg or default_config()
    base_dir = Path(base_dir) if base_dir else base_folder(size, root)
    replay = replay_tokens(base_dir, root, log) if cfg.replay_batch else None
    run_dir = instruct_folder(size, root)
    tasks = instruct_tasks(task_seed, sizes)
    log(f"instruction-tuning {base_dir} on {', '.join(t.name for t in tasks)} "
        f"({sum(len(t.split('train')) for t in tasks)} examples, {cfg.steps} steps) -> {run_dir}")
    result = finetune(base_dir, tasks, run_dir, cfg, name=f"{size}{INSTRUCT_SUFFIX}", command=command, log=log,
                      progress=progress, stop_after=stop_after, fresh=fresh, replay=replay)
    record = next((p for p in (base_dir / "pretrain.json", base_dir.parent / "pretrain.json") if p.is_file()), None)
    if record is not None and result.final_dir is not None and result.final_dir.is_dir():
        shutil.copy2(record, run_dir / "pretrain.json")
    return result


def default_config(**overrides) -> FinetuneConfig:
    """The instruction tuning's settings (:data:`INSTRUCT_STEPS`, :data:`INSTRUCT_LR`), with ``overrides``."""
    return dataclasses.replace(FinetuneConfig(steps=INSTRUCT_STEPS, lr=INSTRUCT_LR),
                               **{k: v for k, v in overrides.items() if v is not None})
