"""Evaluation harness: classification suites (tasks, metrics, reports, charts) and the causal-LM guard.

* :mod:`~mergelab.evaluate.tasks`: tasks, suites, user task files, fixed splits;
* :mod:`~mergelab.evaluate.model`: the base encoder, per-task heads, features, linear probes;
* :mod:`~mergelab.evaluate.harness`: scoring an encoder on a suite (heads, held-out probes);
* :mod:`~mergelab.evaluate.metrics`: accuracy, normalised accuracy, negative flips;
* :mod:`~mergelab.evaluate.report` / :mod:`~mergelab.evaluate.plots`: report.json, report.md, PNGs;
* :mod:`~mergelab.evaluate.lm`: perplexity and exact match for causal LMs;
* :mod:`~mergelab.evaluate.suite_build`: how the built-in ``textmix`` suite was made.
"""

from mergelab.evaluate.tasks import Example, Suite, SuiteError, Task, load_suite, load_task_file

__all__ = ["Example", "Suite", "SuiteError", "Task", "load_suite", "load_task_file"]
