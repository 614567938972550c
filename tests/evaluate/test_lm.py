import json
import math

import pytest
import torch
from typer.testing import CliRunner

from mergelab.evaluate.cli import app
from mergelab.evaluate.lm import exact_match, load_causal_lm, perplexity, read_qa
from mergelab.evaluate.tasks import SuiteError

WORDS = ["a", "b", "c", "d", "e", "f", "g", "h"]


def make_tiny_gpt2(folder, zero_embeddings=False, seed=0):
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(WORDS + ["<unk>"])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.decoder = decoders.WordPiece(prefix="##")  # joins word-level tokens with spaces
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="<unk>")
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(vocab), n_positions=64, n_embd=16, n_layer=1, n_head=2))
    if zero_embeddings:  # tied output layer: every logit is 0, the predictive distribution uniform
        with torch.no_grad():
            model.transformer.wte.weight.zero_()
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size(tmp_path):
    model, tok = load_causal_lm(make_tiny_gpt2(tmp_path / "u", zero_embeddings=True))
    text = " ".join(WORDS * 20)
    result = perplexity(model, tok, text, max_length=32)
    assert result["tokens"] == 160 - 5  # five windows of 32 tokens, the first of each is context only
    assert result["perplexity"] == pytest.approx(len(WORDS) + 1, rel=1e-5)


def test_perplexity_matches_the_models_own_loss(tmp_path):
    model, tok = load_causal_lm(make_tiny_gpt2(tmp_path / "r"))
    text = " ".join(WORDS[i % 7] for i in range(40))
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    assert perplexity(model, tok, text, max_length=64)["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)


def test_exact_match_compares_the_greedy_continuation(tmp_path):
    model, tok = load_causal_lm(make_tiny_gpt2(tmp_path / "u", zero_embeddings=True))
    # all logits equal: greedy decoding picks token 0 ("a") every time
    res = exact_match(model, tok, [("b c", "a a a"), ("d", "b")], max_new_tokens=3)
    assert [o["output"] for o in res["outputs"]] == ["a a a", "a a a"]
    assert res["exact_match"] == 0.5 and res["n"] == 2


def test_read_qa_names_the_bad_line(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text('{"prompt": "x", "answer": "y"}\n{"prompt": "x"}\n')
    with pytest.raises(SuiteError, match="qa.jsonl:2"):
        read_qa(path)


def test_evaluate_cli_reports_perplexity_ratio_and_collapse(tmp_path):
    good = make_tiny_gpt2(tmp_path / "good")
    text = tmp_path / "corpus.txt"
    text.write_text(" ".join(WORDS[i % 5] for i in range(100)))
    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps({"prompt": "a b", "answer": "c"}) + "\n")
    out = tmp_path / "lm.json"
    res = CliRunner().invoke(app, [str(good), "--text", str(text), "--qa", str(qa), "--baseline", str(good),
                                   "--out", str(out)])
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert data["ppl_ratio"] == pytest.approx(1.0) and data["collapsed"] is False
    assert data["exact_match"]["n"] == 1 and "exact match" in res.output
    # a merge whose weights blew up: non-finite loss is flagged, not hidden
    bad = make_tiny_gpt2(tmp_path / "bad")
    from safetensors.torch import load_file, save_file
    state = load_file(str(bad / "model.safetensors"))
    state["transformer.h.0.mlp.c_fc.weight"].fill_(float("nan"))
    save_file(state, str(bad / "model.safetensors"))
    res = CliRunner().invoke(app, [str(bad), "--text", str(text), "--baseline", str(good), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert json.loads(out.read_text())["collapsed"] is True and "collapsed" in res.output


def test_evaluate_cli_needs_something_to_do(tmp_path):
    res = CliRunner().invoke(app, [str(tmp_path)])
    assert res.exit_code != 0 and "nothing to evaluate" in str(res.exception)
