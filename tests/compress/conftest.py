"""Really trained tiny Llama models for the compression tests: a base pretrained with the project's own
code (tied embeddings, as the llmmix suite ships them) and two experts fine-tuned on different llmmix
tasks, float32 (``tests.llmmix.tiny_lm.trained_family``, smaller than the parity suite's)."""

from __future__ import annotations

import pytest

TASKS = ("arithmetic", "string_ops")
SIZES = {"train": 24, "validation": 2, "test": 8}


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    pytest.importorskip("faker", reason="the llmmix corpus needs Faker (mergelab's 'llm' extra)")
    from tests.llmmix.tiny_lm import trained_family

    base, experts, _ = trained_family(tmp_path_factory.mktemp("compress_trained"), TASKS, SIZES, pretrain_steps=20,
                                      corpus_bytes=80_000, vocab_size=300, finetune_steps=12)
    return base, experts
