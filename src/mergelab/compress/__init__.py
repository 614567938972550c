"""Task-vector compression: low-rank extraction to PEFT LoRA adapters, GraftLLM SkillPacks, BitDelta.

* :mod:`mergelab.compress.lowrank` - truncated SVD, rank by count or by energy, reconstruction error.
* :mod:`mergelab.compress.quant` - per-channel symmetric round-to-nearest quantisation, bit packing.
* :mod:`mergelab.compress.bitdelta` - 1-bit sign deltas with one scale per tensor (BitDelta).
* :mod:`mergelab.compress.extract` - ``mergelab extract``: a PEFT LoRA adapter approximating a task vector.
* :mod:`mergelab.compress.skillpack` - ``mergelab compress``/``graft``: the pack format and its lazy reader.
"""
