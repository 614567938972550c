import pytest
import torch

# The CI machines are shared and small: one thread is much faster than two contended ones for tiny models.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def prepared(tmp_path_factory):
    """A prepared miniature bench: tiny random BERT base, three small textmix tasks, experts trained 1 epoch."""
    from mergelab.bench.cache import BenchCache
    from mergelab.bench.prepare import prepare
    from mergelab.bench.training import TrainConfig
    from mergelab.evaluate.tasks import load_suite
    from tests.bench.conftest import make_mini_suite, make_tiny_bert

    root = tmp_path_factory.mktemp("tuned-bench")
    base = make_tiny_bert(root / "base")
    suite = load_suite(str(make_mini_suite(root / "suite")))
    cache = BenchCache(suite, root / "cache")
    prepare(suite, cache, TrainConfig(epochs=1, batch_size=16, lr=1e-3), str(base), multitask=False,
            show_progress=False, log=lambda s: None)
    return suite, cache, base, root
