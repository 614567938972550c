"""Statistics collection (mergelab.calibrate): Grams, Fisher and activations against independent oracles."""

import json

import pytest
import torch
from torch import nn

from mergelab.calibrate import (CalibrationSet, collect_activations, collect_fisher, collect_grams, file_texts,
                                load_model, load_statistic, read_metadata, suite_task_texts, tokenize_batches)
from mergelab.calibrate.data import Batch
from mergelab.calibrate.hooks import GramAccumulator
from mergelab.calibrate.model import CalibrationModel
from mergelab.calibrate.store import check_consistent, save_statistic
from mergelab.errors import CheckpointError, MergeLabError
from tests.calibrate import tiny
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bert") / "model"
    tiny.bert_classifier(folder, seed=0)
    return folder


def batches_for(folder, texts, batch_size, labels=None):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    return list(tokenize_batches(tok, CalibrationSet(texts, labels), batch_size, 32))


def masked_gram(rows):
    x = torch.cat(rows).double()
    return x.T @ x / x.shape[0]


def test_grams_equal_the_layer_inputs_recomputed_independently(bert):
    model = load_model(bert)
    texts = tiny.texts(13)
    batches = batches_for(bert, texts, 5)
    tensors, meta = collect_grams(model, batches)
    m = model.module
    emb_rows, l1_rows, pooled = [], [], []
    with torch.no_grad():
        for b in batches:
            out = m.bert(input_ids=b.input_ids, attention_mask=b.attention_mask, output_hidden_states=True)
            keep = b.attention_mask.bool()
            emb_rows.append(out.hidden_states[0][keep])
            l1_rows.append(out.hidden_states[1][keep])
            pooled.append(out.pooler_output)
    torch.testing.assert_close(tensors["bert.encoder.layer.0.attention.self.query.weight"].double(),
                               masked_gram(emb_rows), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tensors["bert.encoder.layer.1.attention.self.value.weight"].double(),
                               masked_gram(l1_rows), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tensors["classifier.weight"].double(), masked_gram(pooled), atol=1e-5, rtol=1e-5)
    tokens = int(sum(b.attention_mask.sum() for b in batches))
    assert meta["rows"]["bert.encoder.layer.0.attention.self.query.weight"] == tokens
    assert meta["rows"]["classifier.weight"] == 13
    # every float tensor of the checkpoint has an entry: Grams for linear weights, 0-d row counts otherwise
    from mergelab.io.checkpoint import Checkpoint

    names = {n for n, i in Checkpoint.open(str(bert)).tensors.items() if i.dtype.is_floating_point}
    assert set(tensors) == names
    linear = {n for n, mod in m.named_modules() if isinstance(mod, nn.Linear)}
    for n, t in tensors.items():
        assert (t.dim() == 2) == (n[: -len(".weight")] in linear and n.endswith(".weight"))
    assert tensors["bert.embeddings.LayerNorm.weight"].dim() == 0


def test_streaming_is_independent_of_batching_and_padding(bert):
    model = load_model(bert)
    texts = tiny.texts(11)
    one, _ = collect_grams(model, batches_for(bert, texts, 1))  # batch 1: no padding at all
    many, _ = collect_grams(model, batches_for(bert, texts, 4))
    for k in one:
        torch.testing.assert_close(one[k], many[k], atol=1e-6, rtol=1e-6)
    with_pad, meta = collect_grams(model, batches_for(bert, texts, 4), mask_padding=False)
    assert meta["settings"]["mask_padding"] is False
    key = "bert.encoder.layer.0.attention.self.query.weight"
    assert not torch.allclose(with_pad[key], many[key], atol=1e-4)  # padding rows count in the reference's way


def test_gram_accumulator_matches_batch_computation():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, 9, generator=g)
    acc = GramAccumulator(9)
    for chunk in x.split(37):
        acc.add(chunk)
    torch.testing.assert_close(acc.result("mean"), (x.double().T @ x.double()) / 1000, atol=1e-6, rtol=0)
    torch.testing.assert_close(acc.result("sum"), x.double().T @ x.double(), atol=1e-6, rtol=1e-9)


class _Logistic(nn.Module):
    """Binary logistic regression as a 2-class softmax with logits [0, w.x + b]; x is a fixed table row."""

    def __init__(self, features):
        super().__init__()
        self.register_buffer("table", features)
        self.lin = nn.Linear(features.shape[1], 1)


def _logistic_model(features, w, b):
    m = _Logistic(features)
    with torch.no_grad():
        m.lin.weight.copy_(w)
        m.lin.bias.fill_(b)

    def logits_fn(module, ids, mask):
        z = module.lin(module.table[ids[:, 0]])
        return torch.cat([torch.zeros_like(z), z], 1)

    return CalibrationModel(m, "classifier", logits_fn=logits_fn)


def _one(i, label=None):
    return Batch(torch.tensor([[i]]), torch.ones(1, 1, dtype=torch.long),
                 None if label is None else torch.tensor([label]))


def test_exact_fisher_of_logistic_regression_is_p_one_minus_p_x_squared():
    x = torch.tensor([[0.5, -2.0, 1.5]])
    w = torch.tensor([[0.3, 0.1, -0.4]])
    model = _logistic_model(x, w, 0.2)
    fisher, _ = collect_fisher(model, [_one(0)], mode="exact")
    p = torch.sigmoid(x @ w.T + 0.2)[0, 0]
    torch.testing.assert_close(fisher["lin.weight"], (p * (1 - p) * x ** 2), atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(fisher["lin.bias"], (p * (1 - p)).reshape(1), atol=1e-7, rtol=1e-6)


def test_sampled_and_empirical_fisher():
    x = torch.tensor([[1.0, -1.0]])
    w = torch.tensor([[0.7, 0.4]])
    model = _logistic_model(x, w, 0.0)
    p = float(torch.sigmoid(x @ w.T)[0, 0])
    emp, _ = collect_fisher(model, [_one(0, 1)], mode="empirical")
    torch.testing.assert_close(emp["lin.weight"], (1 - p) ** 2 * x ** 2)
    with pytest.raises(MergeLabError, match="labelled"):
        collect_fisher(model, [_one(0)], mode="empirical")
    # labels drawn from the model: each example gives one of the two outcomes; the mean tends to p(1-p) x^2
    sampled, meta = collect_fisher(model, [Batch(torch.zeros(1000, 1, dtype=torch.long),
                                                 torch.ones(1000, 1, dtype=torch.long))], mode="sampled", seed=3)
    assert meta["examples"] == 1000
    torch.testing.assert_close(sampled["lin.weight"], p * (1 - p) * x ** 2, rtol=0.06, atol=0)
    again, _ = collect_fisher(model, [Batch(torch.zeros(1000, 1, dtype=torch.long),
                                            torch.ones(1000, 1, dtype=torch.long))], mode="sampled", seed=3)
    assert torch.equal(again["lin.weight"], sampled["lin.weight"])  # seeded


def test_batched_fisher_is_the_squared_batch_gradient_approximation():
    x = torch.tensor([[1.0, 2.0], [-0.5, 0.3], [0.2, -1.0]])
    w = torch.tensor([[0.4, -0.3]])
    model = _logistic_model(x, w, 0.1)
    batch = Batch(torch.tensor([[0], [1], [2]]), torch.ones(3, 1, dtype=torch.long))
    fisher, meta = collect_fisher(model, [batch], mode="batched")
    s = torch.sigmoid(x @ w.T + 0.1)[:, 0]
    # d/dz of sqrt(p1) log p1 + sqrt(p0) log p0 with p1 = s: sqrt(s)(1 - s) - sqrt(1 - s) s
    coeff = s.sqrt() * (1 - s) - (1 - s).sqrt() * s
    g = (coeff[:, None] * x).sum(0)
    torch.testing.assert_close(fisher["lin.weight"][0], g ** 2 / 3, atol=1e-7, rtol=1e-6)
    assert meta["settings"]["approximation"] is True
    exact, _ = collect_fisher(model, [batch], mode="exact")
    assert not torch.allclose(exact["lin.weight"], fisher["lin.weight"])


def test_bert_fisher_covers_every_tensor_and_ignores_unseen_tokens(bert):
    model = load_model(bert)
    texts = ["w1 w2", "w3"]
    fisher, meta = collect_fisher(model, batches_for(bert, texts, 2, labels=[0, 1]), mode="exact")
    assert meta["no_gradient"] == []
    assert all((v >= 0).all() for v in fisher.values())
    emb = fisher["bert.embeddings.word_embeddings.weight"]
    vocab = tiny.VOCAB
    seen = {vocab.index(t) for t in ("[CLS]", "[SEP]", "w1", "w2", "w3")}
    for i in range(len(vocab)):
        assert (emb[i].abs().sum() > 0) == (i in seen), vocab[i]


def test_llama_causal_lm(tmp_path):
    folder = tmp_path / "llama"
    tiny.llama_lm(folder, seed=1)
    model = load_model(folder)
    assert model.kind == "causal_lm"
    batches = batches_for(folder, tiny.texts(6), 3)
    grams, meta = collect_grams(model, batches)
    with torch.no_grad():
        rows = [model.module.model(input_ids=b.input_ids, attention_mask=b.attention_mask).last_hidden_state[
            b.attention_mask.bool()] for b in batches]
    torch.testing.assert_close(grams["lm_head.weight"].double(), masked_gram(rows), atol=1e-5, rtol=1e-5)
    assert grams["model.layers.0.mlp.down_proj.weight"].shape == (32, 32)
    assert grams["model.layers.1.self_attn.k_proj.weight"].shape == (16, 16)
    fisher, fmeta = collect_fisher(model, batches)  # auto -> sampled for a causal LM
    assert fmeta["settings"]["fisher_mode"] == "sampled"
    assert set(fisher) == set(grams)
    assert float(fisher["model.layers.0.self_attn.q_proj.weight"].sum()) > 0
    with pytest.raises(MergeLabError, match="vocabulary"):
        collect_fisher(model, batches, mode="exact")
    emp, _ = collect_fisher(model, batches, mode="empirical")
    assert float(emp["lm_head.weight"].sum()) > 0


def test_gpt2_conv1d_grams_use_checkpoint_names(tmp_path):
    folder = tmp_path / "gpt2"
    tiny.gpt2_lm(folder, seed=2)
    model = load_model(folder)
    batches = batches_for(folder, tiny.texts(5), 5)
    grams, meta = collect_grams(model, batches)
    from mergelab.io.checkpoint import Checkpoint

    names = set(Checkpoint.open(str(folder)).tensors)
    key = next(n for n in names if n.endswith("h.0.attn.c_attn.weight"))
    assert meta["linear_weights"][key] == "conv1d"
    assert grams[key].shape == (16, 16)
    fc = next(n for n in names if n.endswith("h.0.mlp.c_proj.weight"))
    assert grams[fc].shape == (64, 64)  # c_proj of the MLP reads the 4*16-wide activation
    with torch.no_grad():
        t = model.module.transformer
        rows = []
        for b in batches:
            h = t(input_ids=b.input_ids, attention_mask=b.attention_mask, output_hidden_states=True).hidden_states[0]
            rows.append(t.h[0].ln_1(h)[b.attention_mask.bool()])
    torch.testing.assert_close(grams[key].double(), masked_gram(rows), atol=1e-5, rtol=1e-5)
    assert set(grams) <= names


def test_activations_store_inputs_hidden_states_and_logits(bert):
    model = load_model(bert)
    texts = tiny.texts(7)
    tensors, meta = collect_activations(model, batches_for(bert, texts, 3), layers=[0, -1])
    assert set(tensors) == {"input_ids", "attention_mask", "logits", "hidden.0", "hidden.2"}
    assert tensors["logits"].shape == (7, 3)
    ids, mask = tensors["input_ids"][:1], tensors["attention_mask"][:1]
    with torch.no_grad():
        out = model.module(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    torch.testing.assert_close(tensors["logits"][:1], out.logits, atol=1e-5, rtol=1e-5)
    keep = mask[0].bool()
    torch.testing.assert_close(tensors["hidden.2"][0][keep], out.hidden_states[2][0][keep], atol=1e-5, rtol=1e-5)


def test_test_split_needs_declared_test_time_adaptation(tmp_path):
    rows = [{"text": t, "label": "ab"[i % 2]} for i, t in enumerate(tiny.texts(40))]
    tiny.write_jsonl(tmp_path / "t.jsonl", rows)
    (tmp_path / "suite.yaml").write_text("name: mini\ntasks:\n  t: t.jsonl\n")
    data = suite_task_texts(str(tmp_path / "suite.yaml"), "t", "train", n=5)
    assert len(data) == 5 and data.source["split"] == "train" and data.source["test_time"] is False
    with pytest.raises(MergeLabError, match="test-time adaptation"):
        suite_task_texts(str(tmp_path / "suite.yaml"), "t", "test")
    tta = suite_task_texts(str(tmp_path / "suite.yaml"), "t", "test", test_time=True)
    assert tta.source["test_time"] is True


def test_cli_writes_statistics_with_provenance(bert, tmp_path, capsys):
    data = tiny.write_jsonl(tmp_path / "d.jsonl", [{"text": t, "label": i % 3} for i, t in enumerate(tiny.texts(6))])
    out = tmp_path / "stats"
    code, stdout, err = run_cli(["calibrate", bert, "--data", data, "--label-field", "label", "-o", out,
                                 "--stats", "gram,fisher,activations", "--fisher-mode", "empirical", "-n", "4",
                                 "--batch-size", "2", "-q"], capsys)
    assert code == 0, err
    report = json.loads(stdout)
    assert report["examples"] == 4
    meta = read_metadata(out / "gram.safetensors", "gram")
    assert meta["data"]["path"] == str(data) and meta["data"]["n"] == 4
    assert meta["settings"] == {"gram_reduction": "mean", "mask_padding": True}
    assert meta["model"] == str(bert) and meta["model_fingerprint"]
    assert read_metadata(out / "fisher.safetensors")["settings"]["fisher_mode"] == "empirical"
    summary = json.loads((out / "calibration.json").read_text())
    assert summary["bytes"] > 0 and set(summary["statistics"]) == {"gram", "fisher", "activations"}
    assert summary["statistics"]["gram"]["bytes"] == (out / "gram.safetensors").stat().st_size
    # calibrating one more statistic later keeps the others' entries
    code, _, err = run_cli(["calibrate", bert, "--data", data, "-o", out, "--stats", "gram", "-n", "2", "-q"], capsys)
    assert code == 0, err
    again = json.loads((out / "calibration.json").read_text())["statistics"]
    assert again["gram"]["examples"] == 2 and again["fisher"]["examples"] == 4
    code, _, err = run_cli(["calibrate", bert, "--data", data, "-o", out, "--stats", "hessian"], capsys)
    assert code == 2 and "hessian" in err
    code, _, err = run_cli(["calibrate", bert, "-o", out], capsys)
    assert code == 2 and "--data" in err


def test_store_refuses_foreign_and_inconsistent_files(tmp_path):
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(CheckpointError, match="not a mergelab statistics file"):
        read_metadata(tmp_path / "plain.safetensors")
    a = save_statistic(tmp_path / "a", "gram", {"w": torch.eye(2)}, {"settings": {"gram_reduction": "mean",
                                                                                    "mask_padding": True}})
    b = save_statistic(tmp_path / "b", "gram", {"w": torch.eye(2)}, {"settings": {"gram_reduction": "sum",
                                                                                    "mask_padding": True}})
    with pytest.raises(CheckpointError, match="gram_reduction"):
        check_consistent([a, b], "gram")
    with pytest.raises(CheckpointError, match="holds 'gram'"):
        read_metadata(a, "fisher")
    tensors, meta = load_statistic(tmp_path / "a", "gram")
    assert torch.equal(tensors["w"], torch.eye(2)) and meta["statistic"] == "gram"


def test_file_texts_plain_and_errors(tmp_path):
    (tmp_path / "t.txt").write_text("a b\n\nc d e\n")
    assert sorted(file_texts(tmp_path / "t.txt").texts) == ["a b", "c d e"]
    (tmp_path / "bad.jsonl").write_text('{"txt": 1}\n')
    with pytest.raises(MergeLabError, match="bad.jsonl:1"):
        file_texts(tmp_path / "bad.jsonl")
