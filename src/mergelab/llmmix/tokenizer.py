"""A byte-level BPE tokenizer for ``llmmix``, trained with the ``tokenizers`` library on the corpus.

Byte-level (GPT-2 style) so that any text, code and every script of the Faker locales included,
round-trips exactly; no ``unk`` token is needed. Digits are split one by one before the byte-level
step (``PRE_TOKENIZER``), as in Llama and Qwen tokenizers, so every number is spelled digit by digit. Special tokens, with fixed ids 0..N-1 so that every
base and every tokenizer trained with these settings agree on them: ``<|bos|>`` (0), ``<|eos|>`` (1),
``<|pad|>`` (2) and ``<|reserved_0|>`` .. ``<|reserved_7|>`` (3..10), kept for later tasks (chat or
tool markers). Encoding prepends ``<|bos|>`` (as Llama's tokenizers do); ``<|eos|>`` is appended by the
pretraining data pipeline at each document's end. The folder written is a Hugging Face tokenizer
(``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json``) that
``transformers.AutoTokenizer.from_pretrained`` loads as a fast tokenizer.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Iterable

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
RESERVED = tuple(f"<|reserved_{i}|>" for i in range(8))
SPECIAL_TOKENS = (BOS, EOS, PAD) + RESERVED
PRE_TOKENIZER = "digits+bytelevel"  # part of the tokenizer's cache key: change it when the pre-tokenizer changes


def train_tokenizer(texts: Iterable[str], out: Path, vocab_size: int = 8192, min_frequency: int = 2,
                    model_max_length: int = 512) -> Path:
    """Train a byte-level BPE of ``vocab_size`` tokens (special tokens included) on ``texts``; save to ``out``.

    Deterministic for the same texts and settings (``tokenizers`` breaks merge ties by pair order).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size {vocab_size}: must be at least {256 + len(SPECIAL_TOKENS)} "
                         "(256 bytes + special tokens)")
    tok = Tokenizer(models.BPE())
    # Digits one by one (as Llama and Qwen do): with merged digit runs ("907" -> "9", "07") a small model
    # cannot learn arithmetic, and the same number would be cut differently in different contexts.
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                  special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]),
    ])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   additional_special_tokens=list(RESERVED), model_max_length=model_max_length,
                                   clean_up_tokenization_spaces=False)
    out = Path(out)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    fast.save_pretrained(str(tmp))
    # the class name every transformers version (4.x and 5.x) resolves to its fast tokenizer
    config_path = tmp / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "additional_special_tokens": list(RESERVED)}
    (tmp / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")
    (tmp / "llmmix_tokenizer.json").write_text(json.dumps(
        {"vocab_size": vocab_size, "min_frequency": min_frequency, "special_tokens": list(SPECIAL_TOKENS)},
        indent=2) + "\n", encoding="utf-8")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def load_tokenizer(folder: Path):
    """The tokenizer in ``folder`` through ``AutoTokenizer`` (what users of the bases get)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))
