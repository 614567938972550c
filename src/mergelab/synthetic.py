"""Small synthetic Llama-shaped checkpoints: a base and "fine-tuned" experts, as HF folders.

Experts are the base plus heavy-tailed task vectors of which a share is exactly zero, so trimming,
sign election and dropping all have something to act on. The folders load with
``transformers.AutoModelForCausalLM`` (``LlamaForCausalLM``). Used by tests, the demo and benchmarks.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List

import torch
from safetensors.torch import save_file


def llama_config(hidden: int, layers: int, intermediate: int, vocab: int, heads: int, kv_heads: int,
                 dtype: str) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "vocab_size": vocab, "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False, "torch_dtype": dtype,
        "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2,
    }


def llama_shapes(hidden: int, layers: int, intermediate: int, vocab: int, heads: int, kv_heads: int) -> dict:
    head_dim = hidden // heads
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (hidden, hidden),
            p + "self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
            p + "self_attn.v_proj.weight": (kv_heads * head_dim, hidden),
            p + "self_attn.o_proj.weight": (hidden, hidden),
            p + "mlp.gate_proj.weight": (intermediate, hidden),
            p + "mlp.up_proj.weight": (intermediate, hidden),
            p + "mlp.down_proj.weight": (hidden, intermediate),
            p + "input_layernorm.weight": (hidden,),
            p + "post_attention_layernorm.weight": (hidden,),
        })
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def write_checkpoint(folder: Path, tensors: dict, config: dict, shard_bytes: int = 1 << 62) -> None:
    """Write ``tensors`` as HF safetensors (sharded above ``shard_bytes``) with ``config.json``."""
    folder.mkdir(parents=True, exist_ok=True)
    shards: List[dict] = [{}]
    size = 0
    for name, t in tensors.items():
        nb = t.numel() * t.element_size()
        if shards[-1] and size + nb > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t.contiguous()
        size += nb
    if len(shards) == 1:
        save_file(shards[0], str(folder / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(folder / fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in shard})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def make_llama_family(root: Path, experts: int = 3, hidden: int = 64, layers: int = 2, intermediate: int = 128,
                      vocab: int = 256, heads: int = 4, kv_heads: int = 2, dtype: str = "float32",
                      seed: int = 0, shard_bytes: int = 1 << 62, zero_fraction: float = 0.3,
                      delta_scale: float = 0.01) -> List[Path]:
    """Write ``root/base`` and ``root/expert_<i>``; returns their paths, base first."""
    g = torch.Generator().manual_seed(seed)
    shapes = llama_shapes(hidden, layers, intermediate, vocab, heads, kv_heads)
    cfg = llama_config(hidden, layers, intermediate, vocab, heads, kv_heads, dtype)
    tdtype = getattr(torch, dtype)
    base = {}
    for name, shape in shapes.items():
        if len(shape) == 1:
            base[name] = torch.ones(shape) + 0.01 * torch.randn(shape, generator=g)
        else:
            base[name] = torch.randn(shape, generator=g) * (1.0 / shape[-1] ** 0.5)
    paths = [root / "base"]
    write_checkpoint(paths[0], {k: v.to(tdtype) for k, v in base.items()}, cfg, shard_bytes)
    for e in range(experts):
        tensors = {}
        for name, b in base.items():
            # Student-t-like heavy tails: normal divided by the root of a chi-square-ish draw.
            noise = torch.randn(b.shape, generator=g) / (torch.rand(b.shape, generator=g) + 0.05).sqrt()
            keep = torch.rand(b.shape, generator=g) >= zero_fraction
            tensors[name] = (b + delta_scale * b.abs().mean() * noise * keep).to(tdtype)
        path = root / f"expert_{e}"
        write_checkpoint(path, tensors, cfg, shard_bytes)
        paths.append(path)
    return paths
