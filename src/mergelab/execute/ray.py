"""The Ray executor: the output's shards are split across Ray workers, each writes its own.

The driver (``mergelab merge --executor ray``) plans the merge and lays out the shards exactly as the
local executor does (the same :func:`~mergelab.io.writer.layout_shards`, so every shard's header and
tensor offsets are fixed), then hands each worker a set of whole shards, balanced by bytes. A worker
reads the recipe's inputs itself, from storage every node sees (the paths as the driver resolves
them), rebuilds the same plan, and runs the :class:`~mergelab.execute.local.LocalExecutor` on its
shards' tensors only, writing them into the driver's ``OUT.partial`` folder; whole-model statistics
(methods with ``prepare_model``) are computed by every worker over the whole model. The driver then
checks every shard, writes the index and the metadata. The bytes equal the local executor's: each
tensor is computed by the same code with the same seed and chunking, and written at the same offset.

What bounds the speed-up: every worker reads all the inputs of its tensors (the model's whole size
times the number of inputs, divided among the workers), so the aggregate read bandwidth of the
shared storage, then each node's compute; whole-model statistics are repeated on every worker.
"""

from __future__ import annotations

import os
import time
from typing import Dict, List, Optional

from mergelab.errors import MergeLabError
from mergelab.execute.base import ExecutionReport, Executor


def assign_shards(sizes: Dict[str, int], workers: int) -> List[List[str]]:
    """Shards to workers: largest first, each to the worker with the fewest bytes so far (ties: lowest
    index); deterministic. Empty assignments are dropped."""
    loads = [0] * workers
    out: List[List[str]] = [[] for _ in range(workers)]
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        w = min(range(workers), key=lambda i: (loads[i], i))
        out[w].append(name)
        loads[w] += sizes[name]
    return [a for a in out if a]


class _Subset:
    """A sink over some shards of the output: the other tensors count as complete (another worker's)."""

    def __init__(self, writer, names):
        self.writer = writer
        self.names = names

    def is_complete(self, name: str) -> bool:
        return name not in self.names or self.writer.is_complete(name)

    def write(self, name, tensor, row_start: int = 0) -> None:
        self.writer.write(name, tensor, row_start)


def merge_shards(recipe: dict, cwd: str, folder: str, shards: list, options: dict) -> dict:
    """Worker side: compute and write ``shards`` (a list of :class:`~mergelab.io.writer.Shard`) of
    ``recipe``'s output into ``folder``; returns the worker's report as a dict."""
    from pathlib import Path

    from mergelab.execute.local import LocalExecutor
    from mergelab.io.writer import ShardWriter
    from mergelab.merge import _aux_checkpoints, build_plan, open_checkpoints
    from mergelab.recipe import load_recipe

    if cwd and os.path.isdir(cwd):
        os.chdir(cwd)  # relative paths in the recipe mean what they mean on the driver
    t0 = time.perf_counter()
    r = load_recipe(recipe)
    plan = build_plan(r, open_checkpoints(r))
    writer = ShardWriter(Path(folder), shards, "", record_progress=False, durable=options.get("durable", False))
    names = {e.name for s in shards for e in s.entries}
    ex = LocalExecutor(device=options.get("device", "cpu"), allow_nonfinite=options.get("allow_nonfinite", False),
                       seed=r.seed)
    ex.aux_sources = _aux_checkpoints(plan)
    try:
        rep = ex.run(plan, _Subset(writer, names))
    finally:
        writer.close()
    return {"tensors": rep.tensors, "bytes": rep.bytes, "stats_seconds": rep.stats_seconds,
            "reports": rep.reports, "seconds": time.perf_counter() - t0, "node": os.uname().nodename,
            "shards": [s.filename for s in shards]}


class RayExecutor(Executor):
    """Runs a plan on Ray workers, each writing whole shards (see the module doc).

    ``address``: ``auto``, ``HOST:PORT`` or ``ray://HOST:PORT`` joins a cluster; ``None`` reuses this
    process's Ray session or starts a local one with ``workers`` CPUs. ``workers`` defaults to the
    cluster's CPU count. The sink must be the merge's :class:`~mergelab.io.writer.ShardWriter`.
    """

    def __init__(self, workers: Optional[int] = None, address: Optional[str] = None, device: str = "cpu",
                 allow_nonfinite: bool = False, cwd: Optional[str] = None):
        from mergelab.search.pool import check_ray_address

        if workers is not None and workers < 1:
            raise MergeLabError(f"--workers must be at least 1, got {workers}")
        if address:
            from mergelab.search.pool import connect

            check_ray_address(address)
            connect(address, workers or 1)  # a cluster that cannot be joined fails before anything is read
        else:
            try:
                import ray  # noqa: F401
            except ImportError:
                raise MergeLabError("--executor ray needs the 'ray' package: pip install 'mergelab[search]'") from None
        self.workers, self.address, self.device, self.allow_nonfinite = workers, address, device, allow_nonfinite
        self.cwd = cwd or os.getcwd()
        self.worker_reports: list = []

    def run(self, plan, sink) -> ExecutionReport:
        import ray

        from mergelab.io.writer import ShardWriter
        from mergelab.recipe import dump_recipe
        from mergelab.search.pool import connect

        if not isinstance(sink, ShardWriter):
            raise MergeLabError("the Ray executor writes shard files; merge in memory with the local executor")
        if any(not hasattr(c, "path") for c in plan.checkpoints):
            raise MergeLabError("the Ray executor reads every input from storage; in-memory checkpoints cannot "
                                "be sent to workers")
        started = time.perf_counter()
        connect(self.address, self.workers or 1)
        workers = self.workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        todo = {s.filename: s for s in sink.shards if not all(sink.is_complete(e.name) for e in s.entries)}
        report = ExecutionReport(skipped=sum(len(s.entries) for s in sink.shards if s.filename not in todo))
        groups = assign_shards({n: s.file_bytes for n, s in todo.items()}, workers)
        task = ray.remote(num_cpus=1)(merge_shards)
        options = {"device": self.device, "allow_nonfinite": self.allow_nonfinite, "durable": sink.durable}
        recipe = dump_recipe(plan.recipe)
        refs = [task.remote(recipe, self.cwd, str(sink.folder.resolve()), [todo[n] for n in g], options)
                for g in groups]
        try:
            results = ray.get(refs)
        except ray.exceptions.RayTaskError as e:
            cause = e.cause if isinstance(getattr(e, "cause", None), MergeLabError) else None
            if cause is not None:
                raise cause from None
            raise MergeLabError(f"a Ray worker failed: {e}") from None
        sink.adopt([n for g in groups for n in g])
        self.worker_reports = results
        for res in results:
            report.tensors += res["tensors"]
            report.bytes += res["bytes"]
            report.stats_seconds = max(report.stats_seconds, res["stats_seconds"])
            report.reports.update(res["reports"])
        report.reports["(ray workers)"] = {"workers": len(results), "per_worker": [
            {k: (round(v, 3) if isinstance(v, float) else v) for k, v in res.items() if k != "reports"}
            for res in results]}
        report.seconds = time.perf_counter() - started
        return report
