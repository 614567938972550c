"""llmmix experts: full fine-tuning from a tiny base (loss, resume, records), `bench prepare --suite llmmix`
(experts, multi-task model, skipping finished ones) and a task-arithmetic merge of two trained experts."""

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from mergelab.bench.cli import app
from mergelab.llmmix.finetune import FinetuneConfig, FinetuneError, finetune
from mergelab.llmmix.generate import evaluate_task, greedy_generate, load_causal_lm
from mergelab.llmmix.prepare import prepare
from mergelab.llmmix.tasks import build_task
from tests.llmmix.tiny_lm import save_tiny

SIZES = {"train": 32, "validation": 6, "test": 6}
EXAMPLES = "train=32,validation=6,test=6"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    r = tmp_path_factory.mktemp("llmmix")
    save_tiny(r / "base-tiny" / "final")
    return r


def _cfg(**kw):
    return FinetuneConfig(**{"steps": 24, "batch_size": 8, "lr": 3e-3, "checkpoint_every": 100, "threads": 1, "replay_batch": 0, **kw})


def _weights(folder):
    return load_file(str(folder / "model.safetensors"))


def test_expert_learns_loads_generates_and_records(root, tmp_path):
    torch.set_num_threads(2)  # the caller's count; the run uses threads=1 and must give it back
    task = build_task("language_id", seed=0, sizes=SIZES)
    r = finetune(root / "base-tiny" / "final", [task], tmp_path / "e", _cfg(), base_accuracy={"language_id": 0.0},
                 progress=False, log=lambda s: None)
    assert torch.get_num_threads() == 2
    first = sum(l for _, l in r.losses[:3]) / 3
    last = sum(l for _, l in r.losses[-3:]) / 3
    assert len(r.losses) == 24 and last < 0.6 * first, (first, last)
    model, tok = load_causal_lm(r.final_dir)  # AutoModelForCausalLM + AutoTokenizer
    outs = greedy_generate(model, tok, [e.prompt for e in task.split("test")], max_new_tokens=6)
    assert len(outs) == 6 and all(isinstance(o, str) for o in outs)
    rec = json.loads((tmp_path / "e" / "finetune.json").read_text())
    assert rec["finished"] and rec["step"] == 24 and rec["base_validation_accuracy"] == {"language_id": 0.0}
    # the recorded accuracy is the saved model's accuracy on the validation split
    assert rec["validation_accuracy"]["language_id"] == evaluate_task(model, tok, task, "validation").accuracy
    lines = (tmp_path / "e" / "loss.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == list(range(1, 25))
    assert (tmp_path / "e" / "loss.png").is_file()
    base = _weights(root / "base-tiny" / "final")
    assert any(not torch.equal(base[k], v) for k, v in _weights(r.final_dir).items())


def test_resume_equals_uninterrupted(root, tmp_path):
    task = build_task("string_ops", seed=0, sizes=SIZES)
    base = root / "base-tiny" / "final"
    quiet = dict(progress=False, log=lambda s: None)
    whole = finetune(base, [task], tmp_path / "a", _cfg(steps=12, eval_limit=1), **quiet)
    part = finetune(base, [task], tmp_path / "b", _cfg(steps=12, eval_limit=1), stop_after=5, **quiet)
    assert part.final_dir is None and part.step == 5
    rest = finetune(base, [task], tmp_path / "b", _cfg(steps=12, eval_limit=1), **quiet)
    assert rest.step == 12 and rest.losses == whole.losses
    wa, wb = _weights(whole.final_dir), _weights(rest.final_dir)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    # other settings in the same folder: an error, not a silent restart
    with pytest.raises(FinetuneError, match="other settings"):
        finetune(base, [task], tmp_path / "b", _cfg(steps=12, lr=1e-3, eval_limit=1), **quiet)


def _replay_file(path, vocab, n=4000, seed=0):
    import numpy as np

    np.random.default_rng(seed).integers(3, vocab, n).astype(np.uint16).tofile(path)
    return path


def test_replay_adds_the_pretraining_loss_and_resumes(root, tmp_path):
    """With replay each step also fits blocks of pretraining text: the loss recorded as replay_loss is the
    model's next-token loss on exactly the seeded block the step read; a resumed run equals an
    uninterrupted one; replay without its token file is an error naming what is missing."""
    import numpy as np

    from mergelab.llmmix.pretrain import Blocks

    task = build_task("string_ops", seed=0, sizes=SIZES)
    base = root / "base-tiny" / "final"
    tokens = _replay_file(tmp_path / "train.u16", 400)
    quiet = dict(progress=False, log=lambda s: None)
    cfg = _cfg(steps=6, eval_limit=1, replay_batch=2, replay_len=16)
    whole = finetune(base, [task], tmp_path / "a", cfg, replay=tokens, **quiet)
    recs = [json.loads(l) for l in (tmp_path / "a" / "loss.jsonl").read_text().splitlines()]
    assert all("replay_loss" in r for r in recs)
    # step 1's replay loss is the base's loss on the first seeded blocks, computed here
    model, _ = load_causal_lm(base)
    ids = torch.from_numpy(Blocks(tokens, 16, cfg.seed + 1).batch(0, 2))
    assert ids.shape == (2, 17)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1]
        want = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    assert recs[0]["replay_loss"] == pytest.approx(want.item(), abs=1e-5)
    part = finetune(base, [task], tmp_path / "b", cfg, replay=tokens, stop_after=3, **quiet)
    assert part.step == 3
    rest = finetune(base, [task], tmp_path / "b", cfg, replay=tokens, **quiet)
    wa, wb = _weights(whole.final_dir), _weights(rest.final_dir)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # replay changes the model; a run without replay differs
    plain = finetune(base, [task], tmp_path / "c", _cfg(steps=6, eval_limit=1), **quiet)
    assert any(not torch.equal(wa[k], _weights(plain.final_dir)[k]) for k in wa)
    # other replay text is another run
    other = _replay_file(tmp_path / "other.u16", 400, seed=1)
    with pytest.raises(FinetuneError, match="other settings"):
        finetune(base, [task], tmp_path / "b", cfg, replay=other, **quiet)
    with pytest.raises(FinetuneError, match="train.u16"):
        finetune(base, [task], tmp_path / "d", cfg, replay=None, **quiet)
    assert not (tmp_path / "d").exists()
    assert np.fromfile(tokens, dtype=np.uint16).size == 4000


def test_prepare_experts_multitask_skip_and_merge(root):
    cfg = _cfg(steps=16, eval_limit=3)
    folder = root / "experts-tiny"
    # an expert left unfinished (as by a kill) is resumed, not restarted
    finetune(root / "base-tiny" / "final", [build_task("arithmetic", seed=0, sizes=SIZES)], folder / "arithmetic",
             cfg, command="test", stop_after=5, progress=False, log=lambda s: None)
    lines = []
    r = prepare("tiny", root, cfg, tasks=["arithmetic", "string_ops"], multitask_steps=16, sizes=SIZES,
                progress=False, log=lines.append, command="test")
    assert "resuming arithmetic at step 5/16" in lines
    assert r.trained == ["arithmetic", "string_ops", "multitask"] and r.skipped == []
    for name in r.trained:
        assert (folder / name / "final" / "model.safetensors").is_file()
    summary = json.loads((folder / "prepare.json").read_text())
    assert summary["models"]["multitask"]["tasks"] == ["arithmetic", "string_ops"]
    for name in ("arithmetic", "string_ops"):
        m = summary["models"][name]
        assert m["steps"] == 16 and m["wall_seconds"] > 0
        assert m["command"] == (["test", "test"] if name == "arithmetic" else ["test"])  # both runs recorded
        assert set(m["validation_accuracy"]) == set(m["base_validation_accuracy"]) == {name}
    assert json.loads((folder / "base_validation.json").read_text()).keys() == {"arithmetic", "string_ops"}

    # the CLI finds everything finished and trains nothing
    res = CliRunner().invoke(app, ["prepare", "--suite", "llmmix", "--size", "tiny", "--cache", str(root),
                                   "--tasks", "arithmetic,string_ops", "--steps", "16", "--multitask-steps", "16",
                                   "--batch-size", "8", "--lr", "3e-3", "--eval-limit", "3", "--examples", EXAMPLES,
                                   "--no-progress", "--threads", "1", "--replay-batch", "0"])
    assert res.exit_code == 0, res.output
    assert "trained 0 model(s), 3 already there" in res.output

    # two trained experts merge with task arithmetic; the result loads and generates
    from mergelab import merge_state_dicts

    base_sd = _weights(root / "base-tiny" / "final")
    e1, e2 = (_weights(folder / n / "final") for n in ("arithmetic", "string_ops"))
    merged = merge_state_dicts(base_sd, [e1, e2], "task_arithmetic", params={"weight": 1.0, "lambda": 0.5})
    k = "model.layers.0.mlp.down_proj.weight"
    assert torch.allclose(merged[k], base_sd[k] + 0.5 * ((e1[k] - base_sd[k]) + (e2[k] - base_sd[k])), atol=1e-6)
    model, tok = load_causal_lm(folder / "arithmetic" / "final")
    model.load_state_dict(merged)
    assert len(greedy_generate(model, tok, ["What is 2 + 2?"], max_new_tokens=4)) == 1
    # the same merge from the expert folders with the CLI: a folder AutoModelForCausalLM loads, same tensors
    from mergelab.cli import app as main_app

    recipe = root / "ta.yaml"
    recipe.write_text(f"merge_method: task_arithmetic\nbase_model: {root / 'base-tiny' / 'final'}\nmodels:\n"
                      + "".join(f"  - model: {folder / n / 'final'}\n    parameters: {{weight: 1.0}}\n"
                                for n in ("arithmetic", "string_ops"))
                      + "parameters: {lambda: 0.5}\n")
    res = CliRunner().invoke(main_app, ["merge", str(recipe), "--out", str(root / "merged")])
    assert res.exit_code == 0, res.output
    out_model, _ = load_causal_lm(root / "merged")
    got = out_model.state_dict()
    assert all(torch.allclose(got[k], v, atol=1e-6) for k, v in merged.items())


def test_prepare_refuses_held_out_task(root):
    with pytest.raises(FinetuneError, match="held out"):
        prepare("tiny", root, _cfg(), tasks=["letter_count"], sizes=SIZES, progress=False, log=lambda s: None)
    res = CliRunner().invoke(app, ["prepare", "--suite", "llmmix", "--size", "tiny", "--cache", str(root),
                                   "--epochs", "2"])
    assert res.exit_code != 0 and "--epochs" in str(res.exception or res.output)


def test_prepare_other_settings_need_rebuild(root, tmp_path):
    base = root / "base-tiny" / "final"
    kw = dict(tasks=["string_ops"], sizes=SIZES, base_dir=base, progress=False, log=lambda s: None)
    prepare("tiny", tmp_path, _cfg(steps=6, eval_limit=1), **kw)
    with pytest.raises(FinetuneError, match="other settings"):
        prepare("tiny", tmp_path, _cfg(steps=8, eval_limit=1), **kw)
    r = prepare("tiny", tmp_path, _cfg(steps=8, eval_limit=1), rebuild=True, **kw)
    assert r.trained == ["string_ops"] and r.models["string_ops"]["steps"] == 8
    assert r.models["string_ops"]["command"] == [""]  # a fresh run: the earlier one's history is gone


def test_prepare_in_parallel_gives_the_same_models(root, tmp_path):
    base = root / "base-tiny" / "final"
    kw = dict(tasks=["string_ops", "list_ops"], sizes=SIZES, base_dir=base, multitask=False, progress=False)
    serial = prepare("tiny", tmp_path / "serial", _cfg(steps=4, eval_limit=1), log=lambda s: None, **kw)
    lines = []
    parallel = prepare("tiny", tmp_path / "parallel", _cfg(steps=4, eval_limit=1), jobs=2, log=lines.append, **kw)
    assert "training 2 models, 2 at a time (one thread each)" in lines
    assert parallel.trained == serial.trained == ["string_ops", "list_ops"]
    for name in serial.trained:
        a = _weights(tmp_path / "serial" / "experts-tiny" / name / "final")
        b = _weights(tmp_path / "parallel" / "experts-tiny" / name / "final")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
        assert parallel.models[name]["validation_accuracy"] == serial.models[name]["validation_accuracy"]
    with pytest.raises(FinetuneError, match="--jobs 0"):
        prepare("tiny", tmp_path / "x", _cfg(steps=6), jobs=0, log=lambda s: None, **kw)


def test_prepare_in_parallel_stops_on_a_failed_model(root, tmp_path):
    """A model that fails stops the run (no new model starts) with an error naming it and saying how to resume."""
    base = root / "base-tiny" / "final"
    (tmp_path / "experts-tiny").mkdir()
    (tmp_path / "experts-tiny" / "string_ops").write_text("a file where the run folder goes")  # its worker fails
    kw = dict(tasks=["string_ops", "list_ops", "arithmetic"], sizes=SIZES, base_dir=base, multitask=False,
              progress=False, log=lambda s: None)
    with pytest.raises(FinetuneError, match=r"string_ops: .*run the same command again to resume"):
        prepare("tiny", tmp_path, _cfg(steps=4, eval_limit=1), jobs=2, **kw)
    assert not (tmp_path / "experts-tiny" / "arithmetic").exists()  # the third model never started


def test_lora_expert_is_a_peft_adapter_mergelab_reads_exactly(root, tmp_path):
    """A LoRA run (lora_rank > 0) trains only PEFT adapters, writes final/ as a PEFT adapter folder that
    PeftModel loads, and mergelab's BASE+ADAPTER reading of it equals PEFT's merged weights; resuming
    gives the same adapter."""
    from peft import PeftModel

    from mergelab.io.adapted import open_model

    task = build_task("string_ops", seed=0, sizes=SIZES)
    base = root / "base-tiny" / "final"
    quiet = dict(progress=False, log=lambda s: None)
    cfg = _cfg(steps=8, eval_limit=2, lora_rank=4, lr=1e-2)
    r = finetune(base, [task], tmp_path / "l", cfg, **quiet)
    final = r.final_dir
    assert (final / "adapter_config.json").is_file() and not (final / "model.safetensors").exists()
    conf = json.loads((final / "adapter_config.json").read_text())
    assert conf["r"] == 4 and conf["lora_alpha"] == 8 and conf["base_model_name_or_path"] == str(base)
    adapter = load_file(str(final / "adapter_model.safetensors"))
    assert adapter and all("lora_A" in k or "lora_B" in k for k in adapter)
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)  # B starts at 0: it trained
    model, _ = load_causal_lm(base)
    dense = PeftModel.from_pretrained(model, str(final)).merge_and_unload().state_dict()
    ours = open_model(f"{base}+{final}")
    for name in ours.tensors:
        assert torch.allclose(ours.read(name), dense[name], atol=1e-6), name
    # the base was frozen: embeddings and norms equal the base's
    base_sd = _weights(base)
    assert torch.equal(ours.read("model.embed_tokens.weight"), base_sd["model.embed_tokens.weight"])
    part = finetune(base, [task], tmp_path / "m", cfg, stop_after=3, **quiet)
    assert part.step == 3
    rest = finetune(base, [task], tmp_path / "m", cfg, **quiet)
    again = load_file(str(rest.final_dir / "adapter_model.safetensors"))
    assert all(torch.equal(again[k], adapter[k]) for k in adapter)
