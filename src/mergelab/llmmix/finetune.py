"""Fine-tune a full ``llmmix`` expert (or the multi-task reference) from a base folder, resumably.

A run reads a base folder (``LlamaForCausalLM`` + tokenizer, e.g. ``base-3m/final``), the training
splits of one or more generative tasks, and writes into its run folder::

    checkpoint/state.pt   model, optimizer, scheduler, RNG states and the step (replaced atomically)
    loss.jsonl            one line per step: step, loss, lr, seconds (and replay_loss with replay)
    loss.png              the loss curve
    finetune.json         settings, command(s), steps, time, validation accuracy (and the base's)
    final/                the fine-tuned model: AutoModelForCausalLM / AutoTokenizer load it (a LoRA
                          run: a PEFT adapter folder that PeftModel.from_pretrained loads on the base)

Training: every training example of every task is encoded once with
:func:`mergelab.llmmix.tasks.encode_for_training` (prompt tokens masked with -100, answer + EOS
learnt); the examples of all tasks form one pool, and step ``s`` reads positions ``s*B .. s*B+B-1``
of a sequence of seeded permutations of the pool (one per epoch), so the data order is a function of
the seed and the step alone and a resumed run reads what an uninterrupted one reads. AdamW (betas
0.9/0.95, weight decay on matrices only), linear warm-up then cosine decay to 10% of the peak rate
(pretraining's schedule), gradient clipping at 1.0, float32, no dropout. With replay
(``replay_batch`` > 0, the default) each step adds the next-token loss of ``replay_batch`` seeded blocks
of the base's pretraining token stream (:func:`mergelab.llmmix.pretrain.replay_tokens`), which keeps the
expert near the base's language model so that experts can be merged. With ``lora_rank`` > 0 only PEFT
LoRA adapters train (:func:`lora_config`), the base frozen. A run stopped (``stop_after``,
Ctrl-C, SIGTERM) keeps its checkpoint; the same call resumes it and ends with the same weights.

At the end the model's greedy validation accuracy on each task is measured with
:mod:`mergelab.llmmix.generate` and recorded beside the base's accuracy on the same examples (given by
the caller, who measures the base once per task), so the expert-vs-base gap can be checked.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from mergelab.errors import MergeLabError
from mergelab.llmmix.model import split_size
from mergelab.llmmix.pretrain import plot_losses
from mergelab.llmmix.training import (RunConfig, answer_loss, differing, lr_schedule, on_main_thread, read_log,
                                      restores_torch_threads, rng_state, set_rng_state, write_json)


class FinetuneError(MergeLabError):
    """A fine-tuning run cannot start or resume as asked."""


@dataclass(frozen=True)
class FinetuneConfig(RunConfig):
    steps: int = 600
    batch_size: int = 16
    lr: float = 1e-3
    warmup: Optional[int] = None  # default: min(50, steps // 10)
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    max_length: int = 512
    # Replay: each step also takes ``replay_batch`` blocks of ``replay_len`` tokens of the base's
    # pretraining text and adds their next-token loss (times ``replay_weight``), so an expert learns its
    # task without forgetting the language model it merges with (0: no replay). Without it the 3m experts
    # lost the base's language model (held-out perplexity 40k-2.8M against the base's 63) and every
    # merge of them collapsed; with 8 blocks, lr 1e-3 and 600 steps string_ops reaches 46% at perplexity 100.
    replay_batch: int = 8
    replay_len: int = 128
    replay_weight: float = 1.0
    # LoRA (PEFT) instead of a full fine-tune when lora_rank > 0: adapters on LORA_TARGETS, alpha
    # lora_alpha (default 2 x rank), no dropout; the base stays frozen and final/ is a PEFT adapter folder.
    lora_rank: int = 0
    lora_alpha: Optional[float] = None
    # not part of the run's identity
    checkpoint_every: int = 100
    eval_limit: Optional[int] = None  # validation examples per task scored at the end (None: all)
    eval_batch_size: int = 64
    device: str = "cpu"
    threads: Optional[int] = None

    RUNTIME = ("checkpoint_every", "eval_limit", "eval_batch_size", "device", "threads")
    WARMUP_CAP = 50


# Per-size recipe where the defaults above do not fit: at 1m, 600 steps at 1e-3 with replay underfit
# (string_ops 15.5% on validation); 1,000 steps at 2e-3 reach 36% at 1.9x the base's perplexity.
SIZE_RECIPES = {"1m": {"steps": 1000, "lr": 2e-3}}


def recipe_for_size(size: str) -> dict:
    """The fine-tuning ``steps`` and ``lr`` ``bench prepare`` uses by default for a base size (an
    instruction-tuned variant, ``3m-instruct``, takes its size's recipe)."""
    defaults = {"steps": FinetuneConfig.steps, "lr": FinetuneConfig.lr}
    return {**defaults, **SIZE_RECIPES.get(split_size(size)[0], {})}


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def lora_config(cfg: FinetuneConfig):
    """The PEFT ``LoraConfig`` of a LoRA run (``cfg.lora_rank`` > 0)."""
    from peft import LoraConfig

    alpha = cfg.lora_alpha if cfg.lora_alpha is not None else 2.0 * cfg.lora_rank
    return LoraConfig(r=cfg.lora_rank, lora_alpha=alpha, target_modules=list(LORA_TARGETS), lora_dropout=0.0,
                      bias="none", task_type="CAUSAL_LM")


def base_fingerprint(base_dir: Path) -> str:
    """A short hash of the base's config and weights file (size and first/last MB): changes with the base."""
    base_dir = Path(base_dir)
    w = base_dir / "model.safetensors"
    if not w.is_file():
        raise FinetuneError(f"{base_dir}: no model.safetensors (expected a base folder such as base-3m/final)")
    h = hashlib.sha256((base_dir / "config.json").read_bytes() if (base_dir / "config.json").is_file() else b"")
    size = w.stat().st_size
    h.update(str(size).encode())
    with open(w, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


class Pool:
    """Encoded training examples of all tasks; the order is a seeded permutation per epoch."""

    def __init__(self, features: list, seed: int):
        if not features:
            raise FinetuneError("fine-tuning: the tasks have no training examples")
        self.features, self.seed, self.n = features, seed, len(features)
        self._perm: dict = {}

    def order(self, epoch: int) -> np.ndarray:
        if epoch not in self._perm:
            self._perm = {epoch: np.random.default_rng([self.seed, 7, epoch]).permutation(self.n)}
        return self._perm[epoch]

    def batch(self, step: int, batch_size: int) -> list:
        return [self.features[int(self.order(g // self.n)[g % self.n])]
                for g in range(step * batch_size, (step + 1) * batch_size)]


@dataclass
class FinetuneResult:
    run_dir: Path
    final_dir: Optional[Path]
    step: int
    losses: list
    seconds: float
    record: dict


def run_settings(cfg: FinetuneConfig, base_dir: Path, tasks: Sequence, replay: Optional[Path] = None) -> dict:
    """What identifies a run: the training settings, the base, each task's data and the replay text."""
    out = {**cfg.settings(), "base": base_fingerprint(base_dir),
           "tasks": {t.name: t.fingerprint() for t in tasks}}
    if cfg.replay_batch:
        out["replay_tokens"] = replay_fingerprint(replay)
    return out


def replay_fingerprint(tokens_file: Optional[Path]) -> str:
    if tokens_file is None or not Path(tokens_file).is_file():
        raise FinetuneError(f"replay needs the base's pretraining token file (train.u16); got {tokens_file} "
                            "(fine-tune without replay with --replay-batch 0)")
    size = Path(tokens_file).stat().st_size
    with open(tokens_file, "rb") as f:
        head = f.read(1 << 20)
    return hashlib.sha256(str(size).encode() + head).hexdigest()[:16]


def finished(run_dir: Path, settings: dict) -> Optional[dict]:
    """The run's record if ``run_dir/final`` holds a finished run with ``settings``; else None."""
    rec_path = Path(run_dir) / "finetune.json"
    final = Path(run_dir) / "final"
    weights = final / "model.safetensors", final / "adapter_model.safetensors"
    if not any(w.is_file() for w in weights) or not rec_path.is_file():
        return None
    rec = json.loads(rec_path.read_text(encoding="utf-8"))
    return rec if rec.get("settings") == settings and rec.get("finished") else None


@restores_torch_threads
def finetune(base_dir: Path, tasks: Sequence, run_dir: Path, cfg: FinetuneConfig, name: str = "",
             command: str = "", base_accuracy: Optional[dict] = None, log: Callable[[str], None] = print,
             progress: bool = True, stop_after: Optional[int] = None, fresh: bool = False,
             replay: Optional[Path] = None, objective=None) -> FinetuneResult:
    """Fine-tune (or resume) the model of ``base_dir`` on the training splits of ``tasks``.

    ``base_accuracy`` maps task name to the base's validation accuracy (recorded beside the model's).
    ``stop_after`` stops at that step as a kill would (for tests). A finished run with the same settings
    returns at once; one with other settings is an error unless ``fresh`` (start over). ``replay`` is the
    base's pretraining token file (``tokens-*/train.u16``), needed when ``cfg.replay_batch`` > 0.
    ``objective`` replaces the task loss (e.g. :class:`mergelab.fuse.train.FusionObjective`): its
    ``settings()`` join the run's identity, ``bind(model, tok, examples, features)`` is called once before
    training, and ``loss(model, features, batch)`` returns ``(loss, numbers to log)`` each step.
    """
    import torch

    from mergelab.llmmix.generate import evaluate_task, load_causal_lm
    from mergelab.llmmix.tasks import collate_for_training, encode_for_training

    if cfg.steps < 1 or cfg.batch_size < 1:
        raise FinetuneError("--steps and --batch-size must be >= 1")
    if not tasks:
        raise FinetuneError("fine-tuning: no task given")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise FinetuneError(f"--device {cfg.device}: CUDA is not available in this torch build")
    run_dir, base_dir = Path(run_dir), Path(base_dir)
    name = name or run_dir.name
    settings = run_settings(cfg, base_dir, tasks, replay)
    if objective is not None:
        settings["objective"] = objective.settings()
    ckpt = run_dir / "checkpoint" / "state.pt"
    final = run_dir / "final"
    if fresh and run_dir.exists():
        shutil.rmtree(run_dir)
    done = finished(run_dir, settings)
    if done is not None:
        log(f"{final}: already fine-tuned ({done['step']} steps)")
        recs = read_log(run_dir / "loss.jsonl", done["step"])
        return FinetuneResult(run_dir, final, done["step"], [(r["step"], r["loss"]) for r in recs],
                              done["wall_seconds"], done)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)

    model, tok = load_causal_lm(base_dir, device=cfg.device)
    if cfg.lora_rank:
        from peft import get_peft_model

        torch.manual_seed(cfg.seed)  # PEFT draws the A matrices from torch's generator
        model = get_peft_model(model, lora_config(cfg))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    examples = [ex for t in tasks for ex in t.split("train")]
    feats = [encode_for_training(tok, ex, cfg.max_length) for ex in examples]
    if objective is not None:
        objective.bind(model, tok, examples, feats)
    pool = Pool(feats, cfg.seed)
    replay_blocks = None
    if cfg.replay_batch:
        from mergelab.llmmix.pretrain import Blocks

        replay_blocks = Blocks(Path(replay), cfg.replay_len, cfg.seed + 1)
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.ndim >= 2]
    no_decay = [p for p in trainable if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_schedule(cfg))

    start, elapsed, runs = 0, 0.0, []
    if ckpt.is_file():
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        if state["settings"] != settings:
            diff = differing(state["settings"], settings)
            raise FinetuneError(f"{run_dir}: holds a run made with other settings ({', '.join(diff)} differ); "
                                "resume with those settings, or start over (--rebuild / fresh=True)")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        start, elapsed, runs = state["step"], state["elapsed"], state["runs"]
        log(f"resuming {name} at step {start}/{cfg.steps}")
    else:
        torch.manual_seed(cfg.seed)
    log_path = run_dir / "loss.jsonl"
    records = read_log(log_path, start)
    run_dir.mkdir(parents=True, exist_ok=True)
    log_path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    run = {"command": command, "started": _now(), "from_step": start, "device": cfg.device,
           "threads": torch.get_num_threads()}
    runs = runs + [run]

    def save(step: int, total_elapsed: float) -> None:
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        tmp = ckpt.with_name(ckpt.name + ".partial")
        torch.save({"step": step, "settings": settings, "model": model.state_dict(), "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(), "rng": rng_state(), "elapsed": total_elapsed, "runs": runs}, tmp)
        os.replace(tmp, ckpt)

    stop = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    interrupted = {"flag": False, "mid_step": False}

    def on_signal(signum, frame):
        if interrupted["flag"] and signum == signal.SIGINT:
            raise KeyboardInterrupt
        interrupted["flag"] = True

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)} if on_main_thread() else {}
    if start < cfg.steps:
        log(f"fine-tuning {name} on {', '.join(t.name for t in tasks)} ({pool.n} examples) for steps "
            f"{start}..{cfg.steps} -> {run_dir}")
    bar, job = _progress(progress, name, start, cfg.steps)
    t0, cpu0 = time.time(), time.process_time()
    step = start
    model.train()
    try:
        with open(log_path, "a", encoding="utf-8") as lf:
            while step < stop and not interrupted["flag"]:
                batch_feats = pool.batch(step, cfg.batch_size)
                b = collate_for_training(batch_feats, pad)
                b = {k: v.to(cfg.device) for k, v in b.items()}
                if objective is None:
                    loss, parts = answer_loss(model, b), {}
                else:
                    loss, parts = objective.loss(model, batch_feats, b)
                total = loss
                if replay_blocks is not None:
                    ids = torch.from_numpy(replay_blocks.batch(step, cfg.replay_batch)).to(cfg.device)
                    replay_loss = model(input_ids=ids, labels=ids).loss
                    total = loss + cfg.replay_weight * replay_loss
                opt.zero_grad(set_to_none=True)
                total.backward()
                torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
                lr = opt.param_groups[0]["lr"]
                opt.step()
                sched.step()
                step += 1
                rec = {"step": step, "loss": round(loss.item(), 6), "lr": lr,
                       "seconds": round(elapsed + time.time() - t0, 3), **parts}
                if replay_blocks is not None:
                    rec["replay_loss"] = round(replay_loss.item(), 6)
                lf.write(json.dumps(rec) + "\n")
                lf.flush()
                records.append(rec)
                if bar is not None:
                    bar.update(job, completed=step, info=f"loss {rec['loss']:.3f}")
                elif step % max(1, cfg.steps // 10) == 0 or step == cfg.steps:
                    log(f"{name}: step {step}/{cfg.steps} loss {rec['loss']:.3f} ({rec['seconds']:.0f} s)")
                if step % cfg.checkpoint_every == 0 and step < stop:
                    run.update(to_step=step, seconds=round(time.time() - t0, 1),
                               cpu_seconds=round(time.process_time() - cpu0, 1))
                    save(step, elapsed + time.time() - t0)
    except KeyboardInterrupt:
        interrupted.update(flag=True, mid_step=True)
    finally:
        if bar is not None:
            bar.stop()
        for s, h in old.items():
            signal.signal(s, h)
    if interrupted["mid_step"]:
        raise FinetuneError(f"stopped at once; the last checkpoint in {ckpt} is kept: run again to resume")
    seconds = time.time() - t0
    elapsed += seconds
    run.update(to_step=step, seconds=round(seconds, 1), cpu_seconds=round(time.process_time() - cpu0, 1),
               ended=_now())
    if step > start or not ckpt.is_file():
        save(step, elapsed)
    plot_losses(records, run_dir / "loss.png", f"llmmix fine-tuning: {name}")
    record = {"name": name, "tasks": [t.name for t in tasks], "base": str(base_dir), "settings": settings,
              "step": step, "wall_seconds": round(elapsed, 1), "runs": runs, "examples": pool.n,
              "final_loss": records[-1]["loss"] if records else None, "finished": False}
    result_final = None
    if step >= cfg.steps:
        model.eval()
        t1 = time.time()
        scored = _merged_copy(model) if cfg.lora_rank else model
        acc = {t.name: evaluate_task(scored, tok, t, "validation", limit=cfg.eval_limit,
                                     batch_size=cfg.eval_batch_size).accuracy for t in tasks}
        del scored
        record.update(validation_accuracy=acc, eval_seconds=round(time.time() - t1, 1), finished=True)
        if base_accuracy is not None:
            record["base_validation_accuracy"] = {t.name: base_accuracy.get(t.name) for t in tasks}
        result_final = _write_final(model, tok, run_dir, record)
        log(f"done: {name} -> {result_final} (loss {record['final_loss']}, validation "
            + ", ".join(f"{k} {100 * v:.1f}%" for k, v in acc.items()) + ")")
    write_json(run_dir / "finetune.json", record)
    if interrupted["flag"] and step < cfg.steps and stop_after is None:
        raise FinetuneError(f"{name}: interrupted at step {step}/{cfg.steps}; checkpoint saved in {ckpt}: "
                            "run the same command to resume")
    return FinetuneResult(run_dir, result_final, step, [(r["step"], r["loss"]) for r in records], elapsed, record)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _progress(enabled: bool, name: str, start: int, total: int):
    if not enabled or not sys.stderr.isatty():
        return None, None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn(name), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                   TimeRemainingColumn())
    job = bar.add_task(name, total=total, completed=start, info="")
    bar.start()
    return bar, job


def _merged_copy(peft_model):
    """A plain model with the adapters folded in, for scoring; the trained PeftModel is left as it is."""
    import copy

    return copy.deepcopy(peft_model).merge_and_unload()


def _write_final(model, tok, run_dir: Path, record: dict) -> Path:
    """Write ``final/``: a Hugging Face model folder, or for a LoRA run a PEFT adapter folder (its
    ``adapter_config.json`` records the base folder) with the tokenizer."""
    from transformers import GenerationConfig

    final = run_dir / "final"
    tmp = run_dir / "final.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    model.to("cpu").save_pretrained(str(tmp), safe_serialization=True)
    if not hasattr(model, "peft_config"):
        c = model.config
        GenerationConfig(bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id,
                         pad_token_id=c.pad_token_id).save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    write_json(tmp / "finetune.json", record)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final
