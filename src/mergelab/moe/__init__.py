"""Mixtures of experts built from dense fine-tunes (mergekit-moe compatible): ``mergelab moe``."""

from mergelab.moe.build import MoEResult, build_moe

__all__ = ["MoEResult", "build_moe"]
