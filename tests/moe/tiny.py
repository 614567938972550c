"""Tiny random Llama / Qwen2 bases and experts with a real BPE tokenizer, as HF folders (test helper).

Experts are the base with their MLPs (and attention, which the MoE drops) shifted by seeded noise,
so each routed expert is distinguishable in the output.
"""

from __future__ import annotations

from pathlib import Path
from typing import List

import torch

_TOK = {}


def tokenizer():
    if "tok" not in _TOK:
        from tests.llmmix.tiny_lm import make_tokenizer

        _TOK["tok"] = make_tokenizer()
    return _TOK["tok"]


def make_family(root: Path, kind: str = "llama", experts: int = 2, tie: bool = False, rope=None, seed: int = 0,
                dtype=torch.float32, layers: int = 2, hidden: int = 32, intermediate: int = 48,
                attention_bias: bool = False) -> List[Path]:
    """``root/base`` and ``root/expert_<i>``; returns their paths, base first."""
    from transformers import (LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config,
                              Qwen3ForCausalLM)

    tok = tokenizer()
    common = dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate,
                  num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=256, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id, tie_word_embeddings=tie, initializer_range=0.3)
    if rope is not None:
        common["rope_parameters"] = rope
    if kind == "llama":
        cfg, cls = LlamaConfig(attention_bias=attention_bias, **common), LlamaForCausalLM
    elif kind == "qwen2":
        cfg, cls = Qwen2Config(**common), Qwen2ForCausalLM
    else:
        cfg, cls = Qwen3Config(head_dim=16, **common), Qwen3ForCausalLM  # head_dim != hidden / heads
    torch.manual_seed(seed)
    base = cls(cfg).eval()
    with torch.no_grad():
        for n, p in base.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.1)
            elif n.endswith("norm.weight"):
                p.add_(0.05 * torch.randn_like(p))
    paths = [root / "base"]
    base.to(dtype).save_pretrained(paths[0])
    tok.save_pretrained(paths[0])
    state = base.state_dict()
    for e in range(experts):
        g = torch.Generator().manual_seed(seed * 100 + e + 1)
        model = cls(cfg).eval()
        new = {}
        for n, t in state.items():
            if t.is_floating_point() and ("mlp" in n or "self_attn" in n):
                t = t + 0.3 * t.std() * torch.randn(t.shape, generator=g)
            new[n] = t
        model.load_state_dict(new)
        p = root / f"expert_{e}"
        model.to(dtype).save_pretrained(p)
        tok.save_pretrained(p)
        paths.append(p)
    return paths
