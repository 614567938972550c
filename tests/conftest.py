import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _torch_threads_restored():
    """Training code (``--threads``) sets torch's thread count for its process; a test that runs it
    in-process must not change the float32 reduction order of the tests after it."""
    import torch

    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


@pytest.fixture
def tiny_family(tmp_path):
    """A float32 tiny Llama base + 3 experts on disk; returns (base, [experts])."""
    from mergelab.synthetic import make_llama_family

    paths = make_llama_family(tmp_path / "models", experts=3, hidden=32, layers=2, intermediate=64, vocab=128)
    return paths[0], paths[1:]


@pytest.fixture(scope="session")
def trained_llamas(tmp_path_factory):
    """Really trained tiny Llama models, made once per session: a base pretrained with the project's own
    code (tied embeddings, as the llmmix suite ships them) and experts fine-tuned on the llmmix tasks
    arithmetic and string_ops, float32 (``tests.llmmix.tiny_lm.trained_family``, smaller than the parity
    suite's). Returns ``(base, [experts])``; used by the compression and MC-SMoE tests."""
    pytest.importorskip("faker", reason="the llmmix corpus needs Faker (mergelab's 'llm' extra)")
    from tests.llmmix.tiny_lm import trained_family

    base, experts, _ = trained_family(tmp_path_factory.mktemp("trained_llamas"), ("arithmetic", "string_ops"),
                                      {"train": 24, "validation": 2, "test": 8}, pretrain_steps=20,
                                      corpus_bytes=80_000, vocab_size=300, finetune_steps=12)
    return base, experts


def run_cli(args, capsys=None):
    """Run the mergelab CLI in-process; returns (exit_code, stdout, stderr)."""
    from mergelab.cli import main

    code = 0
    try:
        main([str(a) for a in args])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    if capsys is not None:
        captured = capsys.readouterr()
        return code, captured.out, captured.err
    return code, "", ""
