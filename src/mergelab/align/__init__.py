"""Aligning models that do not share a base: permutation specs, weight and activation matching, PLeaS.

* :mod:`mergelab.align.spec`: which tensor axes share a hidden-unit permutation (MLP/conv chains, BERT,
  Llama-layout decoders, or a spec file), and applying permutations;
* :mod:`mergelab.align.matching`: Git Re-Basin weight matching and activation matching;
* :mod:`mergelab.align.features`: recording the activations activation matching compares;
* :mod:`mergelab.align.api`: ``mergelab align`` (load, check, match, permute, write);
* :mod:`mergelab.align.pleas`: PLeaS (permutations + least squares) at a chosen width, ``mergelab pleas``;
* :mod:`mergelab.align.bench`: the benchmark of merging models trained from different initialisations.
"""

from mergelab.align.matching import activation_matching, weight_distance, weight_matching
from mergelab.align.spec import (Axis, Perm, PermutationSpec, apply_permutations, bert_spec, chain_spec, infer_spec,
                                 llama_spec, random_permutations)

__all__ = ["Axis", "Perm", "PermutationSpec", "activation_matching", "apply_permutations", "bert_spec", "chain_spec",
           "infer_spec", "llama_spec", "random_permutations", "weight_distance", "weight_matching"]
