"""EMR-Merging, Twin-Merging and WEMoE on really trained tiny Llamas (tied embeddings, RMSNorm deltas),
and greedy generation routed on the prompt: each checked against a plain ``LlamaForCausalLM`` holding
weights assembled here from the experts' state dicts."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoTokenizer, GenerationConfig, LlamaForCausalLM

import mergelab.routed as routed
from mergelab.llmmix.tasks import build_task
from mergelab.llmmix.tasks.format import encode_prompt
from mergelab.routed.emr import emr_merge, save_emr
from mergelab.routed.twin import TwinConfig, build_twin
from mergelab.routed.wemoe import WEMoEConfig, next_token_logits, save_wemoe, train_routers, upscale
from tests.routed.test_emr import oracle as emr_oracle

TASKS = ("arithmetic", "string_ops")
MLP = (".mlp.gate_proj.", ".mlp.up_proj.", ".mlp.down_proj.")


@pytest.fixture(scope="module")
def llamas(trained_llamas):
    base_dir, expert_dirs = trained_llamas
    config = AutoConfig.from_pretrained(str(base_dir))
    tok = AutoTokenizer.from_pretrained(str(base_dir))
    base = load_file(str(base_dir / "model.safetensors"))
    experts = [load_file(str(e / "model.safetensors")) for e in expert_dirs]
    assert config.tie_word_embeddings and "lm_head.weight" not in base  # tied, stored once
    norms = [k for k in base if k.endswith("norm.weight")]
    assert norms and any(not torch.equal(base[k], e[k]) for e in experts for k in norms)  # RMSNorm deltas exist
    prompts = [ex.prompt for t in TASKS for ex in build_task(t, seed=0, sizes={"train": 8, "validation": 4,
                                                                                  "test": 4}).split("validation")]
    return config, tok, base, experts, prompts


def left_padded(tok, prompts):
    enc = [encode_prompt(tok, p) for p in prompts]
    width = max(map(len, enc))
    ids = torch.full((len(enc), width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(enc), width), dtype=torch.long)
    for i, e in enumerate(enc):
        ids[i, width - len(e):] = torch.tensor(e)
        mask[i, width - len(e):] = 1
    return {"input_ids": ids, "attention_mask": mask}


def plain(config, state):
    m = LlamaForCausalLM(config).float().eval()
    m.load_state_dict(state, strict=False)
    m.tie_weights()
    return m


def greedy(model, batch, n=6):
    cfg = GenerationConfig(max_new_tokens=n, do_sample=False, num_beams=1, pad_token_id=0, eos_token_id=[])
    with torch.no_grad():
        return model.generate(**batch, generation_config=cfg)


def ta(base, experts, lam=0.3):
    return {k: base[k] + lam * sum(e[k] - base[k] for e in experts) for k in base}


def test_emr_generates_each_task_with_the_papers_weights(llamas, tmp_path):
    config, tok, base, experts, prompts = llamas
    res = emr_merge(base, experts, list(TASKS))
    out = save_emr(tmp_path / "emr", res, base, config, list(TASKS), model_class="AutoModelForCausalLM")
    m = routed.load(out)
    uni, masks, lam = emr_oracle(base, experts)
    batch = left_padded(tok, prompts[:3])
    for k, t in enumerate(TASKS):
        want = {key: (base[key].double() + lam["tensor_mean"][k] * torch.from_numpy(uni[key] * masks[k][key])).float()
                for key in uni}
        ref = plain(config, want)
        torch.testing.assert_close(m(task=t, **batch).logits, ref(**batch).logits, atol=1e-4, rtol=1e-4)
        assert torch.equal(greedy(m.causal_lm(t), batch), greedy(ref, batch))
    # the module is back at theta_0 after generating
    assert all(torch.equal(m.module.state_dict()[k], base[k].float()) for k in base)


def test_twin_routes_rmsnorm_and_tied_embeddings_and_keeps_the_prompts_route(llamas, tmp_path):
    config, tok, base, experts, prompts = llamas
    data = [[left_padded(tok, prompts[:4])], [left_padded(tok, prompts[4:])]]
    cfg = TwinConfig(density=1.0, router_hidden=16, router_epochs=5, router_lr=1e-2)
    m = routed.load(build_twin(tmp_path / "twin", base, experts, list(TASKS), config, data, cfg,
                               model_class="AutoModelForCausalLM"))
    shared = ta(base, experts)
    batch = left_padded(tok, prompts[2:6])
    for k in range(len(TASKS)):  # one-hot at full rank: expert k, norms and the tied output layer included
        w = torch.nn.functional.one_hot(torch.full((4,), k), len(TASKS)).float()
        with torch.no_grad():
            got = m(weights=w, **batch).logits
        torch.testing.assert_close(got, plain(config, experts[k])(**batch).logits, atol=2e-4, rtol=1e-4)
    # generation: routed once on the prompt, the route kept for the generated tokens
    for i in range(len(prompts)):
        one = left_padded(tok, prompts[i:i + 1])
        got = greedy(m.causal_lm(), one)
        w = m.last_route[0]
        assert not torch.allclose(w, torch.full_like(w, 0.5), atol=1e-3)  # a real mix, not uniform
        want = {key: shared[key] + sum(w[k] * (experts[k][key] - shared[key]) for k in range(len(TASKS)))
                for key in base}
        assert torch.equal(got, greedy(plain(config, want), one)), i


def test_wemoe_on_llama_routes_on_the_prompt_and_trains_on_next_token_entropy(llamas, tmp_path):
    config, tok, base, experts, prompts = llamas
    torch.manual_seed(0)
    m = upscale(base, experts, list(TASKS), config, WEMoEConfig(), model_class="AutoModelForCausalLM")
    with torch.no_grad():  # gates far from their near-constant start, so routes differ per prompt
        for g in m.gates:
            for p in g.parameters():
                p.normal_(0, 0.3)
    shared = ta(base, experts)
    layers = config.num_hidden_layers
    for i in (0, 5):
        one = left_padded(tok, prompts[i:i + 1])
        got = greedy(m.causal_lm(), one)
        ws = m.routing(**one)  # per layer, from the prompt
        assert len(ws) == layers and not torch.allclose(ws[0], ws[1])
        want = dict(shared)
        for key in base:
            if any(s in key for s in MLP):
                layer = int(key.split(".")[2])
                want[key] = base[key] + sum(ws[layer][0, k] * (experts[k][key] - base[key]) for k in range(len(TASKS)))
        assert torch.equal(got, greedy(plain(config, want), one)), i
    data = [[left_padded(tok, prompts[:4])], [left_padded(tok, prompts[4:])]]
    hist = train_routers(m, None, data, WEMoEConfig(steps=4, lr=1e-2), logits=next_token_logits)
    assert hist[-1] < hist[0]
    loaded = routed.load(save_wemoe(tmp_path / "wemoe", m))
    one = left_padded(tok, prompts[:2])
    assert torch.equal(greedy(loaded.causal_lm(), one), greedy(m.causal_lm(), one))


SIZES = {"train": 24, "validation": 2, "test": 8}  # the trained_llamas fixture's


def prepared_root(trained_llamas, tmp_path):
    """The trained tiny experts laid out as `bench prepare --suite llmmix --size tiny` does."""
    import json

    base_dir, expert_dirs = trained_llamas
    root = tmp_path / "cache"
    folder = root / "experts-tiny"
    folder.mkdir(parents=True)
    for t, e in zip(TASKS, expert_dirs):
        (folder / t).symlink_to(e.parent)
    (folder / "prepare.json").write_text(json.dumps({"base": str(base_dir), "tasks": list(TASKS)}))
    return root


def test_routed_bench_on_llmmix_experts(trained_llamas, tmp_path):
    """The llmmix routed bench end to end on the trained tiny experts laid out as `bench prepare` does."""
    from mergelab.llmmix.generate import evaluate_task
    from mergelab.llmmix.run import _bits
    from mergelab.routed.bench import RoutedSettings, run_routed_llmmix

    base_dir, expert_dirs = trained_llamas
    root = prepared_root(trained_llamas, tmp_path)
    sizes = SIZES
    settings = RoutedSettings(twin_epochs=2, twin_density=1.0, wemoe_steps=1, wemoe_examples=2, wemoe_batch=2)
    out = tmp_path / "out"
    rep = run_routed_llmmix(["emr", "twin", "wemoe"], out, "tiny", root, eval_limit=6, settings=settings,
                            log=lambda s: None, sizes=sizes)
    rows = {r.get("method", r["name"]): r for r in rep["rows"]}
    assert rep["complete"] and rep["test_sizes"] == {t: 6 for t in TASKS}
    for key in ("emr", "twin", "wemoe"):
        r = rows[key]
        assert r["status"] == "ok", r
        assert set(r["correct"]) == set(TASKS) and all(len(b) == 6 for b in r["correct"].values())
        assert r["sizes"]["extra_bytes"] > 0
    # EMR's bits are the per-task models' own greedy exact matches
    m = routed.load(out / "models" / "emr")
    tok = AutoTokenizer.from_pretrained(str(base_dir))
    for t in TASKS:
        task = build_task(t, seed=0, sizes=sizes)
        assert rows["emr"]["correct"][t] == _bits(evaluate_task(m.causal_lm(t), tok, task, "test", limit=6).records)
    # the experts' reference bits are on the same six examples
    ind = rows["individual"]["correct"]
    for t, e in zip(TASKS, expert_dirs):
        ref = LlamaForCausalLM.from_pretrained(str(e)).eval()
        assert ind[t] == _bits(evaluate_task(ref, tok, build_task(t, seed=0, sizes=sizes), "test", limit=6).records)


def test_twin_rank_sweep_rows_bytes_and_chart(trained_llamas, llamas, tmp_path, monkeypatch):
    """`--twin-ranks`: one Twin row per rank, one router for all (trained once), the exclusive bytes of each
    rank as counted here from the experts' shapes (r (m + n + 1) floats per changed matrix and task, 1-D
    deltas dense), the exact experts' deltas at full rank, and the rank table and chart."""
    import mergelab.routed.twin as twin
    from mergelab.routed.bench import RoutedSettings, run_routed_llmmix

    trainings = []
    train = twin.train_router
    monkeypatch.setattr(twin, "train_router", lambda *a, **k: trainings.append(1) or train(*a, **k))
    config, _, base, experts, _ = llamas
    full = max(min(v.shape) for v in base.values() if v.dim() == 2)
    settings = RoutedSettings(twin_epochs=2, twin_ranks=(1, full))
    out = tmp_path / "out"
    rep = run_routed_llmmix(["twin"], out, "tiny", prepared_root(trained_llamas, tmp_path), eval_limit=2,
                            settings=settings, references=False, log=lambda s: None, sizes=SIZES)
    rows = [r for r in rep["rows"] if r.get("method") == "twin"]
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert [r["name"] for r in rows] == ["Twin-Merging (rank 1)", f"Twin-Merging (rank {full})"]
    assert [r["params"]["rank"] for r in rows] == [1, full]
    changed = [k for k in base if any(not torch.equal(e[k], base[k]) for e in experts)]  # the rest: no exclusive part
    assert changed and any(base[k].dim() == 2 for k in changed)
    for r, rank in zip(rows, (1, full)):
        floats = sum(min(rank, *base[k].shape) * (sum(base[k].shape) + 1) if base[k].dim() == 2
                     else base[k].numel() for k in changed)
        assert r["sizes"]["exclusive_bytes"] == 4 * len(TASKS) * floats
        assert (out / "models" / f"twin-r{rank}" / "routed.json").is_file()
    assert rows[0]["exclusive_relative_error"] > 0.05 and rows[1]["exclusive_relative_error"] < 1e-5
    assert rows[0]["router_accuracy"] == rows[1]["router_accuracy"]  # one seeded router
    assert len(trainings) == 1 and all(r["router_trained_once_for_sweep"] for r in rows)
    assert all(r["merge_seconds"] >= r["router_seconds"] > 0 for r in rows)
    assert rows[0]["sizes"]["extra_bytes"] < rows[1]["sizes"]["extra_bytes"]
    md = (out / "twin_ranks.md").read_text().splitlines()
    assert md[0].startswith("| rank | mean acc | norm. acc") and [x.split(" | ")[0] for x in md[2:]] == ["| 1",
                                                                                                    f"| {full}"]
    assert (out / "twin_ranks.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a second sweep into the same folder is refused before any work
    from mergelab.errors import MergeLabError

    with pytest.raises(MergeLabError, match="twin-r1"):
        run_routed_llmmix(["twin"], out, "tiny", prepared_root(trained_llamas, tmp_path / "again"), eval_limit=2,
                          settings=settings, references=False, log=lambda s: None, sizes=SIZES)


def test_routed_llmmix_bench_sees_every_prepared_expert_not_only_the_last_prepare_runs(tmp_path):
    """prepare.json's ``tasks`` holds only the last `bench prepare` run's tasks; an expert recorded by an
    earlier run must still count as prepared (the task list of `bench run`, llmmix.run.prepared_tasks)."""
    import json

    from mergelab.errors import MergeLabError
    from mergelab.routed.bench import run_routed_llmmix

    folder = tmp_path / "experts-tiny"
    folder.mkdir()
    (folder / "prepare.json").write_text(json.dumps({
        "base": str(tmp_path / "base"), "tasks": ["arithmetic"],
        "models": {"string_ops": {"tasks": ["string_ops"]}, "arithmetic": {"tasks": ["arithmetic"]},
                   "letter_count": {"tasks": ["letter_count"]}}}))
    # string_ops (and a folder named after a held-out task) were recorded by earlier runs: accepted as
    # prepared, so the next check (no held-out task may be merged) is the one that stops the run
    with pytest.raises(MergeLabError, match="letter_count held out"):
        run_routed_llmmix(["emr"], tmp_path / "out", "tiny", tmp_path, merge_tasks=["string_ops", "letter_count"])
    with pytest.raises(MergeLabError, match="no prepared expert for list_ops.*prepared: string_ops, arithmetic, letter_count"):
        run_routed_llmmix(["emr"], tmp_path / "out", "tiny", tmp_path, merge_tasks=["list_ops", "arithmetic"])
