"""Searching for the best merge: evolutionary search (CMA-ES over mergekit-evolve's genome), with
candidates merged in memory and scored on a validation split, in this process or on Ray actors.

* :mod:`mergelab.search.genome` — the genome format and genotype -> recipe decoding;
* :mod:`mergelab.search.fitness` — what a candidate is scored on;
* :mod:`mergelab.search.candidate` — the search config and one candidate's in-memory merge and score;
* :mod:`mergelab.search.pool` — local or Ray evaluation;
* :mod:`mergelab.search.evolve` — the CMA-ES loop, history, resume.
"""
