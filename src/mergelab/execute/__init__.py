"""Executors: how a merge plan is run (locally, streaming; later on Ray)."""

from mergelab.execute.base import ExecutionReport, Executor
from mergelab.execute.local import LocalExecutor

__all__ = ["Executor", "ExecutionReport", "LocalExecutor"]
