"""A tiny byte-level BPE tokenizer and a randomly initialised LlamaForCausalLM, saved as HF folders (test helper)."""

from __future__ import annotations

from pathlib import Path

SPECIALS = ["<pad>", "<s>", "</s>"]


def training_text() -> list:
    from mergelab.llmmix.tasks import build_task

    lines = []
    for name in ("arithmetic", "string_ops", "code_output", "word_problems"):
        t = build_task(name, seed=1, sizes={"train": 40, "validation": 0, "test": 0})
        lines += [e.prompt + "\nA: " + e.answer for e in t.split("train")]
    return lines


def make_tokenizer(vocab_size: int = 400):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(training_text(), trainer=trainer)
    bos = tk.token_to_id("<s>")
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def make_model(tok, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      initializer_range=0.5, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def save_tiny(folder: Path):
    tok = make_tokenizer()
    model = make_model(tok)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def trained_family(root: Path, tasks, sizes: dict, *, pretrain_steps: int = 30, corpus_bytes: int = 120_000,
                   vocab_size: int = 400, finetune_steps: int = 24):
    """A tiny Llama base pretrained with the project's own code (``llmmix.pretrain``: tied embeddings, no
    ``lm_head.weight`` stored, float32) and one expert per task name in ``tasks`` fine-tuned from it
    (``llmmix.finetune``), all under ``root``: ``(base_dir, [expert_dir, ...], [Task, ...])``, the tasks
    as built with ``seed=0`` and ``sizes``. Takes a few seconds per model.

    Training with ``threads=1`` sets torch's thread count for the whole process; the count is restored
    (float32 reductions, and so bit-equality with mergekit, depend on it)."""
    import torch

    from mergelab.llmmix.finetune import FinetuneConfig, finetune
    from mergelab.llmmix.pretrain import PretrainConfig, pretrain
    from mergelab.llmmix.tasks import build_task

    root = Path(root)
    quiet = dict(log=lambda m: None, progress=False)
    pcfg = PretrainConfig(size="tiny", steps=pretrain_steps, batch_size=8, seq_len=32, lr=1e-2, warmup=2,
                          corpus_bytes=corpus_bytes, corpus_sources=("stdlib-code", "stdlib-docs", "faker"),
                          vocab_size=vocab_size, checkpoint_every=100, eval_every=100, eval_batches=1, threads=1)
    threads = torch.get_num_threads()
    try:
        base = pretrain(pcfg, root, root / "base", **quiet).final_dir
        fcfg = FinetuneConfig(steps=finetune_steps, batch_size=8, lr=3e-3, checkpoint_every=100, eval_limit=1,
                              threads=1, replay_batch=0)
        built, experts = [], []
        for name in tasks:
            built.append(build_task(name, seed=0, sizes=sizes))
            experts.append(finetune(base, [built[-1]], root / name, fcfg, **quiet).final_dir)
    finally:
        torch.set_num_threads(threads)
    return Path(base), [Path(e) for e in experts], built
