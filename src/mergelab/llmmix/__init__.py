"""``llmmix``: an offline causal-LM merge-quality suite.

Small ``LlamaForCausalLM`` bases pretrained here from scratch on offline text (``corpus``,
``tokenizer``, ``model``, ``pretrain``), generative tasks built from offline data (``tasks``), and
experts fine-tuned from the bases. See docs/llmmix.md.
"""
