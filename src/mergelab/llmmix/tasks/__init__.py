"""Generative tasks of the ``llmmix`` suite: built-in tasks in MergeBench's five categories, user JSONL tasks.

>>> from mergelab.llmmix.tasks import build_task, task_names
>>> task = build_task("arithmetic", seed=0, sizes={"train": 100, "validation": 20, "test": 20})
>>> ex = task.split("test")[0]; task.score(ex.answer, ex)
1.0

See :mod:`.base` (what a task is, splits, registry), :mod:`.builtin` (the tasks), :mod:`.metrics`,
:mod:`.sandbox` (running generated code), :mod:`.jsonl` (user tasks), :mod:`.format` (prompt format
and fine-tuning encoding). Generation and evaluation with a model: :mod:`mergelab.llmmix.generate`.
"""

from mergelab.llmmix.tasks.base import (CATEGORIES, DEFAULT_SIZES, MAX_CHARS, METRICS, SPLITS, GenExample,
                                        GenTask, TaskError, TaskSpec, build_task, get_spec, normalise,
                                        task_names)
from mergelab.llmmix.tasks.format import (IGNORE_INDEX, PROMPT_SUFFIX, collate_for_training, encode_for_training,
                                          encode_prompt, render_prompt)
from mergelab.llmmix.tasks.jsonl import load_jsonl_task, write_task_jsonl
from mergelab.llmmix.tasks.metrics import score

__all__ = ["CATEGORIES", "DEFAULT_SIZES", "MAX_CHARS", "METRICS", "SPLITS", "GenExample", "GenTask", "TaskError",
           "TaskSpec", "build_task", "get_spec", "normalise", "task_names", "IGNORE_INDEX", "PROMPT_SUFFIX",
           "collate_for_training", "encode_for_training", "encode_prompt", "render_prompt", "load_jsonl_task", "write_task_jsonl",
           "score", "REFUSAL"]


def __getattr__(name):
    if name == "REFUSAL":
        from mergelab.llmmix.tasks.builtin import REFUSAL

        return REFUSAL
    raise AttributeError(name)
