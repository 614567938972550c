"""Real LoRA adapters: PEFT-trained on the tiny llmmix Llama (tests/llmmix/tiny_lm.py) in the set-up.

``trained`` builds, once per session, the tiny Llama base (32 hidden, 2 layers, its own BPE
tokenizer) and three PEFT LoRA adapters trained by gradient descent (AdamW, 20 steps of 8 examples)
on different llmmix tasks:

* ``arith``: r=4, alpha=8, q/v projections, task ``arithmetic``;
* ``strops``: r=8, alpha=16, rsLoRA, q/v/down projections, ``rank_pattern`` {down_proj: 4} and
  ``alpha_pattern`` {v_proj: 4}, task ``string_ops``;
* ``code``: r=4, alpha=4, q/v projections, task ``code_output`` (same shape as ``arith``: PEFT's
  element-wise combination types need equal ranks).

A few CPU-seconds in all. PEFT is a test-only dependency: tests using it skip without it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict

import pytest
import torch

ADAPTERS = {
    "arith": dict(task="arithmetic", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], seed=1),
    "strops": dict(task="string_ops", r=8, lora_alpha=16, use_rslora=True,
                   target_modules=["q_proj", "v_proj", "down_proj"], rank_pattern={"down_proj": 4},
                   alpha_pattern={"v_proj": 4}, seed=2),
    "code": dict(task="code_output", r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"], seed=3),
}
STEPS, BATCH, LR = 20, 8, 1e-2


@dataclass
class Trained:
    base: Path
    adapters: Dict[str, Path]


def _train(base: Path, out: Path, task: str, seed: int, **lora) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergelab.llmmix.tasks import build_task

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(str(base))
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    pm = get_peft_model(model, LoraConfig(lora_dropout=0.0, **lora))
    t = build_task(task, seed=seed, sizes={"train": STEPS * BATCH // 4, "validation": 0, "test": 0})
    texts = [e.prompt + "\nA: " + e.answer for e in t.split("train")]
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=LR)
    pm.train()
    g = torch.Generator().manual_seed(seed)
    first = last = None
    for step in range(STEPS):
        idx = torch.randint(len(texts), (BATCH,), generator=g).tolist()
        enc = tok([texts[i] for i in idx], return_tensors="pt", padding=True, truncation=True, max_length=48)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        loss = pm(**enc, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
        last = loss.item()
    assert last < first, f"LoRA training on {task} did not lower the loss ({first} -> {last})"
    pm.save_pretrained(str(out))
    return out


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> Trained:
    pytest.importorskip("peft")
    pytest.importorskip("tokenizers")
    pytest.importorskip("faker", reason="the llmmix tasks the adapters train on need Faker (mergelab's 'llm' extra)")
    from tests.llmmix.tiny_lm import save_tiny

    root = tmp_path_factory.mktemp("lora_trained")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # tiny matrices: one thread is fastest, and the machine is shared
        base = save_tiny(root / "base")
        ads = {name: _train(base, root / name, **dict(spec)) for name, spec in ADAPTERS.items()}
    finally:
        torch.set_num_threads(threads)
    return Trained(base, ads)
