"""A miniature of the bench: a tiny random BERT as base and a three-task suite cut from ``textmix``.

Nothing here is downloaded: the tokenizer vocabulary is letters and word pieces written on the fly,
the model is ``BertModel(config)`` with a fixed seed, and the tasks are the first rows of each split
of the shipped suite's files.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import pytest
import torch

from mergelab.evaluate.tasks import builtin_suites_dir

MINI_TASKS = {"sentiment": (48, 16, 24), "syllables": (48, 16, 24), "name_gender": (40, 12, 20)}


def make_tiny_bert(folder: Path, seed: int = 0) -> Path:
    from safetensors.torch import save_file
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    chars = string.ascii_lowercase + "'-"
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(chars) + ["##" + c for c in chars]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=True)
    tok.save_pretrained(str(folder))
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(seed)
    model = BertModel(config)
    config.save_pretrained(str(folder))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    return folder


def make_mini_suite(folder: Path) -> Path:
    """A YAML suite of small slices of three textmix tasks (fixed splits via the 'split' column)."""
    folder.mkdir(parents=True, exist_ok=True)
    src = builtin_suites_dir() / "textmix"
    lines = ["name: mini", "held_out: [name_gender]", "tasks:"]
    for name, caps in MINI_TASKS.items():
        rows = [json.loads(x) for x in (src / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()]
        keep = []
        for split, cap in zip(("train", "validation", "test"), caps):
            keep += [r for r in rows if r["split"] == split][:cap]
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in keep), encoding="utf-8")
        lines.append(f"  {name}: {name}.jsonl")
    (folder / "suite.yaml").write_text("\n".join(lines) + "\n")
    return folder / "suite.yaml"


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def mini_suite(tmp_path_factory) -> Path:
    return make_mini_suite(tmp_path_factory.mktemp("mini-suite"))


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tiny matrices: one thread is faster, and far faster when the CPU is shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
