"""Cheap guards against a collapsed causal-LM merge: perplexity and exact-match accuracy.

* Perplexity on a local text file: the file is tokenised once (no special tokens added), cut into
  consecutive windows of ``max_length`` tokens, and ``exp(total NLL / number of predicted tokens)``
  is reported (the first token of each window is context only). A non-finite loss is reported as
  such, never hidden.
* Greedy generation (:func:`greedy_generate`, the one greedy decoding primitive; ``mergelab.llmmix``
  uses it too): prompts are left-padded into batches (longest first, so a batch holds prompts of
  similar length) and decoded by ``model.generate`` with plain greedy settings for at most
  ``max_new_tokens`` tokens. A sequence stops at the tokenizer's EOS (``stop_at_eos``) and, with
  ``stop_at_newline``, at the first token whose text contains a newline; the completion is the decoded
  text up to that newline, special tokens dropped, stripped. Left padding with the attention mask makes
  every batch give the completion decoding the prompt alone would give (up to float rounding).
* Exact match on a local JSONL file of ``{"prompt": ..., "answer": ...}``: the greedy completion of
  at most ``max_new_tokens`` tokens after the prompt (tokenised as given, one prompt at a time) must
  equal the stripped answer.
* With a baseline model, ``ppl_ratio = PPL(model) / PPL(baseline)`` on the same text and tokenisation;
  the model is flagged as collapsed when the ratio exceeds ``collapse_ratio`` (2 by default) or its
  loss is not finite (the "Butterfly Effect of Model Editing" use of perplexity as a surrogate).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from mergelab.errors import CheckpointError, MergeLabError
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
    # the whole text is tokenized once and cut into windows below, so the tokenizer's warning about a
    # sequence longer than the model's limit does not apply
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt", verbose=False)["input_ids"][0]
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


def newline_token_ids(tokenizer) -> list:
    """Ids of every vocabulary token whose decoded text contains a newline."""
    out = []
    for i in range(len(tokenizer)):
        if "\n" in tokenizer.decode([i], skip_special_tokens=False):
            out.append(i)
    return out


def _stop_ids(tokenizer, stop_at_eos: bool, stop_at_newline: bool) -> list:
    ids = []
    if stop_at_eos and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    if stop_at_newline:
        cache = getattr(tokenizer, "_mergelab_newline_ids", None)
        if cache is None:
            cache = newline_token_ids(tokenizer)
            try:
                tokenizer._mergelab_newline_ids = cache
            except AttributeError:
                pass
        ids.extend(i for i in cache if i not in ids)
    return ids


def greedy_generate(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 32, batch_size: int = 16,
                    stop_at_eos: bool = True, stop_at_newline: bool = True,
                    encode: Optional[Callable] = None) -> list:
    """Greedy completions of ``prompts``, in the order given (see the module doc). ``encode(tokenizer,
    prompt)`` gives a prompt's token ids (default: the tokenizer's own encoding of the prompt as given,
    special tokens included). Settings in the model's own ``generation_config`` (penalties, sampling,
    minimum length) are ignored."""
    from transformers import GenerationConfig

    if max_new_tokens < 1 or batch_size < 1:
        raise MergeLabError(f"generation: max_new_tokens and batch_size must be >= 1, got {max_new_tokens}, {batch_size}")
    stops = _stop_ids(tokenizer, stop_at_eos, stop_at_newline)
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    # eos_token_id: a list, empty when no stop is asked (None would mean "the model's EOS")
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=pad,
                           eos_token_id=stops, bos_token_id=tokenizer.bos_token_id)
    encoded = [list(tokenizer(p)["input_ids"]) if encode is None else encode(tokenizer, p) for p in prompts]
    if any(not e for e in encoded):
        raise MergeLabError("generation: a prompt encodes to no tokens (empty prompt and no BOS token)")
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    out: list = [None] * len(prompts)
    stop_set = set(stops)
    # generate() fills settings left at their defaults from the model's own generation_config (a
    # repetition penalty, min_new_tokens, ...); swapped out here so decoding is plain greedy
    saved = model.generation_config
    model.generation_config = cfg
    try:
        _decode_batches(model, tokenizer, encoded, order, batch_size, pad, cfg, stop_set, stop_at_newline, out)
    finally:
        model.generation_config = saved
    return out


def _decode_batches(model, tokenizer, encoded, order, batch_size, pad, cfg, stop_set, stop_at_newline, out):
    device = next(model.parameters()).device
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        width = max(len(encoded[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            n = len(encoded[i])
            ids[row, width - n:] = torch.tensor(encoded[i], dtype=torch.long)
            mask[row, width - n:] = 1
        with torch.no_grad():
            gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=cfg)
        for row, i in enumerate(idx):
            new = gen[row, width:].tolist()
            for k, t in enumerate(new):
                if t in stop_set:
                    new = new[:k + 1]
                    break
            text = tokenizer.decode(new, skip_special_tokens=True)
            if stop_at_newline:
                text = text.split("\n", 1)[0]
            out[i] = text.strip()


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


def exact_match(model, tokenizer, pairs, max_new_tokens: int = 32) -> dict:
    """``{"exact_match", "n", "outputs"}`` of greedy continuations (see module doc)."""
    pairs = list(pairs)
    texts = greedy_generate(model, tokenizer, [prompt for prompt, _ in pairs], max_new_tokens=max_new_tokens,
                            batch_size=1)
    hits, outputs = 0, []
    for (prompt, answer), text in zip(pairs, texts):
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
