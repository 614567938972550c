"""Tiny randomly initialised models and data for calibration / tuning tests (seconds on one CPU thread)."""

import json
from pathlib import Path

import torch

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(40)]


def tokenizer(folder: Path):
    from transformers import BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    return BertTokenizer(str(folder / "vocab.txt"))


def bert_config(num_labels=3, layers=2, hidden=16, intermediate=32):
    from transformers import BertConfig

    return BertConfig(vocab_size=len(VOCAB), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                      intermediate_size=intermediate, max_position_embeddings=64, num_labels=num_labels,
                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def bert_classifier(folder: Path, seed: int, num_labels=3, layers=2, save=True):
    from transformers import BertForSequenceClassification

    torch.manual_seed(seed)
    model = BertForSequenceClassification(bert_config(num_labels, layers)).eval()
    if save:
        model.save_pretrained(folder)
        tokenizer(folder).save_pretrained(folder)
    return model


def llama_lm(folder: Path, seed: int, save=True):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(VOCAB), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                      tie_word_embeddings=False, pad_token_id=0)
    model = LlamaForCausalLM(cfg).eval()
    if save:
        model.save_pretrained(folder)
        tokenizer(folder).save_pretrained(folder)
    return model


def gpt2_lm(folder: Path, seed: int, save=True):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=len(VOCAB), n_embd=16, n_layer=2, n_head=2, n_positions=64, pad_token_id=0,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(cfg).eval()
    if save:
        model.save_pretrained(folder)
        tokenizer(folder).save_pretrained(folder)
    return model


def texts(n: int, offset: int = 0):
    """Sentences of 1..6 tokens from the tiny vocabulary (so batches have padding)."""
    return [" ".join(f"w{((i + offset) * 7 + j * 3) % 40}" for j in range(1 + (i + offset) % 6)) for i in range(n)]


def write_jsonl(path: Path, rows):
    with path.open("w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path
