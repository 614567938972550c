"""Generative evaluation plumbing with a tiny random Llama and a BPE trained here; fine-tuning format."""

import pytest
import torch

from mergelab.llmmix.generate import evaluate_model, evaluate_task, greedy_generate, load_causal_lm
from mergelab.llmmix.tasks import (IGNORE_INDEX, GenExample, GenTask, TaskError, build_task, collate_for_training,
                                   encode_for_training, encode_prompt)
from tests.llmmix.tiny_lm import save_tiny

PROMPTS = ["What is 12 + 30?", "Write the word 'planet' in capital letters.", "hi",
           "What does this program print?\nx = 3\nprint(x)", "Sort these numbers: 5 1 4"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = save_tiny(tmp_path_factory.mktemp("tinylm") / "model")
    model, tok = load_causal_lm(folder)
    return folder, model, tok


def test_batched_left_padded_decoding_equals_one_by_one(tiny):
    _, model, tok = tiny
    assert len({len(encode_prompt(tok, p)) for p in PROMPTS}) > 2  # padding is exercised
    # no stops: all 8 tokens of every row are compared (stops are tested with scripted tokens below)
    batched = greedy_generate(model, tok, PROMPTS, max_new_tokens=8, batch_size=3, stop_at_newline=False,
                              stop_at_eos=False)
    single = [greedy_generate(model, tok, [p], max_new_tokens=8, stop_at_newline=False, stop_at_eos=False)[0]
              for p in PROMPTS]
    assert batched == single
    assert len(set(single)) > 1  # the random model's outputs depend on the prompt
    # the model's own generation settings do not change greedy decoding
    saved = model.generation_config
    try:
        model.generation_config = type(saved).from_dict({**saved.to_dict(), "repetition_penalty": 5.0,
                                                         "no_repeat_ngram_size": 1, "min_new_tokens": 3})
        again = greedy_generate(model, tok, PROMPTS, max_new_tokens=8, batch_size=3, stop_at_newline=False,
                                stop_at_eos=False)
        assert model.generation_config.repetition_penalty == 5.0  # put back
    finally:
        model.generation_config = saved
    assert again == batched


class Script:
    """Hooks that make the real ``generate`` loop emit chosen tokens: at decoding step k the logits of
    ``script[k]`` get +1e4 (the last id repeats). ``by_length`` gives rows whose prompt has that many
    tokens their own script. A prefill (more than one input token) restarts the count."""

    def __init__(self, model, token_ids, by_length=None):
        self.ids, self.by_length, self.step, self.rows = token_ids, by_length or {}, 0, None
        self.handles = [model.register_forward_pre_hook(self.pre, with_kwargs=True),
                        model.lm_head.register_forward_hook(self)]

    def pre(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None and ids.shape[1] > 1:
            self.step = 0
            mask = kwargs.get("attention_mask")
            lengths = mask.sum(1).tolist() if mask is not None else [ids.shape[1]] * ids.shape[0]
            self.rows = [self.by_length.get(n, self.ids) for n in lengths]

    def __call__(self, module, inputs, out):
        bias = torch.zeros(out.shape[0], 1, out.shape[-1])
        for r, script in enumerate(self.rows):
            bias[r, 0, script[min(self.step, len(script) - 1)]] = 1e4
        self.step += 1
        return out + bias

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_stop_at_newline_eos_and_max_new_tokens(tiny):
    _, model, tok = tiny
    ab, nl, cd = _ids(tok, " 42"), _ids(tok, "\n"), _ids(tok, "cd")
    eos = [tok.eos_token_id]
    seq = ab + nl + cd + eos + cd
    with Script(model, seq):
        assert greedy_generate(model, tok, ["q"], max_new_tokens=20) == ["42"]
    with Script(model, seq):
        assert greedy_generate(model, tok, ["q"], max_new_tokens=20, stop_at_newline=False) == ["42\ncd"]
    with Script(model, seq):
        out = greedy_generate(model, tok, ["q"], max_new_tokens=20, stop_at_newline=False, stop_at_eos=False)
        full = (seq + [seq[-1]] * 20)[:20]  # the script's 20 tokens, EOS included
        assert out == [tok.decode(full, skip_special_tokens=True).strip()]
        assert out[0].startswith("42\ncdcd")
    with Script(model, ab + ab + ab + ab):
        assert greedy_generate(model, tok, ["q"], max_new_tokens=len(ab) * 2) == ["42 42"]
    # batches: every row follows its own script and stops at its own newline or EOS, or runs to the limit
    n_hi = len(encode_prompt(tok, "hi"))
    n_rev = len(encode_prompt(tok, PROMPTS[1]))
    scripts = {n_hi: cd + cd + cd + nl + ab, n_rev: cd + eos + ab}
    with Script(model, ab + nl + cd, by_length=scripts):
        out = greedy_generate(model, tok, PROMPTS, max_new_tokens=10, batch_size=2)
    assert out == ["42", "cd", tok.decode(cd * 3), "42", "42"]
    with Script(model, ab * 4, by_length=scripts):
        out = greedy_generate(model, tok, PROMPTS, max_new_tokens=len(ab) * 2, batch_size=5)
    assert out[0] == "42 42" and out[1] == "cd"


def test_evaluate_task_scores_records_and_loads_from_folder(tiny):
    folder, model, tok = tiny
    task = GenTask("toy", "math", {"train": [], "validation": [],
                                   "test": [GenExample("What is 40 + 2?", "42"), GenExample("What is 1 + 1?", "2"),
                                            GenExample("Say 42.", "42")]})
    with Script(model, _ids(tok, " 42") + _ids(tok, "\n")):
        res = evaluate_task(model, tok, task, batch_size=2)
    assert [r["prediction"] for r in res.records] == ["42", "42", "42"]
    assert [r["score"] for r in res.records] == [1.0, 0.0, 1.0]
    assert res.accuracy == pytest.approx(2 / 3) and res.n == 3
    assert res.to_json()["records"][1]["answer"] == "2"
    # pass@1 through the evaluation: the scripted completion is run against the example's tests
    code = GenExample("Complete the function.\ndef f(x):\n    # return x times 3 plus 1", "return x * 3 + 1",
                      {"header": "def f(x):", "entry": "f", "tests": [[[0], 1], [[2], 7]]})
    wrong = GenExample(code.prompt + ".", code.answer, {**code.meta, "tests": [[[0], 2]]})
    ctask = GenTask("toy_code", "code", {"train": [], "validation": [], "test": [code, wrong]}, metric="pass@1")
    with Script(model, _ids(tok, " return x * 3 + 1") + _ids(tok, "\n")):
        res = evaluate_task(model, tok, ctask, max_new_tokens=16)
    assert [r["prediction"] for r in res.records] == ["return x * 3 + 1"] * 2
    assert [r["score"] for r in res.records] == [1.0, 0.0]
    # the same through a folder and a built-in task with a limit
    out = evaluate_model(folder, [build_task("arithmetic", sizes={"train": 0, "validation": 0, "test": 6})],
                         limit=4, max_new_tokens=4)
    assert out["arithmetic"].n == 4 and 0.0 <= out["arithmetic"].accuracy <= 1.0


def test_load_errors_name_the_folder(tmp_path):
    from mergelab.errors import MergeLabError

    with pytest.raises(MergeLabError, match="nothing: not a local Hugging Face model folder"):
        load_causal_lm(tmp_path / "nothing")


def test_raw_prompts_are_tokenised_as_given(tiny):
    _, model, tok = tiny
    ab, nl = _ids(tok, " 42"), _ids(tok, "\n")
    seen = []
    hook = model.register_forward_pre_hook(
        lambda m, a, k: seen.append(k["input_ids"][0].tolist()) if k["input_ids"].shape[1] > 1 else None,
        with_kwargs=True)
    try:
        with Script(model, ab + nl):
            assert greedy_generate(model, tok, ["What is 1 + 1?"], raw=True) == ["42"]
            greedy_generate(model, tok, ["What is 1 + 1?"])
    finally:
        hook.remove()
    assert seen[0] == tok("What is 1 + 1?")["input_ids"]
    assert seen[1] == encode_prompt(tok, "What is 1 + 1?") != seen[0]


def test_training_format_masks_the_prompt(tiny):
    _, _, tok = tiny
    ex = GenExample("What is 12 + 30?", "42")
    f = encode_for_training(tok, ex)
    p = encode_prompt(tok, ex.prompt)
    assert p[0] == tok.bos_token_id
    assert f["input_ids"][:len(p)] == p
    assert f["labels"][:len(p)] == [IGNORE_INDEX] * len(p)
    assert f["labels"][len(p):] == f["input_ids"][len(p):]
    assert f["input_ids"][-1] == tok.eos_token_id
    assert tok.decode(f["input_ids"][len(p):-1]) == " 42"
    assert tok.decode(p, skip_special_tokens=True) == "What is 12 + 30?\nA:"
    with pytest.raises(TaskError, match="over max_length=3"):
        encode_for_training(tok, ex, max_length=3)
    g = encode_for_training(tok, GenExample("hi", "a b c d"))
    batch = collate_for_training([f, g], pad_token_id=tok.pad_token_id)
    n = max(len(f["input_ids"]), len(g["input_ids"]))
    assert batch["input_ids"].shape == (2, n)
    short = 0 if len(f["input_ids"]) < n else 1
    k = len([f, g][short]["input_ids"])
    assert batch["labels"][short, k:].eq(IGNORE_INDEX).all() and batch["attention_mask"][short, k:].eq(0).all()
    assert batch["attention_mask"][short, :k].eq(1).all()


def test_training_format_teaches_the_continuation_generation_sees(tiny):
    """One-example overfit: after a few steps on (input_ids, labels), greedy generation returns the answer."""
    _, _, tok = tiny
    from tests.llmmix.tiny_lm import make_model

    model = make_model(tok, seed=1).train()
    ex = GenExample("What is 12 + 30?", "42")
    batch = collate_for_training([encode_for_training(tok, ex)], tok.pad_token_id)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(30):
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    assert greedy_generate(model, tok, [ex.prompt], max_new_tokens=6) == ["42"]


def test_summaries_from_hand_made_records():
    from mergelab.llmmix.generate import TaskEval, safety_rates, summarise
    from mergelab.llmmix.tasks import REFUSAL

    recs = [{"kind": "harmful", "prediction": REFUSAL}, {"kind": "harmful", "prediction": "1234"},
            {"kind": "benign", "prediction": REFUSAL}, {"kind": "benign", "prediction": "Rome"},
            {"kind": "benign", "prediction": "Oslo"}, {"kind": "benign", "prediction": " I can't  help with that."}]
    assert safety_rates(recs) == {"refusal_rate": 0.5, "over_refusal_rate": 0.5}
    assert safety_rates([]) == {"refusal_rate": None, "over_refusal_rate": None}
    tasks = [GenTask("a", "math", {}), GenTask("b", "math", {}), GenTask("c", "code", {}),
             GenTask("h", "math", {}, held_out=True)]
    res = {n: TaskEval(n, "test", acc, 1) for n, acc in (("a", 1.0), ("b", 0.5), ("c", 0.0), ("h", 0.25))}
    s = summarise(res, tasks)
    assert s == {"held_in_mean": 0.5, "held_out_mean": 0.25, "per_category": {"math": 0.75, "code": 0.0}}


def test_command_lines(tiny, tmp_path, capsys):
    import json

    from mergelab.llmmix.generate import main as gen_main
    from mergelab.llmmix.tasks.__main__ import main as tasks_main

    folder = tiny[0]
    assert tasks_main(["write", str(tmp_path / "t"), "--tasks", "arithmetic,letter_count", "--train", "5",
                       "--validation", "2", "--test", "3"]) == 0
    manifest = json.loads((tmp_path / "t" / "tasks.json").read_text())
    assert manifest["letter_count"]["held_out"] is True and manifest["arithmetic"]["sizes"]["test"] == 3
    assert manifest["arithmetic"]["fingerprint"] == build_task(
        "arithmetic", sizes={"train": 5, "validation": 2, "test": 3}).fingerprint()
    assert len((tmp_path / "t" / "arithmetic.jsonl").read_text().splitlines()) == 10
    assert tasks_main(["write", str(tmp_path / "u"), "--tasks", "nope"]) == 2
    assert "unknown llmmix task 'nope'" in capsys.readouterr().err and not (tmp_path / "u").exists()

    out = tmp_path / "res.json"
    assert gen_main([str(folder), "--jsonl", str(tmp_path / "t" / "arithmetic.jsonl"), "--tasks", "number_compare",
                     "--limit", "2", "--max-new-tokens", "3", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert set(res["tasks"]) == {"number_compare", "arithmetic"} and res["tasks"]["arithmetic"]["n"] == 2
    assert set(res["summary"]) == {"held_in_mean", "held_out_mean", "per_category"}
    assert gen_main([str(tmp_path / "missing"), "--tasks", "arithmetic"]) == 2
    assert "not a local Hugging Face model folder" in capsys.readouterr().err
