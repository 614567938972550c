"""Fine-tuning an encoder with one linear head per task (single-task experts and multi-task training).

One loop serves both: an expert is the one-task case. Each step takes a batch from one task (tasks
visited in a seeded shuffled order, in proportion to their training-set sizes), computes the
cross-entropy of that task's head on the pooled ``[CLS]`` output, and updates the encoder and the head
with AdamW (linear warm-up for the first 10% of steps, then linear decay to zero). The word-embedding
matrix is frozen: it holds half of MiniLM's parameters and half of the CPU step time, and the
experts then differ only in the transformer layers, the position/type embeddings, norms and pooler.
A LoRA expert (:func:`train_lora`) trains only PEFT LoRA factors on the layers' linears (and its head).
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional, Sequence

import torch

from mergelab.evaluate.model import MAX_LENGTH, build_encoder


@dataclass
class TrainConfig:
    """Optimisation settings shared by experts and multi-task training."""

    epochs: float = 3.0
    batch_size: int = 32
    lr: float = 2e-4
    head_lr: float = 2e-3
    weight_decay: float = 0.01
    warmup: float = 0.1
    max_length: int = MAX_LENGTH
    freeze_word_embeddings: bool = True
    seed: int = 0
    threads: Optional[int] = None

    def to_dict(self) -> dict:
        return asdict(self)


def steps_for(n_train: int, cfg: TrainConfig) -> int:
    """Optimiser steps for ``n_train`` examples: ``ceil(epochs * n_train / batch_size)``."""
    return max(1, math.ceil(cfg.epochs * n_train / cfg.batch_size))


def _schedule(step: int, total: int, warmup: float) -> float:
    w = max(1, int(total * warmup))
    if step < w:
        return (step + 1) / w
    return max(0.0, (total - step) / max(1, total - w))


def _task_plan(sizes: Sequence[int], batch_size: int, epochs: float, rng: random.Random) -> list:
    """For each step, ``(task index, example indices)``; every task gets ``epochs`` passes over its data."""
    plan = []
    for t, n in enumerate(sizes):
        order: list = []
        need = math.ceil(epochs * n / batch_size) * batch_size
        while len(order) < need:
            perm = list(range(n))
            rng.shuffle(perm)
            order.extend(perm)
        plan.extend((t, order[i:i + batch_size]) for i in range(0, need, batch_size))
    rng.shuffle(plan)
    return plan


# LoRA experts (``bench prepare --lora-rank R``): PEFT LoRA on every attention and MLP linear of each
# layer (query, key, value, attention output, intermediate, output); the pooler, embeddings and norms
# stay the base's. PEFT matches a string ``target_modules`` with ``re.fullmatch`` on module paths.
LORA_TARGETS = (r"encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense|"
                r"intermediate\.dense|output\.dense)")


def lora_config(rank: int, alpha: Optional[float] = None):
    """The PEFT ``LoraConfig`` of a textmix LoRA expert: rank ``rank``, ``lora_alpha`` ``alpha``
    (default ``2 * rank``, scale 2), no dropout, no bias, on :data:`LORA_TARGETS`."""
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=2.0 * rank if alpha is None else alpha, target_modules=LORA_TARGETS,
                      lora_dropout=0.0, bias="none")


def _heads(config, task_data: Sequence[tuple], heads: Optional[Sequence[dict]]):
    linear = torch.nn.ModuleList()
    for i, (_, _, c) in enumerate(task_data):
        lin = torch.nn.Linear(config.hidden_size, c)
        if heads is not None:
            lin.weight.data.copy_(heads[i]["weight"])
            lin.bias.data.copy_(heads[i]["bias"])
        else:
            torch.nn.init.normal_(lin.weight, std=config.initializer_range)
            torch.nn.init.zeros_(lin.bias)
        linear.append(lin)
    return linear


def _fit(encoder, linear, dropout, tokenizer, task_data: Sequence[tuple], cfg: "TrainConfig", rng: random.Random,
         progress: Optional[Callable[[int], None]]) -> dict:
    """The training loop (see the module doc) over ``encoder``'s trainable parameters and the heads."""
    decay = [p for n, p in encoder.named_parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for n, p in encoder.named_parameters() if p.requires_grad and p.ndim < 2]
    opt = torch.optim.AdamW([
        {"params": decay, "lr": cfg.lr, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "lr": cfg.lr, "weight_decay": 0.0},
        {"params": list(linear.parameters()), "lr": cfg.head_lr, "weight_decay": 0.0},
    ])
    base_lrs = [g["lr"] for g in opt.param_groups]
    plan = _task_plan([len(t[0]) for t in task_data], cfg.batch_size, cfg.epochs, rng)
    start, cpu_start = time.perf_counter(), time.process_time()
    for step, (t, idx) in enumerate(plan):
        texts, labels, _ = task_data[t]
        enc = tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=cfg.max_length,
                        return_tensors="pt")
        y = torch.tensor([labels[i] for i in idx])
        pooled = encoder(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).pooler_output
        loss = torch.nn.functional.cross_entropy(linear[t](dropout(pooled)), y)
        loss.backward()
        factor = _schedule(step, len(plan), cfg.warmup)
        for g, lr in zip(opt.param_groups, base_lrs):
            g["lr"] = lr * factor
        opt.step()
        opt.zero_grad(set_to_none=True)
        if progress is not None:
            progress(1)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return {"steps": len(plan), "seconds": round(seconds, 2), "cpu_seconds": round(cpu, 2)}


def _out_heads(linear) -> list:
    return [{"weight": lin.weight.detach().clone(), "bias": lin.bias.detach().clone()} for lin in linear]


def train(config, encoder_state: dict, tokenizer, task_data: Sequence[tuple], cfg: TrainConfig,
          progress: Optional[Callable[[int], None]] = None, heads: Optional[Sequence[dict]] = None) -> tuple:
    """Fine-tune from ``encoder_state`` on ``task_data`` = ``[(texts, labels, num_labels), ...]``.

    Returns ``(encoder_state, heads, info)``: the trained encoder tensors (float32, BertModel names),
    one ``{"weight", "bias"}`` head per task, and ``{"steps", "seconds", "cpu_seconds"}``. ``heads``
    may give initial heads; otherwise they start like Hugging Face's (normal(0, 0.02) weights, zero bias).
    ``progress(n)`` is called after each step with the number of steps just done (1).
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    encoder = build_encoder(config, encoder_state).train()
    dropout = torch.nn.Dropout(config.hidden_dropout_prob)
    linear = _heads(config, task_data, heads)
    if cfg.freeze_word_embeddings:
        encoder.embeddings.word_embeddings.weight.requires_grad_(False)
    info = _fit(encoder, linear, dropout, tokenizer, task_data, cfg, rng, progress)
    encoder.eval()
    state = {k: v.detach().clone().float() for k, v in encoder.state_dict().items() if v.is_floating_point()}
    return state, _out_heads(linear), info


def train_lora(config, encoder_state: dict, tokenizer, task_data: Sequence[tuple], cfg: TrainConfig, rank: int,
               alpha: Optional[float] = None, progress: Optional[Callable[[int], None]] = None) -> tuple:
    """Train a PEFT LoRA adapter (:func:`lora_config`) on the frozen encoder and the heads fully, with
    :func:`train`'s loop and schedule (``cfg.lr`` for the factors, ``cfg.head_lr`` for the heads).

    Returns ``(peft_model, heads, info)``: the ``PeftModel`` (``save_pretrained`` writes the adapter
    folder; ``merge_and_unload`` on a copy gives the dense encoder), the heads and the step counts.
    """
    from peft import get_peft_model

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)  # PEFT draws the A matrices from torch's generator
    rng = random.Random(cfg.seed)
    encoder = get_peft_model(build_encoder(config, encoder_state), lora_config(rank, alpha)).train()
    dropout = torch.nn.Dropout(config.hidden_dropout_prob)
    linear = _heads(config, task_data, None)
    info = _fit(encoder, linear, dropout, tokenizer, task_data, cfg, rng, progress)
    info["trainable_adapter_parameters"] = sum(p.numel() for p in encoder.parameters() if p.requires_grad)
    encoder.eval()
    return encoder, _out_heads(linear), info
