"""Calibration: run models on calibration inputs once and store reusable statistics.

Data-informed merges (RegMean, Fisher merging, RegMean++, Expert Merging) need statistics of each
model on its task's data. ``mergelab calibrate`` (:func:`calibrate`) collects them in one streaming
pass, with bounded memory, and stores them as safetensors keyed by the checkpoint tensor they belong
to, with metadata saying what produced them (:mod:`mergelab.calibrate.store`):

* input Gram matrices ``X^T X / n`` of every ``nn.Linear`` / GPT-2 ``Conv1D`` (:mod:`~.hooks`);
* diagonal Fisher information, per example, labels from the model's own predictions (:mod:`~.fisher`);
* activations (hidden states and logits of the examples), for methods that align hidden states.
"""

from mergelab.calibrate.collect import (CalibrationReport, calibrate, collect_activations, collect_fisher,
                                        collect_grams)
from mergelab.calibrate.data import (Batch, CalibrationSet, file_texts, suite_task_texts, task_texts,
                                     tensor_batches, tokenize_batches)
from mergelab.calibrate.model import CalibrationModel, load_model, wrap_module
from mergelab.calibrate.store import check_consistent, load_statistic, read_metadata, save_statistic

__all__ = ["calibrate", "collect_grams", "collect_fisher", "collect_activations", "CalibrationReport",
           "CalibrationSet", "Batch", "task_texts", "suite_task_texts", "file_texts", "tokenize_batches",
           "tensor_batches", "CalibrationModel", "load_model", "wrap_module", "load_statistic", "read_metadata",
           "save_statistic", "check_consistent"]
