"""Really trained tiny Llama models for the compression tests: a base pretrained with the project's own
code (tied embeddings, as the llmmix suite ships them) and two experts fine-tuned on different llmmix
tasks, float32 (the recipe of tests/parity/test_parity_llmmix.py, smaller)."""

from __future__ import annotations

import pytest
import torch

TASKS = ("arithmetic", "string_ops")
SIZES = {"train": 24, "validation": 2, "test": 8}


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    pytest.importorskip("faker", reason="the llmmix corpus needs Faker (mergelab's 'llm' extra)")
    from mergelab.llmmix.finetune import FinetuneConfig, finetune
    from mergelab.llmmix.pretrain import PretrainConfig, pretrain
    from mergelab.llmmix.tasks import build_task

    root = tmp_path_factory.mktemp("compress_trained")
    quiet = dict(log=lambda m: None, progress=False)
    pcfg = PretrainConfig(size="tiny", steps=20, batch_size=8, seq_len=32, lr=1e-2, warmup=2, corpus_bytes=80_000,
                          corpus_sources=("stdlib-code", "stdlib-docs", "faker"), vocab_size=300,
                          checkpoint_every=100, eval_every=100, eval_batches=1, threads=1)
    threads = torch.get_num_threads()
    try:
        base = pretrain(pcfg, root, root / "base", **quiet).final_dir
        fcfg = FinetuneConfig(steps=12, batch_size=8, lr=3e-3, checkpoint_every=100, eval_limit=1, threads=1,
                              replay_batch=0)
        experts = [finetune(base, [build_task(name, seed=0, sizes=SIZES)], root / name, fcfg, **quiet).final_dir
                   for name in TASKS]
    finally:
        torch.set_num_threads(threads)
    return base, experts
