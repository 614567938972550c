"""The merge-quality benchmark: prepare experts and references for a suite, then run merge methods.

``mergelab bench prepare`` (:mod:`~mergelab.bench.prepare`) and ``mergelab bench run``
(:mod:`~mergelab.bench.run`); the prepared models live in a :class:`~mergelab.bench.cache.BenchCache`.
"""
