"""Pretrain an ``llmmix`` base from scratch: corpus -> tokenizer -> token stream -> ``LlamaForCausalLM``.

Layout under the cache root (``--cache``, else ``$MERGELAB_CACHE/llmmix``, else
``~/.cache/mergelab/llmmix``)::

    corpus-<hash>/      train.jsonl, heldout.jsonl, corpus.json (sources, licences, sizes)
    tokenizer-<hash>/   the Hugging Face tokenizer folder (AutoTokenizer loads it)
    tokens-<hash>/      train.u16, heldout.u16: each document as <|bos|> tokens <|eos|>, concatenated
    base-<size>/        the run: checkpoint/state.pt, loss.jsonl, loss.png, pretrain.json, final/

``final/`` is a Hugging Face folder (``model.safetensors``, ``config.json``, ``generation_config.json``,
tokenizer files) that ``AutoModelForCausalLM`` / ``AutoTokenizer`` load.

Training: AdamW (betas 0.9/0.95, weight decay 0.1 on matrices only), linear warm-up then cosine decay to
10% of the peak learning rate, gradient clipping at 1.0, float32, next-token cross-entropy on packed
blocks of ``seq_len + 1`` tokens. The data order is a function of the seed and the step alone (each
epoch is a seeded permutation of the blocks; step ``s`` reads blocks ``s*B .. s*B+B-1`` of that
sequence), so a resumed run reads exactly what an uninterrupted one would. ``checkpoint/state.pt``
(model, optimizer, scheduler and RNG states, the step) is replaced atomically every
``checkpoint_every`` steps, at the end, and when Ctrl-C or SIGTERM arrives (after the step under way
ends; a second Ctrl-C stops at once and keeps the last checkpoint); ``loss.jsonl`` lines past the
checkpoint are dropped on resume, so the loss curve of a resumed run is that of an uninterrupted one.
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
from typing import Callable, Optional

import numpy as np

from mergelab.errors import MergeLabError
from mergelab.llmmix.corpus import DEFAULT_SOURCES, CorpusConfig, build_corpus, read_documents
from mergelab.llmmix.model import build_model, count_parameters, size_spec, split_size
from mergelab.llmmix.tokenizer import EOS, PRE_TOKENIZER, load_tokenizer, train_tokenizer
from mergelab.llmmix.training import (RunConfig, differing, lr_schedule, on_main_thread, read_log,
                                      restores_torch_threads, rng_state, set_rng_state, write_json)


class PretrainError(MergeLabError):
    """A pretraining run cannot start or resume as asked."""


class PretrainInterrupted(PretrainError):
    """The run was stopped (Ctrl-C, SIGTERM) after saving a checkpoint; the same command resumes it."""


def default_root() -> Path:
    env = os.environ.get("MERGELAB_CACHE")
    return (Path(env) if env else Path.home() / ".cache" / "mergelab") / "llmmix"


SHIPPED_DIR = Path(__file__).resolve().parent.parent / "data" / "llmmix"


def shipped_base(size: str) -> Optional[Path]:
    """The base of ``size`` shipped inside the package (``mergelab/data/llmmix/base-SIZE``: today ``3m``,
    float32, bit-identical to the cached run's ``final/``, with its ``pretrain.json`` and the first held-out
    documents of its corpus in ``heldout.jsonl``), or None when none ships."""
    folder = SHIPPED_DIR / f"base-{size}"
    return folder if (folder / "model.safetensors").is_file() else None


def find_base(size: str, root: Optional[Path] = None) -> tuple:
    """``(folder, source)`` of the base of ``size``: the cache's (``ROOT/base-SIZE/final``, source
    ``"cache"``) when it holds one, else the one shipped in the package (source ``"shipped"``); an error
    naming the command that makes it when there is neither."""
    size_spec(size)
    folder = (Path(root) if root else default_root()) / f"base-{size}" / "final"
    if (folder / "model.safetensors").is_file():
        return folder, "cache"
    shape, instruct = split_size(size)
    if instruct:
        raise PretrainError(f"{folder}: no instruction-tuned llmmix base of size {shape} (make it with "
                            f"'mergelab bench instruct --size {shape}', or resume the run there)")
    shipped = shipped_base(size)
    if shipped is not None:
        return shipped, "shipped"
    raise PretrainError(f"{folder}: no pretrained llmmix base of size {size} (make it with "
                        f"'mergelab bench pretrain --size {size}', or resume the run there)")


def base_folder(size: str, root: Optional[Path] = None) -> Path:
    """The base of ``size``: the cache's when it has one, else the shipped one (:func:`find_base`)."""
    return find_base(size, root)[0]


def base_source(base_dir: Path) -> str:
    """``"shipped"`` when ``base_dir`` is a base shipped in the package, else ``"cache"`` (or a user's folder)."""
    try:
        Path(base_dir).resolve().relative_to(SHIPPED_DIR)
        return "shipped"
    except ValueError:
        return "cache" if Path(base_dir).name == "final" and Path(base_dir).parent.name.startswith("base-") \
            else "given"


@dataclass(frozen=True)
class PretrainConfig(RunConfig):
    size: str = "3m"
    steps: int = 2400
    batch_size: int = 16
    seq_len: int = 256
    lr: float = 2e-3
    warmup: Optional[int] = None  # default: min(200, steps // 10)
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    corpus_bytes: int = 20_000_000
    corpus_sources: tuple = DEFAULT_SOURCES
    vocab_size: int = 8192
    # not part of the run's identity: may change between a run and its resumption
    checkpoint_every: int = 200
    eval_every: int = 200
    eval_batches: int = 8
    device: str = "cpu"
    threads: Optional[int] = None

    RUNTIME = ("checkpoint_every", "eval_every", "eval_batches", "device", "threads")
    WARMUP_CAP = 200

    def corpus(self) -> CorpusConfig:
        return CorpusConfig(target_bytes=self.corpus_bytes, seed=self.seed, sources=tuple(self.corpus_sources))


def remake_command(cfg: PretrainConfig) -> str:
    """The ``mergelab bench pretrain`` command line that makes this run's settings (defaults left out)."""
    default = PretrainConfig()
    flags = {"size": "--size", "steps": "--steps", "batch_size": "--batch-size", "seq_len": "--seq-len",
             "lr": "--lr", "warmup": "--warmup", "seed": "--seed", "vocab_size": "--vocab-size"}
    parts = ["mergelab bench pretrain", f"--size {cfg.size}", f"--steps {cfg.steps}"]
    for field, flag in flags.items():
        if field not in ("size", "steps") and getattr(cfg, field) != getattr(default, field):
            parts.append(f"{flag} {getattr(cfg, field)}")
    if cfg.corpus_bytes != default.corpus_bytes:
        parts.append(f"--corpus-mb {cfg.corpus_bytes / 1e6:g}")
    if tuple(cfg.corpus_sources) != tuple(default.corpus_sources):
        parts.append("--sources " + ",".join(cfg.corpus_sources))
    return " ".join(parts)


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]



def replay_tokens(base_dir: Path, root: Optional[Path] = None, log: Callable[[str], None] = print) -> Path:
    """The pretraining token stream (``tokens-<hash>/train.u16``) of the base in ``base_dir``, for
    fine-tuning with replay. Read from the cache when the base was pretrained there; for a shipped base
    on an empty cache, the corpus is rebuilt from the settings in its ``pretrain.json`` (seeded, so the
    same text) and tokenized with the base's own tokenizer (copied, never retrained)."""
    base_dir = Path(base_dir)
    rec_path = next((p for p in (base_dir / "pretrain.json", base_dir.parent / "pretrain.json") if p.is_file()), None)
    if rec_path is None:
        raise PretrainError(f"{base_dir}: no pretrain.json beside the base, so its pretraining text (for replay) "
                            "is unknown; fine-tune without replay (--replay-batch 0)")
    settings = dict(json.loads(rec_path.read_text(encoding="utf-8"))["settings"])
    settings["corpus_sources"] = tuple(settings["corpus_sources"])
    cfg = PretrainConfig(**settings)
    paths = paths_for(cfg, Path(root) if root else default_root())
    tokens = paths.tokens / "train.u16"
    if tokens.is_file():
        return tokens
    if not (paths.tokenizer / "tokenizer.json").is_file():
        tmp = paths.tokenizer.with_name(paths.tokenizer.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for f in base_dir.iterdir():
            if f.name.startswith(("tokenizer", "special_tokens", "llmmix_tokenizer")):
                shutil.copy2(f, tmp / f.name)
        tmp.rename(paths.tokenizer)
    log(f"replay text: rebuilding the pretraining corpus and tokens of {base_dir} in {paths.tokens.parent}")
    prepare_data(cfg, paths, log)
    return tokens


@dataclass
class Paths:
    corpus: Path
    tokenizer: Path
    tokens: Path
    run: Path

    @property
    def checkpoint(self) -> Path:
        return self.run / "checkpoint" / "state.pt"

    @property
    def final(self) -> Path:
        return self.run / "final"


def paths_for(cfg: PretrainConfig, root: Path, run_dir: Optional[Path] = None) -> Paths:
    corpus_fp = cfg.corpus().fingerprint()
    tok_fp = _hash({"corpus": corpus_fp, "vocab_size": cfg.vocab_size, "pre_tokenizer": PRE_TOKENIZER})
    return Paths(root / f"corpus-{corpus_fp}", root / f"tokenizer-{tok_fp}", root / f"tokens-{tok_fp}",
                 Path(run_dir) if run_dir else root / f"base-{cfg.size}")


def prepare_data(cfg: PretrainConfig, paths: Paths, log: Callable[[str], None]) -> None:
    """Corpus, tokenizer and token streams, each made once and reused."""
    t = time.time()
    if (paths.tokens / "tokens.json").is_file() and (paths.tokenizer / "tokenizer.json").is_file():
        return  # the corpus is needed only to make these
    if not (paths.corpus / "corpus.json").is_file():
        log(f"building the corpus ({cfg.corpus_bytes / 1e6:g} MB) ...")
    build_corpus(paths.corpus, cfg.corpus(), log)
    if not (paths.tokenizer / "tokenizer.json").is_file():
        log(f"training the tokenizer (vocabulary {cfg.vocab_size}) ...")
        train_tokenizer(read_documents(paths.corpus), paths.tokenizer, cfg.vocab_size)
    if not (paths.tokens / "tokens.json").is_file():
        log("tokenizing the corpus ...")
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(paths.tokenizer / "tokenizer.json"))  # the fast backend: no length warnings
        if tok.get_vocab_size() > 65535:
            raise PretrainError(f"vocabulary of {tok.get_vocab_size()} tokens does not fit the uint16 token files")
        eos = tok.token_to_id(EOS)
        tmp = paths.tokens.with_name(paths.tokens.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        counts = {}
        for split in ("train", "heldout"):
            n = 0
            with open(tmp / f"{split}.u16", "wb") as f:
                batch = []
                for text in read_documents(paths.corpus, split):
                    batch.append(text)
                    if len(batch) == 256:
                        n += _write_ids(f, tok, batch, eos)
                        batch = []
                if batch:
                    n += _write_ids(f, tok, batch, eos)
            counts[split] = n
        (tmp / "tokens.json").write_text(json.dumps({"tokens": counts, "vocab": tok.get_vocab_size()}, indent=2) + "\n")
        shutil.rmtree(paths.tokens, ignore_errors=True)
        tmp.rename(paths.tokens)
        log(f"tokens: {counts['train']:,} train, {counts['heldout']:,} held-out "
            f"({_corpus_bytes(paths.corpus) / max(counts['train'] + counts['heldout'], 1):.2f} bytes of text "
            f"per token, <|bos|> and <|eos|> counted) in {time.time() - t:.0f} s")


def _corpus_bytes(corpus_dir: Path) -> int:
    return json.loads((corpus_dir / "corpus.json").read_text(encoding="utf-8"))["total_bytes"]


def _write_ids(f, tok, texts, eos) -> int:
    encs = tok.encode_batch(texts, add_special_tokens=True)  # <|bos|> by the post-processor
    flat = np.concatenate([np.asarray(e.ids + [eos], dtype=np.uint16) for e in encs])
    f.write(flat.tobytes())
    return int(flat.size)


class Blocks:
    """Packed blocks of ``seq_len + 1`` tokens; the order is a seeded permutation per epoch."""

    def __init__(self, path: Path, seq_len: int, seed: int):
        self.tokens = np.memmap(path, dtype=np.uint16, mode="r")
        self.seq_len = seq_len
        self.seed = seed
        self.n = (len(self.tokens) - 1) // seq_len
        if self.n < 1:
            raise PretrainError(f"{path}: {len(self.tokens)} tokens, fewer than one block of {seq_len + 1}")
        self._perm = {}

    def block(self, k: int) -> np.ndarray:
        return np.asarray(self.tokens[k * self.seq_len: k * self.seq_len + self.seq_len + 1], dtype=np.int64)

    def order(self, epoch: int) -> np.ndarray:
        if epoch not in self._perm:
            self._perm = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.n)}
        return self._perm[epoch]

    def batch(self, step: int, batch_size: int) -> np.ndarray:
        rows = []
        for g in range(step * batch_size, (step + 1) * batch_size):
            rows.append(self.block(int(self.order(g // self.n)[g % self.n])))
        return np.stack(rows)





def _save_checkpoint(path: Path, model, opt, sched, step: int, cfg: PretrainConfig, elapsed: float,
                     runs: list) -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    torch.save({"step": step, "settings": cfg.settings(), "model": model.state_dict(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "rng": rng_state(), "elapsed": elapsed, "runs": runs,
                "tokens_seen": step * cfg.batch_size * cfg.seq_len}, tmp)
    os.replace(tmp, path)



def evaluate(model, blocks: Blocks, batch_size: int, batches: int, device: str) -> float:
    """Mean next-token loss on the first ``batches * batch_size`` held-out blocks (in file order)."""
    import torch

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for b in range(min(batches, max(1, blocks.n // batch_size))):
            rows = [blocks.block(k) for k in range(b * batch_size, min(blocks.n, (b + 1) * batch_size))]
            x = torch.from_numpy(np.stack(rows)).to(device)
            total += float(model(input_ids=x, labels=x).loss) * len(rows)
            count += len(rows)
    model.train()
    return total / max(count, 1)


@dataclass
class PretrainResult:
    run_dir: Path
    final_dir: Optional[Path]
    step: int
    losses: list  # [(step, train loss)] of the whole run (resumed parts included)
    seconds: float
    tokens_per_second: float


@restores_torch_threads
def pretrain(cfg: PretrainConfig, root: Optional[Path] = None, run_dir: Optional[Path] = None,
             command: str = "", log: Callable[[str], None] = print, progress: bool = True,
             stop_after: Optional[int] = None, fresh: bool = False) -> PretrainResult:
    """Run (or resume) the pretraining of one base; ``stop_after`` stops at that step as a kill would."""
    import torch

    size_spec(cfg.size)
    if split_size(cfg.size)[1]:
        raise PretrainError(f"--size {cfg.size}: an instruction-tuned base is not pretrained; make it from the "
                            f"pretrained one with 'mergelab bench instruct --size {split_size(cfg.size)[0]}'")
    if cfg.steps < 1 or cfg.batch_size < 1 or cfg.seq_len < 8:
        raise PretrainError("--steps and --batch-size must be >= 1 and --seq-len >= 8")
    if cfg.seq_len + 1 > 512:
        raise PretrainError(f"--seq-len {cfg.seq_len}: at most 511 (the bases have 512 positions)")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise PretrainError(f"--device {cfg.device}: CUDA is not available in this torch build")
    root = Path(root) if root else default_root()
    paths = paths_for(cfg, root, run_dir)
    if fresh and paths.run.exists():
        shutil.rmtree(paths.run)
    data_json = paths.run / "checkpoint" / "data.json"
    if paths.checkpoint.is_file() and data_json.is_file():
        # resume on the data the run started with, even where the corpus packages' versions changed since
        data = json.loads(data_json.read_text(encoding="utf-8"))
        recorded = Paths(Path(data["corpus"]), Path(data["tokenizer"]), Path(data["tokens"]), paths.run)
        if (recorded.tokens / "tokens.json").is_file() and (recorded.tokenizer / "tokenizer.json").is_file():
            paths = recorded
    prepare_data(cfg, paths, log)
    paths.checkpoint.parent.mkdir(parents=True, exist_ok=True)
    write_json(data_json, {"corpus": str(paths.corpus), "tokenizer": str(paths.tokenizer), "tokens": str(paths.tokens)})
    if cfg.threads:
        torch.set_num_threads(cfg.threads)

    tok = load_tokenizer(paths.tokenizer)
    train = Blocks(paths.tokens / "train.u16", cfg.seq_len, cfg.seed)
    held = Blocks(paths.tokens / "heldout.u16", cfg.seq_len, cfg.seed)
    ids = dict(bos_id=tok.bos_token_id, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
    model = build_model(cfg.size, len(tok), cfg.seed, **ids).to(cfg.device)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_schedule(cfg))

    start, elapsed, runs = 0, 0.0, []
    log_path = paths.run / "loss.jsonl"
    if paths.checkpoint.is_file():
        state = torch.load(paths.checkpoint, map_location="cpu", weights_only=False)
        saved = {k: v for k, v in state["settings"].items() if k not in cfg.RUNTIME}
        if saved != cfg.settings():
            diff = differing(saved, cfg.settings())
            raise PretrainError(f"{paths.run}: holds a run made with other settings ({', '.join(diff)} differ: "
                                f"{ {k: saved.get(k) for k in diff} }); resume with those settings, "
                                "or pass --fresh to start over")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        start, elapsed, runs = state["step"], state["elapsed"], state["runs"]
        log(f"resuming {paths.run} at step {start}/{cfg.steps}")
    else:
        torch.manual_seed(cfg.seed)
    records = read_log(log_path, start)
    if start >= cfg.steps and (paths.final / "model.safetensors").is_file():
        log(f"{paths.final}: already pretrained ({start} steps)")
        return PretrainResult(paths.run, paths.final, start, [(r["step"], r["loss"]) for r in records], elapsed, 0.0)
    paths.run.mkdir(parents=True, exist_ok=True)
    log_path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")

    n_params = count_parameters(model)
    run = {"command": command or remake_command(cfg), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "from_step": start,
           "device": cfg.device, "threads": torch.get_num_threads()}
    runs = runs + [run]
    if start < cfg.steps:
        log(f"pretraining {cfg.size} ({n_params:,} parameters) for steps {start}..{cfg.steps} "
            f"({cfg.batch_size}x{cfg.seq_len} tokens a step) -> {paths.run}")
    stop = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    interrupted = {"flag": False, "mid_step": False}

    def on_signal(signum, frame):  # finish the step, checkpoint, stop; a second Ctrl-C stops at once
        if interrupted["flag"] and signum == signal.SIGINT:
            raise KeyboardInterrupt
        interrupted["flag"] = True

    old_handlers = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)} \
        if on_main_thread() else {}
    t0 = time.time()
    step = start
    bar, task = _progress(progress, start, cfg.steps)
    model.train()
    try:
        with open(log_path, "a", encoding="utf-8") as lf:
            while step < stop and not interrupted["flag"]:
                x = torch.from_numpy(train.batch(step, cfg.batch_size)).to(cfg.device)
                loss = model(input_ids=x, labels=x).loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                lr = opt.param_groups[0]["lr"]
                opt.step()
                sched.step()
                step += 1
                rec = {"step": step, "loss": round(loss.item(), 6), "lr": lr,
                       "tokens": step * cfg.batch_size * cfg.seq_len,
                       "seconds": round(elapsed + time.time() - t0, 3)}
                if step % cfg.eval_every == 0 or step == cfg.steps:
                    rec["val_loss"] = round(evaluate(model, held, cfg.batch_size, cfg.eval_batches, cfg.device), 6)
                lf.write(json.dumps(rec) + "\n")
                lf.flush()
                records.append(rec)
                _advance(bar, task, step, cfg, rec, t0, start, log)
                if step % cfg.checkpoint_every == 0 and step < stop:
                    run.update(to_step=step, seconds=round(time.time() - t0, 1))
                    _save_checkpoint(paths.checkpoint, model, opt, sched, step, cfg, elapsed + time.time() - t0, runs)
                    plot_losses(records, paths.run / "loss.png", f"llmmix {cfg.size} pretraining")
    except KeyboardInterrupt:  # possibly inside a step: the weights may be half updated, keep the last checkpoint
        interrupted.update(flag=True, mid_step=True)
    finally:
        if bar is not None:
            bar.stop()
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)
    if interrupted["mid_step"]:
        raise PretrainInterrupted(f"stopped at once; the last checkpoint in {paths.checkpoint} is kept: run the "
                                  "same command (without --fresh) to resume from it")
    seconds = time.time() - t0
    elapsed += seconds
    run.update(to_step=step, seconds=round(seconds, 1), ended=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    if step > start or not paths.checkpoint.is_file():
        _save_checkpoint(paths.checkpoint, model, opt, sched, step, cfg, elapsed, runs)
    tps = (step - start) * cfg.batch_size * cfg.seq_len / seconds if step > start and seconds > 0 else 0.0
    losses = [(r["step"], r["loss"]) for r in records]
    plot_losses(records, paths.run / "loss.png", f"llmmix {cfg.size} pretraining")
    summary = {"size": cfg.size, "parameters": n_params, "remake": remake_command(cfg), "settings": cfg.settings(), "step": step,
               "tokens_seen": step * cfg.batch_size * cfg.seq_len, "wall_seconds": round(elapsed, 1),
               "tokens_per_second_last_run": round(tps, 1), "runs": runs,
               "final_loss": losses[-1][1] if losses else None,
               "final_val_loss": next((r["val_loss"] for r in reversed(records) if "val_loss" in r), None),
               "corpus": str(paths.corpus), "tokenizer": str(paths.tokenizer)}
    final = None
    if step >= cfg.steps:
        final = _write_final(model, paths, summary)
        log(f"done: {paths.final} (loss {summary['final_loss']}, held-out {summary['final_val_loss']})")
    write_json(paths.run / "pretrain.json", summary)
    if interrupted["flag"] and step < cfg.steps and stop_after is None:
        raise PretrainInterrupted(f"interrupted at step {step}/{cfg.steps}; checkpoint saved in {paths.checkpoint}: "
                                  "run the same command (without --fresh) to resume")
    return PretrainResult(paths.run, final, step, losses, elapsed, tps)



def _progress(enabled: bool, start: int, total: int):
    if not enabled or not sys.stderr.isatty():
        return None, None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("pretrain"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                   TimeRemainingColumn(), transient=False)
    task = bar.add_task("pretrain", total=total, completed=start, info="")
    bar.start()
    return bar, task


def _advance(bar, task, step, cfg, rec, t0, start, log) -> None:
    done = step - start
    tps = done * cfg.batch_size * cfg.seq_len / max(time.time() - t0, 1e-9)
    info = f"loss {rec['loss']:.3f}" + (f" val {rec['val_loss']:.3f}" if "val_loss" in rec else "") + f" {tps:,.0f} tok/s"
    if bar is not None:
        bar.update(task, completed=step, info=info)
    elif step % max(1, cfg.steps // 100) == 0 or step == cfg.steps or "val_loss" in rec:
        log(f"step {step}/{cfg.steps} {info} lr {rec['lr']:.2e} ({rec['seconds']:.0f} s)")



def _write_final(model, paths: Paths, summary: dict) -> Path:
    from transformers import GenerationConfig

    tmp = paths.final.with_name("final.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.to("cpu").save_pretrained(str(tmp), safe_serialization=True)
    cfg = model.config
    GenerationConfig(bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
                     pad_token_id=cfg.pad_token_id).save_pretrained(str(tmp))
    for f in paths.tokenizer.iterdir():
        if f.is_file():
            shutil.copy2(f, tmp / f.name)
    write_json(tmp / "pretrain.json", summary)
    shutil.rmtree(paths.final, ignore_errors=True)
    os.replace(tmp, paths.final)
    return paths.final


def plot_losses(records: list, out: Path, title: str) -> None:
    """Training loss per step (raw and smoothed) and held-out loss, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if records:
        steps = [r["step"] for r in records]
        loss = [r["loss"] for r in records]
        ax.plot(steps, loss, color="tab:blue", alpha=0.3, lw=0.8, label="train (per step)")
        ema, smooth = 0.0, []
        for t, v in enumerate(loss, 1):  # bias-corrected, so the start does not lag
            ema = 0.95 * ema + 0.05 * v
            smooth.append(ema / (1 - 0.95 ** t))
        ax.plot(steps, smooth, color="tab:blue", lw=1.5, label="train (EMA 0.95)")
        val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
        if val:
            ax.plot(*zip(*val), "o-", color="tab:orange", label="held-out")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = out.with_name(out.stem + ".partial.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, out)
