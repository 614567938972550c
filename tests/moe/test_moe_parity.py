"""``mergelab moe`` against ``mergekit-moe`` 0.1.5 on the same configs: every tensor equal bit for bit.

Cases: Llama experts -> Mixtral with ``hidden`` (bfloat16 forward, negative prompts), ``hidden_avg``,
``cheap_embed`` and seeded ``random`` / ``uniform_random`` gates; Qwen3 experts (explicit ``head_dim``,
q/k norms) -> Qwen3-MoE with ``hidden`` and ``cheap_embed`` gates; Qwen2 experts (q/k/v biases, tied embeddings) -> Qwen2-MoE with a shared expert
and ``residual_scale``; Llama experts -> Qwen2-MoE (``architecture: qwen``, zero q/k/v biases). mergekit
writes Qwen2-MoE experts per expert (``mlp.experts.{e}.gate_proj.weight``), which transformers packs on
load; the test packs them the same way (gate rows first) before comparing. mergekit-moe 0.1.5 cannot
read a shared expert that is neither the base nor a routed expert (its loaders skip shared experts:
``'NoneType' object has no attribute 'get_tensor'``), so the shared expert here is the base.
"""

from __future__ import annotations

import json
import textwrap

import pytest
import torch

from mergelab.moe.build import pack_per_expert
from tests.conftest import run_cli
from tests.moe.test_moe import ARITH, ROPE, STRINGS, tensors, write
from tests.moe.tiny import make_family
from tests.parity.mergekit_runner import MERGEKIT_PYTHON, run_script

pytestmark = [
    pytest.mark.mergekit,
    pytest.mark.skipif(not MERGEKIT_PYTHON, reason="set MERGEKIT_PYTHON to a python with mergekit 0.1.5"),
]

SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    from mergekit.scripts.moe import main
    spec = json.load(open(sys.argv[1]))
    for config, out, extra in spec:
        main.main(args=[config, out, "--quiet"] + extra, standalone_mode=False)
    """
)


def cases(llama, qwen, qwen3):
    llama_experts = [{"source_model": str(llama[1]), "positive_prompts": ARITH, "negative_prompts": ["hi"]},
                     {"source_model": str(llama[2]), "positive_prompts": STRINGS}]
    qwen_experts = [{"source_model": str(qwen[1]), "positive_prompts": ARITH},
                    {"source_model": str(qwen[2]), "positive_prompts": STRINGS, "negative_prompts": ["hi there"]},
                    {"source_model": str(qwen[3]), "positive_prompts": ["print(len('abc'))"]}]
    shared_q = [{"source_model": str(qwen[0]), "positive_prompts": ["anything"], "residual_scale": 0.25}]
    shared_l = [{"source_model": str(llama[0]), "positive_prompts": ["anything"]}]
    return {
        "llama_hidden": ({"base_model": str(llama[0]), "gate_mode": "hidden", "dtype": "float32",
                          "experts": llama_experts}, []),
        "llama_hidden_bf16": ({"base_model": str(llama[0]), "gate_mode": "hidden", "dtype": "bfloat16",
                               "experts_per_token": 1, "experts": llama_experts}, []),
        "llama_cheap_embed": ({"base_model": str(llama[0]), "gate_mode": "cheap_embed", "experts": llama_experts},
                              []),
        "llama_random": ({"base_model": str(llama[0]), "gate_mode": "random", "seed": 7,
                          "experts": llama_experts}, ["--random-seed", "7"]),
        "llama_uniform_random": ({"base_model": str(llama[0]), "gate_mode": "uniform_random", "seed": 3,
                                  "experts": llama_experts}, ["--random-seed", "3"]),
        "llama_hidden_avg": ({"base_model": str(llama[0]), "gate_mode": "hidden_avg", "experts": llama_experts},
                             []),
        "qwen3_hidden": ({"base_model": str(qwen3[0]), "gate_mode": "hidden", "dtype": "bfloat16",
                          "experts": [dict(e, source_model=str(qwen3[i + 1])) for i, e in enumerate(llama_experts)]},
                         []),
        "qwen3_cheap_embed": ({"base_model": str(qwen3[0]), "gate_mode": "cheap_embed", "experts_per_token": 1,
                               "experts": [dict(e, source_model=str(qwen3[i + 1]))
                                           for i, e in enumerate(llama_experts)]}, []),
        "qwen_hidden": ({"base_model": str(qwen[0]), "gate_mode": "hidden", "experts_per_token": 2,
                         "experts": qwen_experts, "shared_experts": shared_q}, []),
        "qwen_cheap_embed": ({"base_model": str(qwen[0]), "gate_mode": "cheap_embed", "dtype": "bfloat16",
                              "experts": qwen_experts, "shared_experts": shared_q}, []),
        "llama_to_qwen": ({"base_model": str(llama[0]), "gate_mode": "hidden", "architecture": "qwen",
                           "experts": llama_experts, "shared_experts": shared_l}, []),
    }


KEYS = ("architectures", "model_type", "num_local_experts", "num_experts", "num_experts_per_tok", "hidden_size",
        "intermediate_size", "moe_intermediate_size", "shared_expert_intermediate_size", "norm_topk_prob",
        "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "rope_parameters", "rms_norm_eps",
        "tie_word_embeddings", "vocab_size", "qkv_bias", "decoder_sparse_step", "dtype", "sliding_window")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("moeparity")
    llama = make_family(root / "llama", "llama", experts=2, tie=True, rope=ROPE)
    qwen = make_family(root / "qwen", "qwen2", experts=3, tie=True, seed=3)
    qwen3 = make_family(root / "qwen3", "qwen3", experts=2, seed=4)
    spec, made = [], {}
    for name, (cfg, extra) in cases(llama, qwen, qwen3).items():
        path = write(root / f"{name}.yml", cfg)
        mk_cfg = {k: v for k, v in cfg.items() if k != "seed"}  # mergekit has no seed key (--random-seed)
        spec.append([str(write(root / f"{name}.mk.yml", mk_cfg)), str(root / "mk" / name), extra])
        code, _, err = run_cli(["moe", path, "-o", root / "ml" / name, "-q", "--no-routing-report"])
        assert code == 0, err
        made[name] = (root / "ml" / name, root / "mk" / name)
    run_script(SCRIPT, spec, root, threads=torch.get_num_threads())
    return made


@pytest.mark.parametrize("case", ["llama_hidden", "llama_hidden_bf16", "llama_cheap_embed", "llama_random",
                                  "llama_uniform_random", "llama_hidden_avg", "qwen_hidden", "qwen_cheap_embed",
                                  "llama_to_qwen", "qwen3_hidden", "qwen3_cheap_embed"])
def test_tensors_and_config_equal_mergekit_moe(runs, case):
    ours, theirs = runs[case]
    a, b = tensors(ours), pack_per_expert(tensors(theirs))
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k
    ca, cb = (json.loads((p / "config.json").read_text()) for p in (ours, theirs))
    for k in KEYS:
        assert ca.get(k) == cb.get(k), (k, ca.get(k), cb.get(k))
    assert (ours / "mergekit_moe_config.yml").is_file()
