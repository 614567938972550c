"""The executor interface: runs a :class:`~mergelab.plan.MergePlan` into a sink.

A sink has ``is_complete(name)`` (already written by an earlier, resumed run) and
``write(name, tensor, row_start)``. The local streaming executor is the default; a distributed
executor (Ray) implements the same interface without touching methods or the planner.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field


@dataclass
class ExecutionReport:
    tensors: int = 0
    skipped: int = 0
    bytes: int = 0
    seconds: float = 0.0
    stats_seconds: float = 0.0
    reports: dict = field(default_factory=dict)


class Executor(abc.ABC):
    @abc.abstractmethod
    def run(self, plan, sink) -> ExecutionReport:
        """Compute every tensor of ``plan`` not already complete in ``sink`` and write it there."""
