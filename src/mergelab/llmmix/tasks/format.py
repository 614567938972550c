"""How an example is shown to a causal LM, for generation and for fine-tuning (one home for both).

The model sees ``prompt + PROMPT_SUFFIX`` (``"\\nA:"``) tokenised with the tokenizer's special tokens
(a BOS if it adds one), and should continue with ``" " + answer`` and then EOS. Generation
(:mod:`mergelab.llmmix.generate`) feeds exactly :func:`encode_prompt`; fine-tuning
(:func:`encode_for_training`) appends the answer's tokens (tokenised on their own, no special
tokens) and EOS, with the prompt positions of ``labels`` set to -100 so only the answer is learnt.
Because the prompt is tokenised alone in both places, the tokens the model is trained to continue
are the tokens it is asked to continue at evaluation.
"""

from __future__ import annotations

from typing import Optional, Sequence

from mergelab.llmmix.tasks.base import GenExample, TaskError

PROMPT_SUFFIX = "\nA:"
IGNORE_INDEX = -100


def render_prompt(prompt: str) -> str:
    return prompt + PROMPT_SUFFIX


def render_answer(answer: str) -> str:
    return " " + answer


def encode_prompt(tokenizer, prompt: str) -> list:
    """Token ids of the rendered prompt, with the tokenizer's special tokens (BOS if it adds one)."""
    return list(tokenizer(render_prompt(prompt), add_special_tokens=True)["input_ids"])


def encode_for_training(tokenizer, example: GenExample, max_length: Optional[int] = None) -> dict:
    """``input_ids``, ``labels`` (prompt masked with -100) and ``attention_mask`` for one example.

    The answer is followed by the tokenizer's EOS, so the model learns to stop. An example longer
    than ``max_length`` tokens is an error (truncating would teach a wrong answer).
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise TaskError("fine-tuning format: the tokenizer has no EOS token; set tokenizer.eos_token")
    p = encode_prompt(tokenizer, example.prompt)
    a = list(tokenizer(render_answer(example.answer), add_special_tokens=False)["input_ids"]) + [eos]
    ids = p + a
    if max_length is not None and len(ids) > max_length:
        raise TaskError(f"fine-tuning format: example {example.prompt[:60]!r} is {len(ids)} tokens, "
                        f"over max_length={max_length}")
    return {"input_ids": ids, "labels": [IGNORE_INDEX] * len(p) + a, "attention_mask": [1] * len(ids)}


def collate_for_training(features: Sequence[dict], pad_token_id: int) -> dict:
    """Right-pad a batch of :func:`encode_for_training` outputs into tensors (labels padded with -100)."""
    import torch

    n = max(len(f["input_ids"]) for f in features)
    out = {"input_ids": [], "labels": [], "attention_mask": []}
    for f in features:
        pad = n - len(f["input_ids"])
        out["input_ids"].append(list(f["input_ids"]) + [pad_token_id] * pad)
        out["labels"].append(list(f["labels"]) + [IGNORE_INDEX] * pad)
        out["attention_mask"].append(list(f["attention_mask"]) + [0] * pad)
    return {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}
