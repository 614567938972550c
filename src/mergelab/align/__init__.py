"""Aligning models that do not share a base: permutation specs, weight and activation matching, PLeaS.

* :mod:`mergelab.align.spec`: which tensor axes share a hidden-unit permutation (MLP/conv chains, BERT,
  Llama-layout decoders, or a spec file), and applying permutations;
* :mod:`mergelab.align.matching`: Git Re-Basin weight matching and activation matching;
* :mod:`mergelab.align.features`: recording the activations activation matching compares;
* :mod:`mergelab.align.api`: ``mergelab align`` (load, check, match, permute, write);
* :mod:`mergelab.align.pleas`: PLeaS (permutations + least squares) at a chosen width, ``mergelab pleas``;
  :mod:`mergelab.align.pleas_bert` (BERT, the FFN width), :mod:`mergelab.align.pleas_llama` (Llama-layout
  decoders, the SwiGLU MLP width) and :mod:`mergelab.align.resnet` (a small ResNet, its spec and PLeaS);
* :mod:`mergelab.align.zipit`: ZipIt-style merging of MLPs, with partial zipping;
* :mod:`mergelab.align.bench`, :mod:`mergelab.align.bench_minilm`, :mod:`mergelab.align.bench_llama`: the
  benchmark of merging models trained from different initialisations (digits, mnist1d; MiniLM from two
  starting points; two small Llamas pretrained from different seeds).
"""

from mergelab.align.matching import activation_matching, weight_distance, weight_matching
from mergelab.align.spec import (Axis, Perm, PermutationSpec, apply_permutations, bert_spec, chain_spec, infer_spec,
                                 llama_spec, random_permutations)

__all__ = ["Axis", "Perm", "PermutationSpec", "activation_matching", "apply_permutations", "bert_spec", "chain_spec",
           "infer_spec", "llama_spec", "random_permutations", "weight_distance", "weight_matching"]
