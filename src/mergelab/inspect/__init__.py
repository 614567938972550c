"""Task-vector diagnostics: ``mergelab inspect BASE MODEL...``.

Per layer and for the whole model: task-vector norms, sparsity, pairwise cosine similarity and the
sign-conflict rate, so a user can see why a merge will struggle before running it.

* :mod:`mergelab.inspect.diagnostics`: the additive statistics and their meaning (pure tensor code);
* :mod:`mergelab.inspect.scan`: streams the checkpoints chunk by chunk into a :class:`Diagnostics`;
* :mod:`mergelab.inspect.report`: rich tables, JSON and the PNG figure;
* :mod:`mergelab.inspect.cli`: the Typer command.

Imports are lazy so that mounting the command costs the CLI nothing.
"""

from __future__ import annotations

__all__ = ["inspect_models", "Diagnostics", "TaskVectorStats", "chunk_stats", "interpret"]


def __getattr__(name):
    if name == "inspect_models":
        from mergelab.inspect.scan import inspect_models

        return inspect_models
    if name in ("Diagnostics", "TaskVectorStats", "chunk_stats", "interpret"):
        from mergelab.inspect import diagnostics

        return getattr(diagnostics, name)
    raise AttributeError(f"module 'mergelab.inspect' has no attribute {name!r}")
