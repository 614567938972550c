"""Running a merge: recipe -> plan -> executor -> output folder. The Python API lives here.

* :func:`merge` merges the checkpoints a recipe names into a Hugging Face folder.
* :func:`merge_state_dicts` merges in-memory state dicts (``nn.Module.state_dict()``) with the same
  methods, planner and executor.
"""

from __future__ import annotations

import hashlib
import json
import resource
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch

from mergelab.errors import CheckpointError, MergeLabError, OutputError, RecipeError
from mergelab.execute.base import Executor
from mergelab.execute.local import CHUNK_ELEMENTS, WHOLE_ELEMENTS, LocalExecutor
from mergelab.io.checkpoint import Checkpoint
from mergelab.io.memory import StateDictCheckpoint, StateDictSink
from mergelab.io.output import (
    copy_donor_files, donor_files_bytes, partial_path, prepare_output, publish, versions, write_config,
    write_manifest, write_model_card,
)
from mergelab.io.writer import OutputWriteError, ShardWriter, layout_shards, parse_size
from mergelab.methods.registry import get_method
from mergelab.plan import LAYER_COUNT_KEYS, MergePlan
from mergelab.plan import build_models_plan, check_inputs
from mergelab.recipe import Recipe, dump_recipe, load_recipe, normalize_dtype
from mergelab.slices import build_slice_plan

DEFAULT_SHARD_SIZE = "5GB"
# Room kept for the files written besides the weights and the donor's tokenizer files: config,
# model card, weight index and mergelab.json (a few KB to a few hundred KB).
METADATA_BYTES = 1 << 20


class MergeWarning(UserWarning):
    """Something the merge ignores or tolerates that the user should know (see ``MergePlan.warnings``)."""


def _warn(message: str) -> None:
    warnings.warn(message, MergeWarning, stacklevel=3)


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def check_free_space(folder: Path, weights: int, extra: int, reclaimable: int = 0) -> None:
    """Refuse to start a merge whose output (``weights`` bytes of shards plus ``extra`` for the other
    files) cannot fit in the free space of ``folder``'s filesystem (plus ``reclaimable`` bytes the
    merge frees first), naming both numbers."""
    needed = weights + extra
    free = shutil.disk_usage(folder).free + reclaimable
    if needed > free:
        raise OutputError(
            f"not enough free space to write the merge into '{folder}': it needs {_size(needed)} ({needed} bytes: "
            f"{weights} of weights, {extra} kept for config, tokenizer and metadata files) and the filesystem has "
            f"{_size(free)} ({free} bytes) free. Free some space or choose another output folder; --no-space-check "
            f"skips this check (for filesystems that report their free space wrongly)"
        )


@dataclass
class MergeResult:
    """What a merge did: where, how long, how much memory, and the plan's summary."""

    out: Optional[Path]
    seconds: float
    peak_rss_bytes: int
    summary: dict
    notes: List[str] = field(default_factory=list)
    dry_run: bool = False


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def build_plan(recipe: Recipe, checkpoints: Dict[str, Any], strict: bool = False) -> MergePlan:
    """The plan of ``recipe`` over opened checkpoints: :func:`mergelab.slices.build_slice_plan` for a
    ``slices:`` recipe, :func:`mergelab.plan.build_models_plan` for a ``models:`` one, then the checks of
    :func:`mergelab.plan.check_inputs` (warnings, or errors with ``strict``)."""
    planner = build_slice_plan if recipe.slices else build_models_plan
    plan = planner(recipe, checkpoints)
    check_inputs(plan, strict)
    return plan


def open_checkpoints(recipe: Recipe) -> Dict[str, Checkpoint]:
    """Open (headers only) every model the recipe names, ``BASE+ADAPTER`` references as adapted
    checkpoints (:func:`mergelab.io.adapted.open_model`)."""
    from mergelab.io.adapted import open_model

    return {ref: open_model(ref) for ref in recipe.model_refs()}


def _plan_chat_template(plan: MergePlan, vocab) -> None:
    """Resolve the recipe's ``chat_template`` (:mod:`mergelab.vocab.chat`) before anything is written; an
    output without a tokenizer (no vocabulary built, none in the donor) cannot carry one: an error."""
    from mergelab.vocab.chat import resolve

    template, source = resolve(plan.recipe.chat_template, [getattr(c, "path", None) for c in plan.checkpoints])
    donor = getattr(plan.checkpoints[plan.donor_index], "path", None)
    has_tokenizer = vocab is not None or (donor is not None and any(
        (Path(donor) / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")))
    if template is not None and not has_tokenizer:
        raise RecipeError(f"chat_template: the output has no tokenizer to carry it (the donor '{donor}' has no "
                          f"tokenizer files and no tokenizer_source builds one); remove chat_template")
    plan.chat_template = {"template": template, "source": source}
    plan.notes.append(f"chat_template: {source}" + ("" if template is not None else "; the donor's files are kept"))


def _aux_checkpoints(plan: MergePlan) -> Dict[str, list]:
    """Auxiliary per-model inputs (e.g. optimizer second moments) named by the method's parameters.

    OTA's ``second_moments`` may also name a PyTorch optimizer checkpoint (``optimizer.pt``, or a Hugging
    Face checkpoint folder holding one), whose parameter indices are named from model ``i``'s folder: see
    :mod:`mergelab.io.optimizer_state`.
    """
    from mergelab.io.optimizer_state import OptimizerStateCheckpoint, optimizer_state_path
    from mergelab.methods.ota import SECOND_MOMENTS

    out: Dict[str, list] = {}
    for pname in plan.method.aux_inputs:
        paths = []
        for i, settings in enumerate(plan.model_settings):
            value = settings.get(pname, plan.global_settings.get(pname))
            if not isinstance(value, str):
                raise RecipeError(f"models[{i}]: parameter '{pname}' must be a path to a checkpoint")
            label = f"{pname} of model {i}"
            optimizer = optimizer_state_path(value) if pname == SECOND_MOMENTS else None
            if optimizer is not None:
                model = plan.checkpoints[plan.model_indices[i]] if i < len(plan.model_indices) else None
                paths.append(OptimizerStateCheckpoint.open(optimizer, label, model=model))
            else:
                paths.append(Checkpoint.open(value, label=label))
        for job in plan.merged_jobs:
            for ck in paths:
                if job.name not in ck.tensors:
                    raise CheckpointError(f"tensor '{job.name}' is missing from {ck.label} ('{ck.path}')")
        out[pname] = paths
    return out


def plan_fingerprint(plan: MergePlan, shard_bytes: int, seed: int, aux: Optional[Dict[str, list]] = None) -> str:
    """What a resumed merge must share with the interrupted one: recipe, inputs (auxiliary ones such as
    OTA's second moments included), shard size, seed and chunking."""
    data = {
        "recipe": dump_recipe(plan.recipe),
        "inputs": [c.fingerprint() for c in plan.checkpoints],
        "aux": {name: [c.fingerprint() for c in ckpts] for name, ckpts in sorted((aux or {}).items())},
        "shard_bytes": shard_bytes,
        "seed": seed,
        "chunk_elements": CHUNK_ELEMENTS,
        "whole_elements": WHOLE_ELEMENTS,
    }
    if getattr(plan, "vocab", None) is not None:  # the output vocabulary's rows (pad_to_multiple_of included)
        data["vocab_rows"] = plan.vocab.size
        if plan.vocab.rules:  # tokenizer: {tokens: ...} changes rows the tensors' fingerprints do not see
            data["vocab_rules"] = sorted(plan.vocab.rules.items())
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def merge(
    recipe: Union[str, Path, dict, Recipe],
    out: Optional[Union[str, Path]] = None,
    *,
    overwrite: bool = False,
    resume: bool = False,
    dry_run: bool = False,
    device: str = "cpu",
    shard_size: Union[str, int] = DEFAULT_SHARD_SIZE,
    allow_nonfinite: bool = False,
    progress: bool = False,
    executor: Optional[Executor] = None,
    fsync: bool = False,
    strict: bool = False,
    space_check: bool = True,
    on_warning: Optional[Callable[[str], None]] = None,
    checkpoints: Optional[Dict[str, Any]] = None,
) -> MergeResult:
    """Merge the checkpoints named by ``recipe`` into the Hugging Face folder ``out``.

    Everything is validated (recipe, inputs' headers and configs, names, shapes, parameters) before
    any tensor is read. The output is written to ``out.partial`` and renamed at the end; an existing
    ``out`` is refused unless ``overwrite``; ``resume`` continues a killed merge from its completed
    shards. ``fsync`` flushes each shard to disk before renaming it (see
    :class:`~mergelab.io.writer.ShardWriter`).

    Parameters the method does not use (but another method defines) and inputs' configs that differ
    where it matters are warnings, passed one line each to ``on_warning`` (default: Python's
    ``warnings.warn`` with :class:`MergeWarning`) and recorded in ``mergelab.json``; ``strict`` makes
    them errors. ``space_check`` refuses, before any tensor is read, a merge whose output does not fit
    in the free space of the output's filesystem. A failed write (no space, quota, permission) is an
    :class:`~mergelab.io.writer.OutputWriteError`; the completed shards stay in ``out.partial`` for
    ``resume``. ``checkpoints`` maps the recipe's model references to opened checkpoints (any object
    with :class:`~mergelab.io.checkpoint.Checkpoint`'s reading interface, e.g. a SkillPack's
    :class:`~mergelab.compress.skillpack.PackCheckpoint`); by default each is opened from disk.
    """
    started = time.perf_counter()
    r = load_recipe(recipe)
    if r.output is not None and r.output.format == "peft":  # a merge that stays an adapter
        from mergelab.adapters import merge_to_adapter

        return merge_to_adapter(r, out, overwrite=overwrite, dry_run=dry_run, device=device, strict=strict,
                                on_warning=on_warning or _warn, started=started)
    shard_bytes = parse_size(shard_size)
    if shard_bytes <= 0:
        raise MergeLabError(f"--shard-size must be positive, got {shard_size}")
    checkpoints = open_checkpoints(r) if checkpoints is None else checkpoints
    vocab = None
    if r.tokenizer_source is not None:  # rows matched to the output vocabulary by token (mergelab.vocab)
        from mergelab.vocab import align_checkpoints

        checkpoints, vocab = align_checkpoints(r, checkpoints)
    plan = build_plan(r, checkpoints, strict=strict)
    if vocab is not None:
        from mergelab.vocab import check_token_sources

        check_token_sources(plan)  # a token's source model lacking a tensor it is read from: before any write
        plan.vocab = vocab
        plan.notes.extend(vocab.notes)
        plan.warnings.extend(vocab.warnings)
    elif r.tokenizer_source is not None:
        plan.notes.append(f"tokenizer_source: {r.tokenizer_source}: no input has a tokenizer and every embedding "
                          f"has the same rows, so rows were kept as they are")
    if r.chat_template is not None:
        _plan_chat_template(plan, vocab)
    for line in plan.warnings:
        (on_warning or _warn)(line)
    aux = _aux_checkpoints(plan)
    summary = plan.summary(CHUNK_ELEMENTS, shard_bytes, WHOLE_ELEMENTS)
    import psutil

    summary["estimated_peak_bytes"] = psutil.Process().memory_info().rss + summary["estimated_peak_working_bytes"]
    if dry_run:
        return MergeResult(None, time.perf_counter() - started, peak_rss_bytes(), summary, plan.notes, True)
    if out is None:
        raise MergeLabError("an output folder is required (-o OUT)")
    out = Path(out)
    partial, fresh = prepare_output(out, [c.path for c in plan.checkpoints], overwrite, resume)
    writer: Optional[ShardWriter] = None
    try:
        shards = layout_shards([(j.name, j.out_dtype, j.shape) for j in plan.jobs], shard_bytes)
        writer = ShardWriter(partial, shards, plan_fingerprint(plan, shard_bytes, r.seed, aux), resume=resume,
                             durable=fsync)
        if space_check:
            donor = plan.checkpoints[plan.donor_index]
            extra = METADATA_BYTES + donor_files_bytes(getattr(donor, "path", None))
            check_free_space(partial, writer.bytes_to_write(), extra, writer.reclaimable_bytes())
        bar = _progress_bar(plan, writer) if progress else None
        try:
            if executor is None:
                executor = LocalExecutor(device=device, allow_nonfinite=allow_nonfinite, seed=r.seed,
                                         progress=bar.advance if bar else None)
            if isinstance(executor, LocalExecutor):
                executor.aux_sources = aux
            report = executor.run(plan, writer)
        finally:
            writer.close()
            if bar:
                bar.close()
        index = writer.finish()
        for name, rep in report.reports.items():
            if rep.get("rank") == 0:
                plan.notes.append(f"{plan.method.name} kept rank 0 for tensor '{name}' (more models than its rank): "
                                  f"the merged task vector is zero there")
        try:
            _write_metadata(plan, partial, summary, report, index, started, device, shard_bytes, writer)
        except OSError as e:  # writing config, tokenizer files, card or manifest (or reading the donor's files)
            path = Path(e.filename) if e.filename else partial
            what = "write" if partial in (path, *path.parents) or not path.exists() else "copy"
            raise OutputWriteError(what, path, e, partial)
        writer.forget_progress()
        try:
            publish(partial, out, overwrite)
        except OSError as e:
            raise OutputWriteError(f"rename '{partial}' to", out, e, partial)
    except OutputWriteError:
        # Keep the completed shards for --resume; free the space the unfinished ones hold.
        if writer is not None:
            writer.discard_unfinished()
        raise
    except MergeLabError:
        if fresh:
            shutil.rmtree(partial, ignore_errors=True)
        raise
    return MergeResult(out, time.perf_counter() - started, peak_rss_bytes(), summary, plan.notes)


def _write_metadata(plan, folder: Path, summary, report, index, started, device, shard_bytes, writer) -> None:
    r = plan.recipe
    donor = plan.checkpoints[plan.donor_index]
    out_dtype = normalize_dtype(r.out_dtype) or normalize_dtype(r.dtype)
    if out_dtype is None:
        dtypes = {str(j.out_dtype).replace("torch.", "") for j in plan.merged_jobs}
        out_dtype = dtypes.pop() if len(dtypes) == 1 else None
    updates = {}
    cfg = donor.config()
    for job in plan.jobs:
        src = job.models[0] if job.models else job.base
        if src is not None and src.crop is not None and "vocab_size" in (cfg or {}) and job.name.endswith(
                ("embed_tokens.weight", "lm_head.weight", "word_embeddings.weight", "wte.weight")):
            updates["vocab_size"] = job.shape[0]
    if plan.num_layers and cfg:
        for key in LAYER_COUNT_KEYS:
            if key in cfg and cfg[key] != plan.num_layers:
                updates[key] = plan.num_layers
    vocab = getattr(plan, "vocab", None)
    if vocab is not None and cfg is not None:
        updates["vocab_size"] = vocab.size
    write_config(cfg, folder, out_dtype, updates)
    copied = copy_donor_files(donor.path, folder)
    vocabulary = None
    if vocab is not None:
        from mergelab.vocab import write_tokenizer

        written = write_tokenizer(vocab, folder)
        vocabulary = {"tokenizer_source": vocab.source, "rows": vocab.size, "tokens": len(vocab.vocab),
                      "missing_tokens": r.missing_tokens or "base", "pad_to_multiple_of": r.pad_to_multiple_of,
                      "tokenizer_files_written": written, "token_rules": r.tokens,
                      "input_rows": {c.label: n for c, n in zip(plan.checkpoints, vocab.rows)}}
    chat = getattr(plan, "chat_template", None)
    if chat is not None and chat["template"] is not None:
        from mergelab.vocab.chat import write_template

        write_template(folder, chat["template"])
    recipe_data = dump_recipe(r)
    write_model_card(folder, recipe_data, plan.method.summary, plan.method.reference)
    write_manifest(folder, {
        "mergelab_version": versions().get("mergelab"),
        "recipe": recipe_data,
        "method": {"name": plan.method.name, "reference": plan.method.reference},
        "inputs": {c.label: c.fingerprint() for c in plan.checkpoints},
        "versions": versions(),
        "device": device,
        "wall_seconds": round(time.perf_counter() - started, 3),
        "statistics_seconds": round(report.stats_seconds, 3),
        "peak_rss_bytes": peak_rss_bytes(),
        "tensors_written": report.tensors,
        "tensors_resumed": report.skipped,
        "shard_size_bytes": shard_bytes,
        "shards": [s.filename for s in writer.shards],
        "output_bytes": index["metadata"]["total_size"],
        "donor": {"path": str(donor.path), "files_copied": copied},
        "config_updates": updates,
        "vocabulary": vocabulary,
        "chat_template": None if chat is None else {"setting": "auto" if r.chat_template == "auto" else "inline",
                                                    "source": chat["source"],
                                                    "written": chat["template"] is not None},
        "plan": summary,
        "notes": plan.notes,
        "warnings": plan.warnings,
        "config_differences": plan.config_differences,
        "reports": report.reports,
    })


class _Bar:
    """A rich progress bar over output bytes, with tensors done, bytes/s and ETA."""

    def __init__(self, total_bytes: int, total_tensors: int, done_tensors: int):
        from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                                   TransferSpeedColumn)

        self.progress = Progress(
            TextColumn("[bold]merging"), BarColumn(), TextColumn("{task.fields[tensors]} tensors"),
            DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(), transient=False,
        )
        self.total_tensors = total_tensors
        self.done = done_tensors
        self.task = self.progress.add_task("merge", total=total_bytes, tensors=f"{done_tensors}/{total_tensors}")
        self.progress.start()

    def advance(self, job, nbytes: int) -> None:
        self.done += 1
        self.progress.update(self.task, advance=nbytes, tensors=f"{self.done}/{self.total_tensors}")

    def close(self) -> None:
        self.progress.stop()


def _progress_bar(plan: MergePlan, writer: ShardWriter) -> _Bar:
    todo = [j for j in plan.jobs if not writer.is_complete(j.name)]
    return _Bar(sum(j.nbytes for j in todo), len(plan.jobs), len(plan.jobs) - len(todo))


# --------------------------------------------------------------------------- in-memory API
def merge_state_dicts(
    base: Optional[Dict[str, torch.Tensor]],
    models: Sequence[Dict[str, torch.Tensor]],
    method: str,
    *,
    params: Optional[Dict[str, Any]] = None,
    device: str = "cpu",
    seed: int = 0,
    out_dtype: Optional[str] = None,
    post: Optional[List[dict]] = None,
    vocab_policy: str = "error",
    chunk_elements: Optional[int] = None,
    aux: Optional[Dict[str, Sequence[Dict[str, torch.Tensor]]]] = None,
    allow_nonfinite: bool = False,
    **kwargs: Any,
) -> Dict[str, torch.Tensor]:
    """Merge in-memory state dicts (e.g. ``module.state_dict()``) with a registered method.

    Parameters are given as keyword arguments or in ``params`` (use ``params`` or ``lambda_`` for
    ``lambda``). A per-model parameter may be one value for every model or a list with one value per
    model; any value may also be a mergekit-style gradient or filter list. Non-float tensors are
    copied from the base (or the first model). Output tensors keep the base's dtypes unless
    ``out_dtype`` is given. Computation is in float32, exactly as for checkpoint files.

    Methods that take no base (``linear``) ignore ``base`` except as the source of non-float
    tensors: to average the base in, list it among ``models``. ``chunk_elements``, if given, splits
    every tensor of more elements into row chunks of that size (results of random methods depend on
    it); by default the engine chunks as for checkpoint files. ``aux`` gives a method's auxiliary
    inputs in memory, one state dict per model, e.g. ``aux={"second_moments": [v_0, v_1]}`` for OTA.
    NaN or inf in an input or the result (the cast to ``out_dtype`` included) raises
    :class:`~mergelab.errors.NonFiniteError` unless ``allow_nonfinite``.
    """
    m = get_method(method)
    settings: Dict[str, Any] = dict(params or {})
    for k, v in kwargs.items():
        settings[k.rstrip("_") if k.endswith("_") and k[:-1] in ("lambda",) else k] = v
    if not models:
        raise RecipeError("merge_state_dicts: at least one model is required")
    per_model: List[Dict[str, Any]] = [{} for _ in models]
    global_settings: Dict[str, Any] = {}
    for key, value in settings.items():
        if m.model_param(key) is not None and isinstance(value, (list, tuple)) and len(value) == len(models) \
                and all(isinstance(v, (int, float, bool, str)) for v in value) and len(models) > 1:
            for i, v in enumerate(value):
                per_model[i][key] = v
        else:
            global_settings[key] = list(value) if isinstance(value, tuple) else value
    for name in m.aux_inputs:
        for i, row in enumerate(per_model):
            row.setdefault(name, f"<aux {name} of model {i}, in memory>")
    sources: Dict[str, Any] = {}
    recipe: Dict[str, Any] = {"merge_method": method, "parameters": global_settings, "seed": seed,
                              "vocab_policy": vocab_policy, "post": post or []}
    if base is not None and m.base.value in ("required", "optional"):
        sources["base"] = StateDictCheckpoint(base, "base")
        recipe["base_model"] = "base"
    recipe["models"] = []
    for i, sd in enumerate(models):
        sources[f"model_{i}"] = StateDictCheckpoint(sd, f"model_{i}")
        recipe["models"].append({"model": f"model_{i}", "parameters": per_model[i]})
    if out_dtype:
        recipe["out_dtype"] = out_dtype
    r = load_recipe(recipe)
    plan = build_plan(r, sources)
    for line in plan.warnings:
        _warn(line)
    sink = StateDictSink({j.name: j.shape for j in plan.jobs}, {j.name: j.out_dtype for j in plan.jobs})
    sizes = {} if chunk_elements is None else {"chunk_elements": chunk_elements, "whole_elements": None}
    executor = LocalExecutor(device=device, seed=seed, read_ahead=False, allow_nonfinite=allow_nonfinite, **sizes)
    for name in m.aux_inputs:
        given = (aux or {}).get(name)
        if given is None or len(given) != len(models):
            raise RecipeError(f"method '{method}' needs aux={{'{name}': [one state dict per model]}}")
        executor.aux_sources[name] = [StateDictCheckpoint(sd, f"{name} of model {i}") for i, sd in enumerate(given)]
    executor.run(plan, sink)
    return sink.state
