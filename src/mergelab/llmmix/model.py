"""``LlamaForCausalLM`` shapes of the ``llmmix`` bases.

Sizes (parameter counts with the default 8192-token vocabulary, tied embeddings counted once):

====== ====== ====== ============ ===== ============
size   hidden layers intermediate heads parameters
====== ====== ====== ============ ===== ============
1m     64     4      256          2     787,008
3m     128    8      512          4     3,147,904
20m    320    12     1024         5     19,341,120
tiny   32     2      64           2     (tests; depends on the vocabulary)
====== ====== ====== ============ ===== ============

Embeddings are **tied** (``tie_word_embeddings=True``: ``lm_head.weight`` is the token embedding
matrix and ``model.safetensors`` stores it once, as ``model.embed_tokens.weight``), as in the small
Llama 3.2 and Qwen2.5 models people merge: at these sizes untied embeddings would double the
embedding share of the parameters (2.1M of 4.2M for ``3m``). Merge code must therefore accept a Llama
checkpoint without ``lm_head.weight``. Full multi-head attention (as many key/value heads as query
heads), RoPE (transformers' default theta, 10000), RMSNorm, SwiGLU MLP, no dropout, 512 positions.
"""

from __future__ import annotations

from dataclasses import dataclass

from mergelab.errors import MergeLabError


@dataclass(frozen=True)
class Size:
    hidden: int
    layers: int
    intermediate: int
    heads: int


SIZES = {
    "1m": Size(hidden=64, layers=4, intermediate=256, heads=2),
    "3m": Size(hidden=128, layers=8, intermediate=512, heads=4),
    "20m": Size(hidden=320, layers=12, intermediate=1024, heads=5),
    "tiny": Size(hidden=32, layers=2, intermediate=64, heads=2),
}
MAX_POSITIONS = 512


# A base *variant* is named by a suffix on its size: ``3m-instruct`` is the ``3m`` base further trained
# on an instruction mix (:mod:`mergelab.llmmix.instruct`); same shapes, its own cache folders.
INSTRUCT_SUFFIX = "-instruct"


def split_size(size: str) -> tuple:
    """``(shape size, instruction-tuned?)`` of a base name: ``"3m-instruct"`` -> ``("3m", True)``."""
    if size.endswith(INSTRUCT_SUFFIX):
        return size[: -len(INSTRUCT_SUFFIX)], True
    return size, False


def size_spec(size: str) -> Size:
    shape, _ = split_size(size)
    try:
        return SIZES[shape]
    except KeyError:
        raise MergeLabError(f"--size {size!r}: unknown base size; known: {', '.join(SIZES)} "
                            f"(each also as SIZE{INSTRUCT_SUFFIX}, its instruction-tuned variant)") from None


def llama_config(size: str, vocab_size: int, bos_id: int = 0, eos_id: int = 1, pad_id: int = 2):
    """The ``LlamaConfig`` of one base size for a tokenizer of ``vocab_size`` tokens."""
    from transformers import LlamaConfig

    s = size_spec(size)
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=s.hidden, num_hidden_layers=s.layers, intermediate_size=s.intermediate,
        num_attention_heads=s.heads, num_key_value_heads=s.heads, max_position_embeddings=MAX_POSITIONS,
        rms_norm_eps=1e-5, tie_word_embeddings=True, attention_dropout=0.0,
        bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id, initializer_range=0.02,
    )


def build_model(size: str, vocab_size: int, seed: int, **ids):
    """A freshly initialised ``LlamaForCausalLM`` (float32); initialisation is seeded by ``seed``."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(size, vocab_size, **ids))
    return model


def count_parameters(model) -> int:
    """Distinct parameters (a tied matrix once)."""
    seen, n = set(), 0
    for p in model.parameters():  # ``parameters()`` already yields a shared tensor once
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n
