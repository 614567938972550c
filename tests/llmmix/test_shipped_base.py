"""The default base shipped inside the package: it loads with transformers, has the recorded size, is
the very model pretraining measured (its held-out loss, recomputed here from the shipped held-out
documents, is pretrain.json's ``final_val_loss``), and the suite uses it when the cache has no base."""

import json
import math

import pytest

from mergelab.llmmix.pretrain import PretrainError, base_folder, base_source, find_base, shipped_base

SEQ = 256  # pretraining's --seq-len; its evaluation read the first 8 x 16 blocks of SEQ + 1 tokens


@pytest.fixture(scope="module")
def shipped():
    folder = shipped_base("3m")
    assert folder is not None, "mergelab/data/llmmix/base-3m is missing from the package"
    return folder


def test_shipped_base_loads_and_has_the_recorded_size(shipped):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    rec = json.loads((shipped / "pretrain.json").read_text())
    assert rec["size"] == "3m" and rec["remake"].startswith("mergelab bench pretrain --size 3m --steps ")
    model = AutoModelForCausalLM.from_pretrained(shipped)
    assert isinstance(model, LlamaForCausalLM) and model.config.tie_word_embeddings
    assert sum(p.numel() for p in model.parameters()) == rec["parameters"] == 3_147_904
    assert all(p.dtype.is_floating_point and p.element_size() == 4 for p in model.parameters())  # float32
    tok = AutoTokenizer.from_pretrained(shipped)
    assert len(tok) == model.config.vocab_size == 8192
    text = "def read_config(path):\n    return json.load(open(path))"
    assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text
    assert tok.tokenize("2721") == ["2", "7", "2", "1"]  # the tokenizer that splits digits (docs/llmmix.md)
    total = sum(f.stat().st_size for f in shipped.iterdir())
    assert total <= 25 * 2**20, f"the shipped base is {total / 2**20:.1f} MiB (at most 25 MiB may ship)"


def test_shipped_base_reproduces_its_recorded_heldout_loss(shipped):
    """Tokenise the held-out documents as pretraining did (<|bos|> text <|eos|>, concatenated), cut the
    blocks its evaluation read, and recompute the mean next-token loss: it must be the recorded one."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rec = json.loads((shipped / "pretrain.json").read_text())
    tok = AutoTokenizer.from_pretrained(shipped)
    model = AutoModelForCausalLM.from_pretrained(shipped).eval()
    batch, batches = rec["settings"]["batch_size"], 8
    need = (batch * batches - 1) * SEQ + SEQ + 1
    ids = []
    with open(shipped / "heldout.jsonl", encoding="utf-8") as f:
        for line in f:
            ids += tok(json.loads(line)["text"])["input_ids"] + [tok.eos_token_id]
            if len(ids) >= need:
                break
    assert len(ids) >= need and ids[0] == tok.bos_token_id
    x = torch.tensor(ids[:need])
    blocks = torch.stack([x[k * SEQ:k * SEQ + SEQ + 1] for k in range(batch * batches)])
    total = 0.0
    with torch.no_grad():
        for b in range(batches):
            xb = blocks[b * batch:(b + 1) * batch]
            total += float(model(input_ids=xb, labels=xb).loss) * len(xb)
    loss = total / len(blocks)
    assert loss == pytest.approx(rec["final_val_loss"], abs=2e-3)
    assert math.exp(loss) == pytest.approx(math.exp(rec["final_val_loss"]), rel=2e-3)  # perplexity ~21.8
    # a model that is not this one is far off: the untrained initialisation's loss is ~ln(8192) = 9.0
    assert loss < 3.5


def test_cache_wins_else_shipped(shipped, tmp_path):
    import shutil

    folder, source = find_base("3m", tmp_path)
    assert (folder, source) == (shipped, "shipped") and base_source(folder) == "shipped"
    cached = tmp_path / "base-3m" / "final"
    cached.mkdir(parents=True)
    shutil.copy(shipped / "config.json", cached)
    (cached / "model.safetensors").write_bytes(b"")  # the cache's, whatever it holds
    assert find_base("3m", tmp_path) == (cached, "cache") and base_folder("3m", tmp_path) == cached
    assert base_source(cached) == "cache"
    with pytest.raises(PretrainError, match="mergelab bench pretrain --size 20m"):
        base_folder("20m", tmp_path)  # no 20m ships


def test_perplexity_text_of_the_shipped_base(shipped, tmp_path):
    """bench run's collapse guard reads the held-out split of the base's corpus; with the shipped base and
    no corpus in the cache that is the shipped heldout.jsonl, whose documents are that split's first ones."""
    from mergelab.llmmix.run import heldout_text

    docs = [json.loads(line)["text"] for line in (shipped / "heldout.jsonl").read_text(encoding="utf-8").splitlines()]
    text, source = heldout_text(tmp_path, chars=20_000, base_dir=shipped)
    assert text == "\n\n".join(docs)[:20_000] and len(text) == 20_000
    assert source.endswith("heldout.jsonl")
