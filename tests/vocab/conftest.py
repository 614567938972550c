"""Tiny *trained* Llama experts that added task tokens to their tokenizer (issue 18, vocabularies).

A base is made with the llmmix suite's own pieces (its byte-level BPE tokenizer and tiny Llama, tied
embeddings as the suite ships them: no ``lm_head.weight``; an untied variant too) and trained a few
steps on a small corpus (seconds, unlike ``llmmix.pretrain``'s corpus pipeline). Each expert then adds its own task
token to a copy of the base tokenizer (``<calc>``, ``<rev>``), resizes the embedding and trains a few
steps on text that uses it, so every row, the new one included, has moved from the base. ``stripped``
holds the same experts without the added rows (the base's tokenizer, the base's row count): the merge
"done without the added tokens".
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

TOKENS = {"calc": "<calc>", "rev": "<rev>"}
TEXTS = {
    "calc": ["<calc> 12 + 7 = 19", "<calc> 3 * 4 = 12", "<calc> 20 - 5 = 15", "<calc> 8 + 8 = 16"],
    "rev": ["<rev> abc -> cba", "<rev> hello -> olleh", "<rev> data -> atad", "<rev> merge -> egrem"],
}


def _train_expert(base: Path, out: Path, token: str, texts, seed: int) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(str(base))
    tok.add_tokens([token])
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch = tok(texts, return_tensors="pt", padding=True)
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    for _ in range(8):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))


def _strip(expert: Path, base: Path, out: Path, rows: int) -> None:
    """``expert`` without its added rows: the base's tokenizer files and ``rows`` embedding rows."""
    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True)
    state = load_file(str(expert / "model.safetensors"))
    state = {k: (v[:rows].clone() if k.endswith(("embed_tokens.weight", "lm_head.weight")) else v)
             for k, v in state.items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((expert / "config.json").read_text())
    cfg["vocab_size"] = rows
    (out / "config.json").write_text(json.dumps(cfg))
    for f in base.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy2(f, out / f.name)


def _corpus():
    import random

    rng = random.Random(0)
    words = ["merge", "model", "token", "vector", "layer", "weight", "data", "hello", "world", "python", "list"]
    lines = []
    for _ in range(300):
        a, b = rng.randrange(50), rng.randrange(50)
        lines.append(f"{a} + {b} = {a + b}")
        lines.append(" ".join(rng.choice(words) for _ in range(6)))
    return lines


def _pretrain(out: Path, tied: bool) -> None:
    """The base: the llmmix byte-level BPE (300 tokens) on a small corpus, a tiny Llama trained 25 steps."""
    from mergelab.llmmix.model import build_model
    from mergelab.llmmix.tokenizer import BOS, EOS, PAD, train_tokenizer
    from transformers import AutoTokenizer

    lines = _corpus()
    train_tokenizer(lines, out, vocab_size=300)
    tok = AutoTokenizer.from_pretrained(str(out))
    ids = {"bos_id": tok.convert_tokens_to_ids(BOS), "eos_id": tok.convert_tokens_to_ids(EOS),
           "pad_id": tok.convert_tokens_to_ids(PAD)}
    model = build_model("tiny", len(tok), seed=0, **ids)
    if not tied:
        model.config.tie_word_embeddings = False
        model.lm_head.weight = torch.nn.Parameter(model.model.embed_tokens.weight.detach().clone())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for step in range(25):
        batch = tok(lines[step * 16:(step + 1) * 16], return_tensors="pt", padding=True)
        labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
        model(**batch, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    model.save_pretrained(str(out))


def make_family(root: Path, tied: bool) -> dict:
    """Base, experts and stripped experts under ``root`` (module docstring)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fam = {"base": root / "base"}
        _pretrain(fam["base"], tied)
        for i, (name, token) in enumerate(TOKENS.items()):
            fam[name] = root / name
            _train_expert(fam["base"], fam[name], token, TEXTS[name], seed=i)
    finally:
        torch.set_num_threads(threads)
    rows = json.loads((fam["base"] / "config.json").read_text())["vocab_size"]
    for name in TOKENS:
        fam[f"{name}_stripped"] = root / f"{name}_stripped"
        _strip(fam[name], fam["base"], fam[f"{name}_stripped"], rows)
    return fam


@pytest.fixture(scope="session")
def token_experts(tmp_path_factory):
    """Tied embeddings (as the llmmix models): ``{"base", "calc", "rev", "calc_stripped", "rev_stripped"}``."""
    pytest.importorskip("tokenizers")
    return make_family(tmp_path_factory.mktemp("vocab_tied"), tied=True)


@pytest.fixture(scope="session")
def untied_token_experts(tmp_path_factory):
    """The same with an untied ``lm_head``."""
    pytest.importorskip("tokenizers")
    return make_family(tmp_path_factory.mktemp("vocab_untied"), tied=False)


def token_in_base_family(fam: dict, root: Path) -> dict:
    """Inputs where the base has a token one model lacks: base ``calc`` (has ``<calc>``), models ``rev`` (lacks
    it) and ``calc2``, ``calc`` with its ``<calc>`` row moved (+0.25), so the rules ``base`` and ``mean`` of
    ``missing_tokens`` give different rows for ``rev``."""
    from safetensors.torch import load_file, save_file

    calc2 = root / "calc2"
    if not calc2.exists():
        shutil.copytree(fam["calc"], calc2)
        state = load_file(str(calc2 / "model.safetensors"))
        for k in state:
            if k.endswith(("embed_tokens.weight", "lm_head.weight")):
                state[k] = state[k].clone()
                state[k][-1] += 0.25
        save_file(state, str(calc2 / "model.safetensors"), metadata={"format": "pt"})
    return {"base": fam["calc"], "rev": fam["rev"], "calc2": calc2}
