"""The local streaming executor: one tensor (or row chunk) at a time, reading ahead on a thread.

For each output tensor the executor reads its inputs lazily, converts them to float32 on the compute
device (except bfloat16 inputs of methods whose CPU kernels take them as stored), runs the method,
applies post-steps, casts once to the output dtype and hands the result to the sink, which writes it
in place. While one chunk is computed the next is read (and its statistics computed) on a background
thread and the previous one is written on another, so reading, compute and writing overlap.

Memory is bounded by the chunk size, not the model size: tensors of chunkable methods with more than
``whole_elements`` elements are split into row chunks of about ``chunk_elements`` elements (chunk
boundaries depend only on the tensor's shape and these sizes, never on threads or timing). Methods
that need statistics over a whole tensor or the whole model get them from
``prepare_tensor``/``prepare_model`` passes over the stream.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch

from mergelab.errors import MergeLabError, NonFiniteError
from mergelab.execute.base import Executor, ExecutionReport
from mergelab.methods.registry import ModelScope, TensorInputs, TensorSource
from mergelab.plan import MergePlan, Source, TensorJob, chunking, is_split

CHUNK_ELEMENTS = 1 << 20  # 1M elements: 4 MB per float32 input chunk
# Tensors up to 4M elements (16 MB per float32 input) are computed whole: their statistics (order
# statistics, norms) then come from one in-memory pass instead of a streamed one, which is faster,
# while the large tensors (embeddings, and every matrix of a 7B model) stream in small chunks. Peak
# memory follows the largest unit times the number of inputs, and glibc keeps the high-water mark.
WHOLE_ELEMENTS = 1 << 22

_MALLOC_TUNED = False


def reuse_freed_buffers() -> None:
    """Ask glibc's malloc to keep freed chunk buffers for reuse instead of giving them back to the OS.

    The stream allocates and frees the same few 16-64 MB buffers thousands of times, on three
    threads. By default glibc maps such blocks fresh (or trims the heap after each free), and the
    page faults of touching new memory cost more system time than the merge's arithmetic (measured:
    5.3 of 18 CPU seconds for DARE-TIES on a 160M-parameter model, 2.8 with this setting, for about
    6% more peak memory; keeping up to 256 MB instead saves a little more time but holds 20% more).
    A no-op where the C library is not glibc.
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED:
        return
    _MALLOC_TUNED = True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8
        libc.mallopt(m_mmap_threshold, 64 << 20)
        libc.mallopt(m_trim_threshold, 64 << 20)
        libc.mallopt(m_arena_max, 2)
    except (OSError, AttributeError):
        pass


def chunk_rows(job: TensorJob, chunkable: bool, chunk_elements: int = CHUNK_ELEMENTS,
               threshold: Optional[int] = None) -> List[Tuple[int, int]]:
    """Row ranges ``[start, stop)`` of dim 0 a tensor is processed in (one range if not chunked).

    A tensor is split only if its method is chunkable and it has more than ``threshold`` (default
    ``chunk_elements``; see :func:`mergelab.plan.split_threshold`) elements.
    """
    if not job.shape:
        return [(0, 0)]
    rows = job.shape[0]
    if not is_split(job, chunkable, chunk_elements if threshold is None else threshold):
        return [(0, rows)]
    per_row = job.numel // rows if rows else 1
    step = max(1, chunk_elements // max(1, per_row))
    return [(a, min(rows, a + step)) for a in range(0, rows, step)]


def _finite(t: torch.Tensor) -> bool:
    """No NaN or inf in ``t`` (one reduction; a second test only when the sum is not finite).

    A finite sum proves every entry finite (an inf or NaN entry makes the sum inf or NaN). A sum can
    overflow from finite entries, though: for float16 (whose sum overflows past 65504) a float32
    sum then decides exactly, for the other dtypes the element-wise test.
    """
    if bool(torch.isfinite(t.sum())):
        return True
    if t.dtype == torch.float16:
        return bool(torch.isfinite(t.sum(dtype=torch.float32)))
    return bool(torch.isfinite(t).all())


def _cast_overflow(plan: MergePlan, job: TensorJob, x: TensorInputs, out: torch.Tensor,
                   final: torch.Tensor) -> NonFiniteError:
    """The error for finite merged values that the cast to the output dtype turns into inf (or NaN)."""
    dtype = str(final.dtype).replace("torch.", "")
    bad = ~torch.isfinite(final)
    n_nan = int(torch.isnan(final).sum())
    n_inf = int(bad.sum()) - n_nan
    chunked = (x.rows[1] - x.rows[0]) != (job.shape[0] if job.shape else 0)
    where = f" (rows {x.rows[0]}:{x.rows[1]})" if chunked else ""
    counts = " and ".join(f"{n} {kind}" for n, kind in ((n_inf, "inf"), (n_nan, "NaN")) if n)
    largest = float(out.abs().max())
    return NonFiniteError(
        f"tensor '{job.name}'{where}: the cast to the output dtype {dtype} gives {counts} value(s) "
        f"({int(bad.sum())} of {final.numel()}); its merged values reach {largest:.6g}, beyond {dtype}'s range "
        f"(±{torch.finfo(final.dtype).max:.6g}). Choose a wider dtype/out_dtype (bfloat16 or float32), or pass "
        f"--allow-nonfinite to write them anyway"
    )


def _nonfinite_input(plan: MergePlan, src: Source, rows: Tuple[int, int], chunked: bool) -> NonFiniteError:
    ckpt = plan.checkpoints[src.checkpoint]
    where = f" (rows {rows[0]}:{rows[1]})" if chunked else ""
    return NonFiniteError(
        f"tensor '{src.name}'{where} of model '{getattr(ckpt, 'label', '?')}' holds NaN or inf values; "
        f"fix the checkpoint or pass --allow-nonfinite to merge anyway"
    )


@dataclass
class _Loaded:
    base: Optional[torch.Tensor]
    models: List[torch.Tensor]
    aux: Dict[str, List[torch.Tensor]] = field(default_factory=dict)


class LocalExecutor(Executor):
    """Runs a plan on one machine; ``device`` is ``cpu``, ``cuda`` or ``cuda:N``.

    Tensors of more than ``whole_elements`` elements are split into row chunks of ``chunk_elements``
    (see :func:`chunk_rows`); ``whole_elements=None`` splits everything above ``chunk_elements``.
    """

    def __init__(self, device: str = "cpu", allow_nonfinite: bool = False, seed: int = 0,
                 chunk_elements: int = CHUNK_ELEMENTS, progress: Optional[Callable[[TensorJob, int], None]] = None,
                 read_ahead: bool = True, whole_elements: Optional[int] = WHOLE_ELEMENTS):
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise MergeLabError(f"--device {device}: no CUDA device is available on this machine")
        self.device = device
        self.allow_nonfinite = allow_nonfinite
        self.seed = seed
        self.chunk_elements = chunk_elements
        self.whole_elements = whole_elements
        self.progress = progress
        self.read_ahead = read_ahead
        self.aux_sources: Dict[str, List] = {}

    # ------------------------------------------------------------------ reading
    def _read_cropped(self, ckpt, name: str, crop: Optional[tuple], rows: Tuple[int, int],
                      chunked: bool, raw: bool = False) -> torch.Tensor:
        """Rows ``rows`` (or all) of tensor ``name``, cut to ``crop`` (vocab_policy), float32 on the device
        (with ``raw``, a bfloat16 tensor stays bfloat16: see ``MergeMethod.raw_inputs``)."""
        info = ckpt.info(name)  # a missing tensor is reported by name, whatever the checkpoint kind
        dtype = None if raw and info.dtype == torch.bfloat16 else torch.float32
        t = ckpt.read(name, rows if chunked else (None if crop is None else (0, crop[0])), dtype, self.device)
        if crop is not None and t.dim() == 2:
            t = t[:, : crop[1]].contiguous()
        return t

    def _read(self, plan: MergePlan, src: Source, rows: Tuple[int, int], chunked: bool,
              raw: bool = False) -> torch.Tensor:
        t = self._read_cropped(plan.checkpoints[src.checkpoint], src.name, src.crop, rows, chunked, raw)
        # A method whose output carries every input entry (a weighted sum) is checked on its output
        # instead, which saves one reduction over every input; see _compute.
        if not self.allow_nonfinite and not plan.method.propagates_nonfinite and not _finite(t):
            raise _nonfinite_input(plan, src, rows, chunked)
        return t

    def _raw(self, plan: MergePlan, job: TensorJob) -> bool:
        """Whether the method sees inputs as stored and may return its output in the output dtype
        (``MergeMethod.raw_inputs``, on a CPU): not where post-steps or auxiliary inputs see the
        method's inputs and output too, which they expect in float32."""
        return plan.method.raw_inputs and self.device == "cpu" and not job.post and not self.aux_sources

    def _load(self, plan: MergePlan, job: TensorJob, rows: Tuple[int, int], chunked: bool) -> _Loaded:
        raw = self._raw(plan, job)
        base = self._read(plan, job.base, rows, chunked, raw) if job.base is not None else None
        models = [self._read(plan, s, rows, chunked, raw) for s in job.models]
        aux = {}
        for pname, ckpts in self.aux_sources.items():
            # One per model, shaped like it: cropped like the model's own tensor (vocab_policy).
            crops = [src.crop for src in job.models] + [None] * max(0, len(ckpts) - len(job.models))
            aux[pname] = [self._read_cropped(c, job.name, crop, rows, chunked) for c, crop in zip(ckpts, crops)]
        return _Loaded(base, models, aux)

    def _inputs(self, plan: MergePlan, job: TensorJob, loaded: _Loaded, chunk: int, rows: Tuple[int, int],
                tensor_stats=None, model_stats=None) -> TensorInputs:
        return TensorInputs(
            name=job.name, shape=job.shape, base=loaded.base, models=loaded.models, params=job.params,
            model_params=job.model_params, seed=self.seed, chunk=chunk, rows=rows, layer=job.layer,
            num_layers=job.num_layers, tensor_stats=tensor_stats, model_stats=model_stats, aux=loaded.aux,
            out_dtype=job.out_dtype if self._raw(plan, job) else None,
        )

    # ------------------------------------------------------------------ statistics
    def _model_stats(self, plan: MergePlan) -> object:
        method = plan.method
        jobs = plan.merged_jobs
        if method.prepare_model is None or not jobs:
            return None

        def chunks() -> Iterator[TensorInputs]:
            for job in jobs:
                ranges = self._ranges(job, method.chunkable, method)
                for c, rows in enumerate(ranges):
                    loaded = self._load(plan, job, rows, len(ranges) > 1)
                    yield self._inputs(plan, job, loaded, c, rows)

        first = jobs[0]
        scope = ModelScope(first.params, first.model_params, len(first.models), chunks)
        return method.prepare_model(scope)

    def _post_stats(self, plan: MergePlan, model_stats) -> Dict[int, object]:
        """Whole-model statistics of post-steps, over the merged task vector (one extra merge pass each)."""
        jobs = plan.merged_jobs
        out: Dict[int, object] = {}
        if not jobs:
            return out
        for k, (step, params) in enumerate(jobs[0].post):
            if step.prepare_model is None:
                continue

            def chunks(k=k) -> Iterator[TensorInputs]:
                for job in jobs:
                    ranges = self._ranges(job, self._chunkable(plan, job), plan.method)
                    loaded = self._load(plan, job, ranges[0], len(ranges) > 1)
                    tstats = self._tensor_stats(plan, job, ranges, loaded)
                    for c, rows in enumerate(ranges):
                        if c:
                            loaded = self._load(plan, job, rows, True)
                        x = self._inputs(plan, job, loaded, c, rows, tstats, model_stats)
                        delta = self._merged_delta(plan, job, x, upto=k, post_stats=out)
                        yield TensorInputs(**{**x.__dict__, "params": job.post[k][1],
                                              "aux": {**x.aux, "merged_delta": delta}})

            scope = ModelScope(params, jobs[0].model_params, len(jobs[0].models), chunks)
            out[k] = step.prepare_model(scope)
        return out

    def _ranges(self, job: TensorJob, chunkable: bool, method) -> List[Tuple[int, int]]:
        chunk, threshold = chunking(self.chunk_elements, self.whole_elements, method)
        return chunk_rows(job, chunkable, chunk, threshold)

    @staticmethod
    def _chunkable(plan: MergePlan, job: TensorJob) -> bool:
        return plan.method.chunkable and all(step.chunkable for step, _ in job.post)

    def _tensor_stats(self, plan: MergePlan, job: TensorJob, ranges, first: Optional[_Loaded]) -> object:
        method = plan.method
        if method.prepare_tensor is None:
            return None

        def chunks() -> Iterator[TensorInputs]:
            for c, rows in enumerate(ranges):
                loaded = first if (c == 0 and first is not None) else self._load(plan, job, rows, len(ranges) > 1)
                yield self._inputs(plan, job, loaded, c, rows)

        src = TensorSource(job.name, job.shape, job.params, job.model_params, len(job.models), len(ranges), chunks)
        return method.prepare_tensor(src)

    # ------------------------------------------------------------------ main loop
    def _merged_delta(self, plan: MergePlan, job: TensorJob, x: TensorInputs, upto: int,
                      post_stats: Dict[int, object]) -> torch.Tensor:
        """The method's merged chunk minus the base, after post-steps ``0..upto-1``."""
        out = plan.method.merge(x)
        expected = (x.rows[1] - x.rows[0],) + tuple(job.shape[1:]) if job.shape else ()
        if tuple(out.shape) != tuple(expected):
            raise MergeLabError(
                f"method '{plan.method.name}' returned shape {list(out.shape)} for tensor '{job.name}', "
                f"expected {list(expected)}"
            )
        delta = out - x.base
        for k, (step, params) in enumerate(job.post[:upto]):
            px = TensorInputs(**{**x.__dict__, "params": params, "model_stats": post_stats.get(k)})
            delta = step.apply(px, delta)
        return delta

    def _compute(self, plan: MergePlan, job: TensorJob, x: TensorInputs,
                 post_stats: Optional[Dict[int, object]] = None) -> torch.Tensor:
        if job.post:
            out = x.base + self._merged_delta(plan, job, x, len(job.post), post_stats or {})
        else:
            out = plan.method.merge(x)
            expected = (x.rows[1] - x.rows[0],) + tuple(job.shape[1:]) if job.shape else ()
            if tuple(out.shape) != tuple(expected):
                raise MergeLabError(
                    f"method '{plan.method.name}' returned shape {list(out.shape)} for tensor '{job.name}', "
                    f"expected {list(expected)}"
                )
        final = out.to(job.out_dtype)
        # Checked after the cast, which can overflow (float32 -> float16 beyond 65504); the narrower
        # tensor is also the cheaper one to check. A wider output dtype is checked before the cast.
        checked = final if final.element_size() <= out.element_size() else out
        if not self.allow_nonfinite and not _finite(checked):
            if checked is not out and _finite(out):
                raise _cast_overflow(plan, job, x, out, final)
            if plan.method.propagates_nonfinite:  # the inputs were not checked when read: find the culprit
                chunked = tuple(x.models[0].shape) != tuple(job.shape)
                for src, t in zip(([job.base] if job.base is not None else []) + list(job.models),
                                  ([x.base] if job.base is not None else []) + list(x.models)):
                    if not _finite(t):
                        raise _nonfinite_input(plan, src, x.rows, chunked)
            raise NonFiniteError(
                f"method '{plan.method.name}' produced NaN or inf for tensor '{job.name}' from finite inputs; "
                f"check its parameters ({job.params})"
            )
        return final.cpu()

    def run(self, plan: MergePlan, sink) -> ExecutionReport:
        report = ExecutionReport()
        reuse_freed_buffers()
        if plan.method.warm_up is not None and self.device == "cpu" and plan.merged_jobs:
            plan.method.warm_up(len(plan.merged_jobs[0].models))
        started = time.perf_counter()
        model_stats = self._model_stats(plan)
        summary = getattr(model_stats, "manifest_report", None)  # whole-model facts for mergelab.json
        facts = summary() if callable(summary) else None
        if facts:
            report.reports["(whole model)"] = facts
        post_stats = self._post_stats(plan, model_stats)
        report.stats_seconds = time.perf_counter() - started

        units: List[Tuple[TensorJob, int, Tuple[int, int], List[Tuple[int, int]]]] = []
        for job in plan.jobs:
            if sink.is_complete(job.name):
                report.skipped += 1
                continue
            ranges = self._ranges(job, self._chunkable(plan, job) and job.action == "merge", plan.method)
            for c, rows in enumerate(ranges):
                units.append((job, c, rows, ranges))

        def load(unit) -> tuple:
            """A unit's inputs, and for the first chunk of a merged tensor its statistics.

            Run on the read-ahead thread, so the statistics of the next tensor (order statistics,
            norms: numpy and torch work that releases the GIL) are computed while this one is merged.
            """
            job, c, rows, ranges = unit
            if job.action == "copy":
                ck = plan.checkpoints[job.base.checkpoint]
                return ck.read(job.base.name, None, None, "cpu"), None
            loaded = self._load(plan, job, rows, len(ranges) > 1)
            return loaded, (self._tensor_stats(plan, job, ranges, loaded) if c == 0 else None)

        reader = ThreadPoolExecutor(1, thread_name_prefix="mergelab-read") if self.read_ahead else None
        writer = ThreadPoolExecutor(1, thread_name_prefix="mergelab-write")
        pending_write: Optional[Future] = None
        next_load: Optional[Future] = None
        tensor_stats = None
        try:
            for k, unit in enumerate(units):
                job, c, rows, ranges = unit
                n = len(ranges)
                current = next_load
                next_load = reader.submit(load, units[k + 1]) if reader and k + 1 < len(units) else None
                loaded, stats = current.result() if current is not None else load(unit)
                del current
                if job.action == "copy":
                    result = loaded.to(job.out_dtype) if job.out_dtype != loaded.dtype else loaded
                else:
                    if c == 0:
                        tensor_stats = stats
                    x = self._inputs(plan, job, loaded, c, rows, tensor_stats, model_stats)
                    if c == 0 and plan.method.report is not None:
                        report.reports[job.name] = plan.method.report(x)
                    result = self._compute(plan, job, x, post_stats)
                    del x
                del loaded
                if pending_write is not None:
                    pending_write.result()
                pending_write = writer.submit(sink.write, job.name, result, rows[0] if n > 1 else 0)
                del result
                if c == n - 1:
                    report.tensors += 1
                    report.bytes += job.nbytes
                    if self.progress:
                        self.progress(job, job.nbytes)
            if pending_write is not None:
                pending_write.result()
        finally:
            if next_load is not None:
                next_load.cancel()
            if reader:
                reader.shutdown(wait=True, cancel_futures=True)
            writer.shutdown(wait=True)
        report.seconds = time.perf_counter() - started
        return report

