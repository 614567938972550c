"""``mergelab bench prepare --suite llmmix``: one expert per merged task, the multi-task reference, the base.

Layout under the cache root (as pretraining's: ``--cache``, else ``$MERGELAB_CACHE/llmmix``, else
``~/.cache/mergelab/llmmix``)::

    base-<size>/final/          the pretrained base (``mergelab bench pretrain --size SIZE``); without it the
                                base shipped in the package (``3m``), or --base
    experts-<size>/<task>/      one fine-tuning run per task (see :mod:`mergelab.llmmix.finetune`)
    experts-<size>/multitask/   the multi-task reference, trained on the union of the tasks' train splits
    experts-<size>/base_validation.json   the base's validation accuracy per task (measured once)
    experts-<size>/prepare.json the base used and where it came from (``base_source``: cache, shipped or
                                given), and per model: command(s), steps, seconds, validation accuracy, base accuracy
                                (models of earlier runs with other --tasks are kept)

Held-out tasks (``TaskSpec.held_out``) get no expert and are not in the multi-task mix. A model whose
run folder holds a finished run with the same settings (training settings, base, task data) is skipped;
an unfinished one resumes from its checkpoint; one made with other settings is an error unless
``rebuild``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from mergelab.llmmix.finetune import (FinetuneConfig, FinetuneError, base_fingerprint, finetune, finished,
                                      run_settings)
from mergelab.llmmix.pretrain import base_folder, base_source, default_root, replay_tokens
from mergelab.llmmix.training import restores_torch_threads, write_json

MULTITASK = "multitask"


@dataclass
class PrepareResult:
    folder: Path
    seconds: float
    trained: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    models: dict = field(default_factory=dict)  # name -> record (see module doc)


def _tasks(names: Optional[Sequence[str]], seed: int, sizes: Optional[dict]) -> list:
    from mergelab.llmmix.tasks import build_task, get_spec, task_names

    names = list(names) if names else task_names(held_out=False)
    held = [n for n in names if get_spec(n).held_out]
    if held:
        raise FinetuneError(f"--tasks: {', '.join(held)} held out (no expert may see a held-out task)")
    return [build_task(n, seed=seed, sizes=sizes) for n in names]


def base_accuracy(base_dir: Path, tasks: Sequence, cache_file: Path, cfg: FinetuneConfig,
                  log: Callable[[str], None]) -> dict:
    """The base's validation accuracy per task, measured once per (base, task data, example limit)."""
    from mergelab.llmmix.generate import evaluate_task, load_causal_lm

    saved = json.loads(cache_file.read_text(encoding="utf-8")) if cache_file.is_file() else {}
    fp = base_fingerprint(base_dir)
    key = {t.name: f"{fp}:{t.fingerprint()}:{cfg.eval_limit}" for t in tasks}
    todo = [t for t in tasks if saved.get(t.name, {}).get("key") != key[t.name]]
    if todo:
        log(f"base validation accuracy on {', '.join(t.name for t in todo)} ...")
        model, tok = load_causal_lm(base_dir, device=cfg.device)
        for t in todo:
            acc = evaluate_task(model, tok, t, "validation", limit=cfg.eval_limit,
                                batch_size=cfg.eval_batch_size).accuracy
            saved[t.name] = {"key": key[t.name], "accuracy": acc}
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        write_json(cache_file, saved)
    return {t.name: saved[t.name]["accuracy"] for t in tasks}


@restores_torch_threads
def experts_folder(root: Path, size: str, lora_rank: int = 0) -> Path:
    """Where ``bench prepare`` keeps the experts of a base size: ``experts-SIZE`` (full fine-tunes) or
    ``experts-SIZE-loraR`` (PEFT LoRA adapters of rank R)."""
    return Path(root) / (f"experts-{size}-lora{lora_rank}" if lora_rank else f"experts-{size}")


def prepare(size: str = "3m", root: Optional[Path] = None, cfg: FinetuneConfig = FinetuneConfig(),
            tasks: Optional[Sequence[str]] = None, multitask: bool = True, multitask_steps: Optional[int] = None,
            base_dir: Optional[Path] = None, task_seed: int = 0, sizes: Optional[dict] = None,
            rebuild: bool = False, command: str = "", log: Callable[[str], None] = print,
            progress: bool = True, jobs: int = 1) -> PrepareResult:
    """Fine-tune every missing expert and the multi-task model (default ``steps x tasks`` steps, so it
    sees as many examples of each task as its expert); returns what was trained and skipped.

    ``jobs > 1`` trains that many models at once, each in its own process with one torch thread (the
    longest first). On small models this is much faster than one process with several threads, whose
    small matrix products spend most of their time synchronising; each model is the same either way
    (its seed, data order and steps do not depend on where it runs)."""
    if jobs < 1:
        raise FinetuneError(f"--jobs {jobs}: expected at least 1")
    t0 = time.time()
    if cfg.threads:  # before the base is evaluated, not only for training
        import torch

        torch.set_num_threads(cfg.threads)
    root = Path(root) if root else default_root()
    base_dir = Path(base_dir) if base_dir else base_folder(size, root)
    source = base_source(base_dir)
    log(f"base: {base_dir} ({ {'shipped': 'shipped with mergelab', 'cache': 'cached'}.get(source, 'given')})")
    folder = experts_folder(root, size, cfg.lora_rank)
    replay = replay_tokens(base_dir, root, log) if cfg.replay_batch else None
    built = _tasks(tasks, task_seed, sizes)
    units = [(t.name, [t], cfg) for t in built]
    if multitask and len(built) > 1:
        steps = multitask_steps if multitask_steps is not None else cfg.steps * len(built)
        units.append((MULTITASK, built, dataclasses.replace(cfg, steps=steps)))
    result = PrepareResult(folder, 0.0)
    todo = []
    for name, ts, c in units:
        rec = finished(folder / name, run_settings(c, base_dir, ts, replay))
        if rec is not None:
            result.skipped.append(name)
            result.models[name] = _summary(rec)
        else:
            todo.append((name, ts, c))
    if result.skipped:
        log(f"already prepared: {', '.join(result.skipped)}")
    if todo:
        base_acc = base_accuracy(base_dir, built, folder / "base_validation.json", cfg, log)
        fresh = {name: rebuild and _other_settings(folder / name, c, base_dir, ts, replay) for name, ts, c in todo}
        if jobs > 1 and len(todo) > 1:
            records = _finetune_in_parallel(todo, jobs, base_dir, folder, command, base_acc, fresh, task_seed,
                                            sizes, log, replay)
        else:
            records = {}
            for i, (name, ts, c) in enumerate(todo, 1):
                log(f"[{i}/{len(todo)}] {name}")
                records[name] = finetune(base_dir, ts, folder / name, c, name=name, command=command,
                                         base_accuracy=base_acc, log=log, progress=progress,
                                         fresh=fresh[name], replay=replay).record
        for name, _, _ in todo:
            result.trained.append(name)
            result.models[name] = _summary(records[name])
    result.seconds = time.time() - t0
    old = json.loads((folder / "prepare.json").read_text(encoding="utf-8")) if (folder / "prepare.json").is_file() else {}
    models = {**(old.get("models", {}) if old.get("base") == str(base_dir) else {}), **result.models}
    summary = {"size": size, "base": str(base_dir), "base_source": source, "command": command,
               "tasks": [t.name for t in built], "models": models,
               "last_run": {"trained": result.trained, "skipped": result.skipped, "seconds": round(result.seconds, 1)}}
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "prepare.json", summary)
    return result


def _finetune_one(base_dir, names, task_seed, sizes, run_dir, cfg, name, command, base_acc, fresh, replay) -> dict:
    """One unit of :func:`_finetune_in_parallel`, in a worker process (tasks rebuilt there from their
    names: generated tasks are cheap to draw and need not be pickled)."""
    import torch

    torch.set_num_threads(1)
    tasks = _tasks(names, task_seed, sizes)
    log = lambda msg: print(f"[{name}] {msg}", flush=True)  # noqa: E731
    cfg = dataclasses.replace(cfg, threads=1)
    return finetune(base_dir, tasks, run_dir, cfg, name=name, command=command, base_accuracy=base_acc, log=log,
                    progress=False, fresh=fresh, replay=replay).record


def _parallel_worker(args: tuple, results) -> None:
    name = args[6]
    try:
        results.put((name, True, _finetune_one(*args)))
    except BaseException as e:  # reported to the parent, which stops starting new models
        results.put((name, False, f"{type(e).__name__}: {e}"))


def _finetune_in_parallel(todo, jobs, base_dir, folder, command, base_acc, fresh, task_seed, sizes, log,
                          replay=None) -> dict:
    """Train ``todo``'s models ``jobs`` at a time, each in a process of its own, longest first. A model
    that fails, or SIGTERM / Ctrl-C to this process (forwarded to the running models, which checkpoint),
    stops the run: no new model starts, the running ones end, finished ones stay finished, and the error
    says to run the same command again to resume."""
    import multiprocessing
    import os
    import queue
    import signal

    from mergelab.llmmix.training import on_main_thread

    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    pending = sorted(todo, key=lambda unit: -unit[2].steps * len(unit[1]))
    log(f"training {len(pending)} models, {min(jobs, len(pending))} at a time (one thread each)")
    running: dict = {}
    records: dict = {}
    errors: list = []
    stopped = {"signal": None}

    def on_signal(signum, frame):
        stopped["signal"] = signal.Signals(signum).name
        for proc in running.values():
            if proc.is_alive():
                os.kill(proc.pid, signal.SIGTERM)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)} if on_main_thread() else {}
    try:
        while pending or running:
            while pending and len(running) < jobs and not errors and stopped["signal"] is None:
                name, ts, c = pending.pop(0)
                args = (base_dir, [t.name for t in ts], task_seed, sizes, folder / name, c, name, command, base_acc,
                        fresh[name], replay)
                running[name] = ctx.Process(target=_parallel_worker, args=(args, results), name=f"finetune-{name}")
                running[name].start()
            if not running:
                break
            try:
                name, ok, payload = results.get(timeout=1.0)
            except queue.Empty:
                for name, proc in list(running.items()):
                    if not proc.is_alive() and proc.exitcode != 0:
                        errors.append(f"{name}: its process ended with exit code {proc.exitcode}")
                        del running[name]
                continue
            running.pop(name).join()
            if ok:
                records[name] = payload
                log(f"done: {name}")
            else:
                errors.append(f"{name}: {payload}")
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if errors or stopped["signal"]:
        why = f"stopped by {stopped['signal']}" if stopped["signal"] else "; ".join(errors)
        raise FinetuneError(f"bench prepare --jobs {jobs}: {why}. Finished models are kept and unfinished ones keep "
                            f"their checkpoints: run the same command again to resume")
    return records


def _other_settings(run_dir: Path, cfg: FinetuneConfig, base_dir: Path, tasks, replay=None) -> bool:
    """True when ``run_dir`` holds a checkpoint or record made with other settings."""
    import torch

    settings = run_settings(cfg, base_dir, tasks, replay)
    ckpt = run_dir / "checkpoint" / "state.pt"
    if ckpt.is_file():
        return torch.load(ckpt, map_location="cpu", weights_only=False)["settings"] != settings
    return (run_dir / "finetune.json").is_file()


def _summary(rec: dict) -> dict:
    return {"tasks": rec["tasks"], "command": [r.get("command", "") for r in rec.get("runs", [])],
            "steps": rec["step"], "wall_seconds": rec["wall_seconds"], "eval_seconds": rec.get("eval_seconds"),
            "final_loss": rec.get("final_loss"), "validation_accuracy": rec.get("validation_accuracy"),
            "base_validation_accuracy": rec.get("base_validation_accuracy")}
