"""Cheap guards against a collapsed causal-LM merge: perplexity and exact-match accuracy.

* Perplexity on a local text file: the file is tokenised once (no special tokens added), cut into
  consecutive windows of ``max_length`` tokens, and ``exp(total NLL / number of predicted tokens)``
  is reported (the first token of each window is context only). A non-finite loss is reported as
  such, never hidden.
* Exact match on a local JSONL file of ``{"prompt": ..., "answer": ...}``: greedy decoding of at most
  ``max_new_tokens`` tokens after the prompt; the continuation, cut at the first newline and stripped,
  must equal the stripped answer.
* With a baseline model, ``ppl_ratio = PPL(model) / PPL(baseline)`` on the same text and tokenisation;
  the model is flagged as collapsed when the ratio exceeds ``collapse_ratio`` (2 by default) or its
  loss is not finite (the "Butterfly Effect of Model Editing" use of perplexity as a surrogate).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import torch

from mergelab.errors import CheckpointError
from mergelab.evaluate.model import offline
from mergelab.evaluate.tasks import SuiteError
from mergelab.io.records import iter_jsonl


def load_causal_lm(path):
    """``(model, tokenizer)`` from a local Hugging Face folder, float32, eval mode, offline."""
    offline()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: not a local Hugging Face model folder (no config.json)")
    try:
        tok = AutoTokenizer.from_pretrained(str(path))
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot load a causal LM and its tokenizer ({e})") from None
    return model.eval(), tok


@torch.no_grad()
def perplexity(model, tokenizer, text: str, max_length: int = 512) -> dict:
    """``{"perplexity", "nll", "tokens"}`` of ``text`` (see module doc); ``tokens`` = predicted tokens.

    Windows are at most ``max_length`` tokens and never longer than the model's position limit.
    """
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if limit:
        max_length = min(max_length, int(limit))
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    if ids.numel() < 2:
        raise SuiteError("perplexity needs a text of at least 2 tokens")
    total, count = 0.0, 0
    for start in range(0, ids.numel(), max_length):
        window = ids[start:start + max_length]
        if window.numel() < 2:
            break
        logits = model(input_ids=window[None]).logits[0, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits, window[1:], reduction="sum").item()
        total += nll
        count += window.numel() - 1
    mean = total / count
    # exp overflows past ~709; an infinite or NaN mean loss passes through as inf / nan
    return {"perplexity": float("inf") if mean > 700 else math.exp(mean), "nll": mean, "tokens": count}


def read_qa(path) -> list:
    """``[(prompt, answer)]`` from a JSONL file; errors name the file, line and missing key."""
    path = Path(path)
    if not path.is_file():
        raise SuiteError(f"exact-match file {path} does not exist")
    rows = []
    for i, row in iter_jsonl(path, SuiteError):
        if "prompt" not in row or "answer" not in row:
            raise SuiteError(f"{path}:{i}: expected an object with 'prompt' and 'answer'")
        rows.append((str(row["prompt"]), str(row["answer"])))
    if not rows:
        raise SuiteError(f"{path}: no prompts")
    return rows


@torch.no_grad()
def exact_match(model, tokenizer, pairs, max_new_tokens: int = 32) -> dict:
    """``{"exact_match", "n", "outputs"}`` of greedy continuations (see module doc)."""
    hits, outputs = 0, []
    for prompt, answer in pairs:
        enc = tokenizer(prompt, return_tensors="pt")
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                             else tokenizer.eos_token_id)
        text = tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        text = text.split("\n")[0].strip()
        ok = text == answer.strip()
        hits += ok
        outputs.append({"prompt": prompt, "answer": answer, "output": text, "correct": ok})
    return {"exact_match": hits / len(pairs), "n": len(pairs), "outputs": outputs}


def lm_guard(model_path, text_file: Optional[Path] = None, qa_file: Optional[Path] = None,
             baseline: Optional[Path] = None, max_length: int = 512, max_new_tokens: int = 32,
             collapse_ratio: float = 2.0) -> dict:
    """Perplexity and/or exact match of ``model_path``, compared with ``baseline`` when given."""
    if text_file is None and qa_file is None:
        raise SuiteError("give a text file (--text) for perplexity and/or a JSONL file (--qa) for exact match")
    model, tok = load_causal_lm(model_path)
    result: dict = {"model": str(model_path)}
    text = None
    if text_file is not None:
        text_file = Path(text_file)
        if not text_file.is_file():
            raise SuiteError(f"text file {text_file} does not exist")
        text = text_file.read_text(encoding="utf-8")
        result["perplexity"] = perplexity(model, tok, text, max_length)
    if qa_file is not None:
        result["exact_match"] = exact_match(model, tok, read_qa(qa_file), max_new_tokens)
    if baseline is not None:
        bmodel, btok = load_causal_lm(baseline)
        base: dict = {"model": str(baseline)}
        if text is not None:
            base["perplexity"] = perplexity(bmodel, btok, text, max_length)
            ratio = result["perplexity"]["perplexity"] / base["perplexity"]["perplexity"]
            result["ppl_ratio"] = ratio
            result["collapsed"] = not math.isfinite(result["perplexity"]["nll"]) or not ratio <= collapse_ratio
        if qa_file is not None:
            base["exact_match"] = exact_match(bmodel, btok, read_qa(qa_file), max_new_tokens)
        result["baseline"] = base
    elif text is not None:
        result["collapsed"] = not math.isfinite(result["perplexity"]["nll"])
    return result
