"""mergelab: merge fine-tuned neural networks, faithfully and in bounded memory."""

__version__ = "0.1.0"
