"""Knowledge fusion of causal LMs with different tokenizers (FuseLLM / FuseChat).

:mod:`~mergelab.fuse.align` aligns two tokenizations of one text and carries next-token distributions
between vocabularies; :mod:`~mergelab.fuse.fusion` fuses the sources' distributions (MinCE, AvgCE) and
defines the fusion loss; :mod:`~mergelab.fuse.train` trains a target on them and merges fused targets
(FuseChat: VaRM or SCE); ``mergelab fuse`` is :mod:`~mergelab.fuse.cli`.
"""
