"""Collecting statistics: run a model on calibration batches and turn hooks/gradients into tensors.

:func:`collect_grams`, :func:`collect_fisher` and :func:`collect_activations` work on an in-memory
:class:`~mergelab.calibrate.model.CalibrationModel` and return tensors keyed by checkpoint name plus
their metadata; :func:`calibrate` is the whole job for a Hugging Face folder (load, tokenise, collect,
write ``OUT/<statistic>.safetensors`` and ``OUT/calibration.json``).

Everything streams: Grams and Fisher diagonals are running sums, so memory does not grow with the
number of examples (activations are the exception, by nature: they are the examples' hidden states).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

from mergelab.calibrate.data import Batch, CalibrationSet, tokenize_batches
from mergelab.calibrate.fisher import default_mode, diagonal_fisher
from mergelab.calibrate.hooks import GramCollector, linear_layers
from mergelab.calibrate.model import CAUSAL_LM, CalibrationModel, load_model, model_folder
from mergelab.calibrate.store import STATISTICS, folder_size, save_statistic
from mergelab.errors import MergeLabError

Progress = Optional[Callable[[int], None]]


def _version() -> str:
    from mergelab import __version__

    return __version__


def _base_meta(model: CalibrationModel, source: dict, examples: int, seconds: float, settings: dict) -> dict:
    return {
        "producer": f"mergelab {_version()} calibrate",
        "model": model.path,
        "model_kind": model.kind,
        "model_fingerprint": model.fingerprint,
        "data": source,
        "examples": examples,
        "seconds": round(seconds, 3),
        "settings": settings,
        "torch": torch.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _float_checkpoint_names(model: CalibrationModel) -> List[str]:
    if model.checkpoint_names is not None:
        return list(model.checkpoint_names)
    names = [model.checkpoint_name(n) for n, p in model.module.named_parameters(remove_duplicate=False)]
    return list(dict.fromkeys(names))


@torch.no_grad()
def collect_grams(model: CalibrationModel, batches: Sequence[Batch], reduction: str = "mean",
                  mask_padding: bool = True, source: Optional[dict] = None, progress: Progress = None):
    """``(tensors, metadata)`` of the RegMean statistics (see :mod:`mergelab.calibrate.store`)."""
    if reduction not in ("mean", "sum"):
        raise MergeLabError(f"--gram-reduction must be 'mean' or 'sum', got '{reduction}'")
    start = time.perf_counter()
    layers = linear_layers(model.module)
    if not layers:
        raise MergeLabError(f"model {model.path or ''} has no nn.Linear / Conv1D layer to collect Grams for")
    examples = 0
    with GramCollector(layers, mask_padding=mask_padding) as collector:
        for batch in batches:
            collector.mask = batch.attention_mask
            _forward(model, batch)
            examples += len(batch)
            if progress:
                progress(len(batch))
    grams = collector.grams(reduction)
    tensors: Dict[str, torch.Tensor] = {}
    layouts, rows, skipped = {}, {}, {}
    known = set(model.checkpoint_names) if model.checkpoint_names is not None else None
    for layer in layers:
        gram, n = grams[layer.name]
        aliases = _aliases(model, layer.weight_name)
        if len(aliases) > 1:  # tied (e.g. lm_head = word embeddings): also used as a lookup table, so averaged
            skipped[layer.weight_name] = f"tied to {aliases}; averaged, as in the reference"
            continue
        if known is not None and aliases[0] not in known:
            skipped[layer.weight_name] = "not stored in the checkpoint"
            continue
        tensors[aliases[0]] = gram.float()
        layouts[aliases[0]] = "conv1d" if layer.kind == "conv1d" else "linear"
        rows[aliases[0]] = n
    total_rows = max(rows.values()) if rows else 0
    markers = [n for n in _float_checkpoint_names(model) if n not in tensors]
    for n in markers:
        tensors[n] = torch.tensor(float(total_rows))
    meta = _base_meta(model, source or {}, examples, time.perf_counter() - start,
                      {"gram_reduction": reduction, "mask_padding": mask_padding})
    meta.update({"linear_weights": layouts, "rows": rows, "skipped_linear": skipped,
                 "averaged_tensors": "0-d entries hold the row count; RegMean averages these tensors"})
    return tensors, meta


def _aliases(model: CalibrationModel, module_param: str) -> List[str]:
    """Checkpoint names of a module parameter (one, or several when tied)."""
    target = dict(model.module.named_parameters(remove_duplicate=False)).get(module_param)
    names = []
    for n, p in model.module.named_parameters(remove_duplicate=False):
        if p is target:
            names.append(model.checkpoint_name(n))
    return list(dict.fromkeys(names)) or [model.checkpoint_name(module_param)]


def _forward(model: CalibrationModel, batch: Batch):
    if model.logits_fn is not None or model.kind != "encoder":
        return model.logits(batch.input_ids, batch.attention_mask)
    return model.module(input_ids=batch.input_ids, attention_mask=batch.attention_mask)


def collect_fisher(model: CalibrationModel, batches: Sequence[Batch], mode: str = "auto", seed: int = 0,
                   source: Optional[dict] = None, progress: Progress = None):
    """``(tensors, metadata)``: the diagonal Fisher of every float checkpoint tensor (zeros if no gradient)."""
    start = time.perf_counter()
    mode = default_mode(model.kind) if mode == "auto" else mode
    fisher, examples = diagonal_fisher(model, batches, mode, seed, progress)
    tensors: Dict[str, torch.Tensor] = {}
    known = set(model.checkpoint_names) if model.checkpoint_names is not None else None
    for pname, p in model.module.named_parameters(remove_duplicate=False):
        canonical = _canonical(model, pname)
        name = model.checkpoint_name(pname)
        if canonical in fisher and (known is None or name in known):
            tensors[name] = fisher[canonical]
    missing = [n for n in _float_checkpoint_names(model) if n not in tensors]
    meta = _base_meta(model, source or {}, examples, time.perf_counter() - start,
                      {"fisher_mode": mode, "seed": seed,
                       "approximation": mode == "batched"})
    meta["no_gradient"] = missing
    if mode == "batched":
        meta["note"] = ("batched mode squares one gradient per batch (MergeLM/FusionBench); it approximates the "
                        "Fisher with cross-example and cross-class terms")
    return tensors, meta


def _canonical(model: CalibrationModel, pname: str) -> str:
    target = dict(model.module.named_parameters(remove_duplicate=False))[pname]
    for n, p in model.module.named_parameters():
        if p is target:
            return n
    return pname


@torch.no_grad()
def collect_activations(model: CalibrationModel, batches: Sequence[Batch], layers: Optional[Sequence[int]] = None,
                        source: Optional[dict] = None, progress: Progress = None,
                        hidden_fn: Optional[Callable] = None):
    """``(tensors, metadata)``: per example ``input_ids``, ``attention_mask``, ``logits`` and
    ``hidden.<l>`` (the output of block ``l``, 0 = embeddings, as Hugging Face's ``hidden_states``),
    padded to the longest example. Memory and size grow with the number of examples.
    """
    start = time.perf_counter()
    ids, masks, logits, hidden = [], [], [], {}
    for batch in batches:
        if hidden_fn is not None:
            states = hidden_fn(model.module, batch.input_ids, batch.attention_mask)
        else:
            out = model.module(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                               output_hidden_states=True)
            states = out.hidden_states
        chosen = range(len(states)) if layers is None else layers
        for layer in chosen:
            if not -len(states) <= layer < len(states):
                raise MergeLabError(f"--hidden-layers: layer {layer} does not exist (the model has {len(states)} "
                                    f"hidden states, 0 = embeddings)")
            hidden.setdefault(layer % len(states), []).append(states[layer].float())
        if model.kind != "encoder" or model.logits_fn is not None:
            logits.append(model.logits(batch.input_ids, batch.attention_mask).float())
        ids.append(batch.input_ids)
        masks.append(batch.attention_mask)
        if progress:
            progress(len(batch))
    if not ids:
        raise MergeLabError("activations need at least one calibration example")
    t = max(x.shape[1] for x in ids)

    def pad(xs, value=0):
        out = []
        for x in xs:
            if x.dim() >= 2 and x.shape[1] < t:
                shape = list(x.shape)
                shape[1] = t - x.shape[1]
                x = torch.cat([x, torch.full(shape, value, dtype=x.dtype)], 1)
            out.append(x)
        return torch.cat(out, 0)

    tensors = {"input_ids": pad(ids), "attention_mask": pad(masks)}
    if logits:
        tensors["logits"] = pad(logits) if logits[0].dim() == 3 else torch.cat(logits, 0)
    for layer, xs in sorted(hidden.items()):
        tensors[f"hidden.{layer}"] = pad(xs)
    meta = _base_meta(model, source or {}, int(tensors["input_ids"].shape[0]), time.perf_counter() - start,
                      {"hidden_layers": sorted(hidden)})
    return tensors, meta


@dataclass
class CalibrationReport:
    """What :func:`calibrate` wrote: files, examples, seconds per statistic and total bytes."""

    out: Path
    files: Dict[str, Path] = field(default_factory=dict)
    examples: int = 0
    seconds: Dict[str, float] = field(default_factory=dict)
    bytes: int = 0

    def to_dict(self) -> dict:
        return {"out": str(self.out), "files": {k: str(v) for k, v in self.files.items()}, "examples": self.examples,
                "seconds": self.seconds, "bytes": self.bytes}


def calibrate(model_path, data: CalibrationSet, out, statistics: Sequence[str] = ("gram",), *,
              tokenizer_path=None, kind: str = "auto", batch_size: int = 16, max_length: int = 128,
              gram_reduction: str = "mean", mask_padding: bool = True, fisher_mode: str = "auto",
              hidden_layers: Optional[Sequence[int]] = None, seed: int = 0, progress: bool = False,
              model: Optional[CalibrationModel] = None) -> CalibrationReport:
    """Run the model at ``model_path`` on ``data`` and write the requested ``statistics`` to ``out``.

    ``statistics`` is any of ``gram``, ``fisher``, ``activations``. The tokenizer is read from
    ``tokenizer_path`` (default: the model folder). ``model`` may pass an already loaded model.
    """
    unknown = [s for s in statistics if s not in STATISTICS]
    if unknown or not statistics:
        raise MergeLabError(f"--stats: unknown statistic(s) {unknown}; choose from {', '.join(STATISTICS)}")
    if batch_size < 1 or max_length < 2:
        raise MergeLabError(f"--batch-size must be >= 1 and --max-length >= 2 (got {batch_size}, {max_length})")
    cal = model or load_model(model_path, kind)
    tok = _tokenizer(tokenizer_path or model_folder(model_path))
    batches = list(tokenize_batches(tok, data, batch_size, max_length))
    if cal.kind == CAUSAL_LM and all(int(b.attention_mask.sum(1).max()) < 2 for b in batches):
        raise MergeLabError("causal-LM calibration needs texts of at least 2 tokens")
    out = Path(out)
    report = CalibrationReport(out, examples=len(data))
    source = dict(data.source, tokenizer=str(tokenizer_path or model_path), max_length=max_length,
                  batch_size=batch_size)
    for stat in statistics:
        bar = _Bar(stat, len(data)) if progress else None
        t0 = time.perf_counter()
        try:
            if stat == "gram":
                tensors, meta = collect_grams(cal, batches, gram_reduction, mask_padding, source, bar and bar.advance)
            elif stat == "fisher":
                tensors, meta = collect_fisher(cal, batches, fisher_mode, seed, source, bar and bar.advance)
            else:
                tensors, meta = collect_activations(cal, batches, hidden_layers, source, bar and bar.advance)
        finally:
            if bar:
                bar.close()
        report.files[stat] = save_statistic(out, stat, tensors, meta)
        report.seconds[stat] = round(time.perf_counter() - t0, 3)
        del tensors
    report.bytes = folder_size(out)
    # calibration.json keeps one entry per statistic, so calibrating another statistic later adds to it
    path = out / "calibration.json"
    try:
        summary = json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError:
        summary = {}
    entries = summary.get("statistics", {}) if isinstance(summary.get("statistics"), dict) else {}
    for stat in statistics:
        entries[stat] = {"file": str(report.files[stat]), "seconds": report.seconds[stat],
                         "bytes": report.files[stat].stat().st_size, "examples": len(data), "data": source,
                         "settings": {"gram_reduction": gram_reduction, "mask_padding": mask_padding,
                                      "fisher_mode": default_mode(cal.kind) if fisher_mode == "auto" else fisher_mode,
                                      "hidden_layers": hidden_layers, "seed": seed}}
    summary = {"producer": f"mergelab {_version()} calibrate", "model": str(model_path), "statistics": entries,
               "bytes": report.bytes}
    path.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return report


def _tokenizer(path):
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise MergeLabError(f"cannot load a tokenizer from '{path}' ({e}); pass --tokenizer PATH") from None


class _Bar:
    def __init__(self, what: str, total: int):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn(f"[bold]{what}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("examples"), TimeRemainingColumn(), transient=False)
        self.task = self.progress.add_task(what, total=total)
        self.progress.start()

    def advance(self, n: int) -> None:
        self.progress.update(self.task, advance=n)

    def close(self) -> None:
        self.progress.stop()
