import pytest
import torch

from tests.realweights.conftest import real_family  # noqa: F401  (session fixture: MiniLM experts trained in set-up)

torch.set_num_threads(1)


VOCAB = 8000  # the word-embedding rows kept (the full 30522 x 384 matrix makes every step 8x slower)
EMBED = "embeddings.word_embeddings.weight"


@pytest.fixture(scope="session")
def family_states(real_family):  # noqa: F811
    """``(config, tokenizer, base, [experts], tasks)``: the real MiniLM family (one layer, fine-tuned in
    the set-up) as float32 state dicts, its vocabulary cut to the first :data:`VOCAB` rows."""
    from transformers import AutoConfig, AutoTokenizer

    def cut(state):
        return {k: (v[:VOCAB].clone() if k == EMBED else v) for k, v in state.items()}

    base = cut(real_family.state(real_family.base))
    experts = [cut(real_family.state(e)) for e in real_family.experts]
    tasks = [e.name.replace("expert_", "") for e in real_family.experts]
    config = AutoConfig.from_pretrained(str(real_family.base))
    config.vocab_size = VOCAB
    return config, AutoTokenizer.from_pretrained(str(real_family.base)), base, experts, tasks


@pytest.fixture(scope="session")
def batch(family_states):
    tok = family_states[1]
    enc = tok(["wonderful", "terrible film", "banana split", "the cat sat on the mat"], padding=True,
              return_tensors="pt")
    ids = enc["input_ids"].clone()
    ids[ids >= VOCAB] = tok.unk_token_id
    return {"input_ids": ids, "attention_mask": enc["attention_mask"]}
