"""Bad input: a clear message naming the file/tensor/key, a non-zero exit, no output, inputs untouched."""

import hashlib
import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from tests.conftest import run_cli


def snapshot(folder: Path) -> dict:
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def recipe_file(tmp_path, base, experts, method="ties", **extra):
    data = {"merge_method": method, "base_model": str(base),
            "models": [{"model": str(e), "parameters": {"weight": 1.0, "density": 0.5}} for e in experts], **extra}
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def expect_failure(capsys, tmp_path, recipe, *fragments, extra_args=()):
    models = tmp_path / "models"
    before = snapshot(models) if models.exists() else {}
    out = tmp_path / "out"
    code, _, err = run_cli(["merge", recipe, "-o", out, "-q", *extra_args], capsys)
    assert code != 0
    flat = " ".join(err.split())
    for f in fragments:
        assert f in flat, (f, flat)
    assert not out.exists() and not (tmp_path / "out.partial").exists()
    if before:
        assert snapshot(models) == before
    return flat


def rewrite(folder: Path, fn):
    """Apply fn to the state dict of a single-file checkpoint folder."""
    f = folder / "model.safetensors"
    sd = fn(load_file(str(f)))
    save_file(sd, str(f), metadata={"format": "pt"})


def test_missing_path(tiny_family, tmp_path, capsys):
    base, experts = tiny_family
    r = recipe_file(tmp_path, base, [experts[0], tmp_path / "nowhere"])
    expect_failure(capsys, tmp_path, r, "nowhere", "does not exist")


def test_hub_id_is_refused_with_download_hint(tiny_family, tmp_path, capsys):
    base, experts = tiny_family
    r = recipe_file(tmp_path, base, [experts[0], "meta-llama/Llama-3.1-8B"])
    expect_failure(capsys, tmp_path, r, "meta-llama/Llama-3.1-8B", "never downloads")


def test_folder_without_weights(tiny_family, tmp_path, capsys):
    base, experts = tiny_family
    empty = tmp_path / "models" / "empty"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    r = recipe_file(tmp_path, base, [experts[0], empty])
    expect_failure(capsys, tmp_path, r, "no weights in folder", "empty", "model.safetensors")


def test_truncated_safetensors(tiny_family, tmp_path, capsys):
    base, experts = tiny_family
    f = experts[1] / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    r = recipe_file(tmp_path, base, experts)
    expect_failure(capsys, tmp_path, r, str(f), "truncated or corrupt")


def test_corrupt_safetensors_header(tiny_family, tmp_path, capsys):
    base, experts = tiny_family
    f = experts[1] / "model.safetensors"
    f.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    r = recipe_file(tmp_path, base, experts)
    expect_failure(capsys, tmp_path, r, str(f), "not a valid safetensors file")


def test_tensor_missing_from_one_model(tiny_family, tmp_path, capsys):
    base, experts = tiny_family
    rewrite(experts[2], lambda sd: {k: v for k, v in sd.items() if k != "model.layers.1.mlp.up_proj.weight"})
    r = recipe_file(tmp_path, base, experts)
    expect_failure(capsys, tmp_path, r, "model.layers.1.mlp.up_proj.weight", "missing from model", str(experts[2]))


def test_shape_mismatch(tiny_family, tmp_path, capsys):
    base, experts = tiny_family
    rewrite(experts[0], lambda sd: {**sd, "model.norm.weight": torch.ones(33)})
    r = recipe_file(tmp_path, base, experts)
    expect_failure(capsys, tmp_path, r, "model.norm.weight", "different shapes", "[33]", "[32]")


def test_vocab_mismatch_is_an_error_unless_a_policy_is_named(tiny_family, tmp_path, capsys):
    base, experts = tiny_family

    def grow(sd):
        sd["model.embed_tokens.weight"] = torch.cat([sd["model.embed_tokens.weight"], torch.randn(4, 32)])
        sd["lm_head.weight"] = torch.cat([sd["lm_head.weight"], torch.randn(4, 32)])
        return sd

    rewrite(experts[0], grow)
    r = recipe_file(tmp_path, base, experts)
    expect_failure(capsys, tmp_path, r, "different shapes", "[132, 32]", "vocab_policy: common_submatrix")
    r = recipe_file(tmp_path, base, experts, vocab_policy="common_submatrix")
    code, _, err = run_cli(["merge", r, "-o", tmp_path / "out", "-q"], capsys)
    assert code == 0, err
    merged = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert merged["model.embed_tokens.weight"].shape == (128, 32)
    manifest = json.loads((tmp_path / "out" / "mergelab.json").read_text())
    assert any("cropped" in n for n in manifest["notes"])


@pytest.mark.parametrize("method,value,weight", [
    ("task_arithmetic", float("nan"), 1.0),  # checked on the output, then the inputs are searched
    ("task_arithmetic", float("inf"), 0.0),  # a zero weight still carries inf (0 * inf is nan)
    ("ties", float("nan"), 1.0),  # checked on every input as it is read
])
def test_nan_in_input_is_reported_by_tensor_name(tiny_family, tmp_path, capsys, method, value, weight):
    base, experts = tiny_family

    def poison(sd):
        sd["model.layers.0.self_attn.v_proj.weight"][3, 4] = value
        return sd

    rewrite(experts[1], poison)
    r = recipe_file(tmp_path, base, experts, merge_method=method)
    data = yaml.safe_load(r.read_text())
    data["merge_method"] = method
    for i, m in enumerate(data["models"]):
        m["parameters"] = {"weight": weight if i == 1 else 1.0}
        if method == "ties":
            m["parameters"]["density"] = 0.5
    r.write_text(yaml.safe_dump(data))
    msg = expect_failure(capsys, tmp_path, r, "model.layers.0.self_attn.v_proj.weight", "NaN or inf", "--allow-nonfinite")
    assert str(experts[1]) in msg  # names the model that holds it
    code, _, err = run_cli(["merge", r, "-o", tmp_path / "out", "-q", "--allow-nonfinite"], capsys)
    assert code == 0, err


def test_non_float_tensors_are_copied_from_the_base(tiny_family, tmp_path, capsys):
    base, experts = tiny_family
    rewrite(base, lambda sd: {**sd, "model.position_ids": torch.arange(8)})
    for e in experts:
        rewrite(e, lambda sd: {**sd, "model.position_ids": torch.arange(8) * 7})
    r = recipe_file(tmp_path, base, experts)
    code, _, err = run_cli(["merge", r, "-o", tmp_path / "out", "-q"], capsys)
    assert code == 0, err
    merged = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert torch.equal(merged["model.position_ids"], torch.arange(8))


def test_unwritable_output(tiny_family, tmp_path, capsys):
    base, experts = tiny_family
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    r = recipe_file(tmp_path, base, experts)
    code, _, err = run_cli(["merge", r, "-o", blocker / "out", "-q"], capsys)
    assert code != 0
    assert "cannot write output folder" in " ".join(err.split()) or "cannot create output folder" in err
    assert blocker.read_text() == "x"


def test_output_inside_an_input_is_refused(tiny_family, tmp_path, capsys):
    base, experts = tiny_family
    r = recipe_file(tmp_path, base, experts)
    code, _, err = run_cli(["merge", r, "-o", base / "merged", "-q"], capsys)
    assert code != 0 and "overlaps input" in err
    assert not (base / "merged").exists()


def test_bad_parameter_fails_before_reading_tensors(tiny_family, tmp_path, capsys):
    base, experts = tiny_family
    # Corrupt data bytes (header intact): a validation error must come first, naming the parameter.
    r = recipe_file(tmp_path, base, experts)
    data = yaml.safe_load(r.read_text())
    data["models"][0]["parameters"]["density"] = 7
    r.write_text(yaml.safe_dump(data))
    expect_failure(capsys, tmp_path, r, "'density' = 7", "expected a number >= 0 and <= 1")


def test_malicious_pickle_is_refused(tiny_family, tmp_path, capsys):
    base, experts = tiny_family
    evil = tmp_path / "models" / "evil"
    evil.mkdir()

    class Boom:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"model.norm.weight": Boom()}, evil / "pytorch_model.bin")
    r = recipe_file(tmp_path, base, [experts[0], evil])
    expect_failure(capsys, tmp_path, r, "pytorch_model.bin", "weights_only=True")


def test_unknown_option_is_a_usage_error_with_status_2(capsys):
    code, _, err = run_cli(["merge", "--no-such-flag"], capsys)
    assert code == 2 and "No such option: --no-such-flag" in err


def test_the_program_exits_with_the_commands_status(tmp_path):
    """``mergelab`` as a program ends with os._exit after flushing: the status and the output must survive."""
    import subprocess
    import sys

    ok = subprocess.run([sys.executable, "-m", "mergelab.cli", "methods", "--json"], capture_output=True, text=True)
    assert ok.returncode == 0 and '"task_arithmetic"' in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "mergelab.cli", "merge", str(tmp_path / "missing.yml"), "-o",
                          str(tmp_path / "out")], capture_output=True, text=True)
    assert bad.returncode == 2 and "missing.yml" in bad.stderr


def write_yaml(path, data):
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("method,global_params,model_params,stray_global,stray_model", [
    # a density left on a linear merge after trying TIES, and TIES' lambda
    ("linear", {}, {"weight": 1.0}, {"lambda": 0.7}, {"density": 0.5}),
    # weight on slerp's model (mergekit's slerp reads only t)
    ("slerp", {"t": 0.3}, {}, {}, {"weight": 0.3}),
])
def test_another_methods_parameter_is_ignored_with_one_warning_line_each(
        tiny_family, tmp_path, capsys, method, global_params, model_params, stray_global, stray_model):
    base, experts = tiny_family
    models = experts[:1] if method == "slerp" else experts

    def recipe(name, stray):
        return write_yaml(tmp_path / name, {
            "merge_method": method, "dtype": "float32", **({"base_model": str(base)} if method == "slerp" else {}),
            "parameters": {**global_params, **(stray_global if stray else {})},
            "models": [{"model": str(e), "parameters": {**model_params, **(stray_model if stray else {})}}
                       for e in models]})

    code, _, err = run_cli(["merge", recipe("clean.yaml", False), "-o", tmp_path / "clean", "-q"], capsys)
    assert code == 0 and "warning" not in err, err
    code, _, err = run_cli(["merge", recipe("stray.yaml", True), "-o", tmp_path / "stray", "-q"], capsys)
    assert code == 0, err
    lines = [ln for ln in err.splitlines() if ln.startswith("warning:")]
    stray = list(stray_global) + list(stray_model)
    assert len(lines) == len(stray), err  # one line per parameter, however many models carry it
    for name, line in zip(stray, lines):
        assert f"parameter '{name}'" in line and f"not used by method '{method}'" in line and "ignored" in line
    assert "Traceback" not in err
    assert (tmp_path / "clean" / "model.safetensors").read_bytes() == (tmp_path / "stray" / "model.safetensors").read_bytes()
    manifest = json.loads((tmp_path / "stray" / "mergelab.json").read_text())
    assert [w.split("'")[1] for w in manifest["warnings"]] == stray

    flat = expect_failure(capsys, tmp_path, recipe("stray.yaml", True), *[f"parameter '{n}'" for n in stray],
                          f"not used by method '{method}'", "--strict", extra_args=["--strict"])
    assert "Traceback" not in flat


def test_a_parameter_no_method_defines_stays_an_error_with_did_you_mean(tiny_family, tmp_path, capsys):
    base, experts = tiny_family
    r = write_yaml(tmp_path / "r.yaml", {"merge_method": "task_arithmetic", "base_model": str(base),
                                         "models": [{"model": str(e), "parameters": {"weight": 1.0, "wieght": 1}}
                                                    for e in experts]})
    expect_failure(capsys, tmp_path, r, "unknown parameter 'wieght' for method 'task_arithmetic'",
                   "did you mean 'weight'")


def edit_config(folder: Path, **changes):
    f = folder / "config.json"
    cfg = json.loads(f.read_text())
    cfg.update(changes)
    f.write_text(json.dumps(cfg))


@pytest.mark.parametrize("which", ["base", "expert"])
@pytest.mark.parametrize("text,fragment", [("{\"model_type\": \"llama\",", "is not valid JSON"),
                                           ("[1, 2]", "is not a JSON object")])
def test_malformed_config_of_any_input_is_named(tiny_family, tmp_path, capsys, which, text, fragment):
    base, experts = tiny_family
    folder = base if which == "base" else experts[2]
    (folder / "config.json").write_text(text)
    expect_failure(capsys, tmp_path, recipe_file(tmp_path, base, experts), str(folder / "config.json"), fragment)


def test_missing_config_of_an_input_is_named(tiny_family, tmp_path, capsys):
    base, experts = tiny_family
    (experts[1] / "config.json").unlink()
    expect_failure(capsys, tmp_path, recipe_file(tmp_path, base, experts), f"model '{experts[1]}' has no config.json",
                   str(experts[1] / "config.json"), "does not exist")


def test_bare_weight_files_without_any_config_still_merge(tiny_family, tmp_path, capsys):
    base, experts = tiny_family
    for folder in [base, *experts]:
        (folder / "config.json").unlink()
    code, _, err = run_cli(["merge", recipe_file(tmp_path, base, experts), "-o", tmp_path / "out"], capsys)
    assert code == 0, err
    assert not (tmp_path / "out" / "config.json").exists()
    assert any("no input has a config.json" in n for n in json.loads((tmp_path / "out" / "mergelab.json").read_text())["notes"])


# One case per field of plan.MEANING_FIELDS the tiny Llama's config has (and two it lacks), with the
# expert's value; the base (the donor) keeps the generated config.
@pytest.mark.parametrize("field,value", [
    ("architectures", ["MistralForCausalLM"]), ("model_type", "mistral"), ("rope_theta", 500000.0),
    ("tie_word_embeddings", True), ("vocab_size", 130), ("hidden_act", "gelu"), ("rms_norm_eps", 1e-6),
    ("num_attention_heads", 8), ("num_key_value_heads", 4), ("head_dim", 4),
    ("rope_scaling", {"type": "linear", "factor": 2.0}),
])
def test_config_field_that_changes_what_weights_mean_warns_and_strict_refuses(tiny_family, tmp_path, capsys,
                                                                              field, value):
    base, experts = tiny_family
    base_cfg = json.loads((base / "config.json").read_text())
    if field in ("head_dim", "rope_scaling"):  # not in the generated config: set in both, differently
        edit_config(base, **{field: 8 if field == "head_dim" else None})
        base_cfg[field] = 8 if field == "head_dim" else None
    edit_config(experts[1], **{field: value})
    r = recipe_file(tmp_path, base, experts)
    code, _, err = run_cli(["merge", r, "--dry-run"], capsys)
    assert code == 0, err
    lines = [ln for ln in err.splitlines() if ln.startswith("warning:")]
    assert len(lines) == 1, err
    flat = lines[0]
    assert f"model '{experts[1]}'" in flat and f"'{base}'" in flat
    assert f"{field}: {json.dumps(value, sort_keys=True)} (in '{base}': {json.dumps(base_cfg[field], sort_keys=True)})" in flat
    expect_failure(capsys, tmp_path, r, "--strict", f"model '{experts[1]}'", field, extra_args=["--strict"])


def test_config_differences_are_recorded_and_harmless_fields_pass(tiny_family, tmp_path, capsys):
    base, experts = tiny_family
    edit_config(experts[0], rope_theta=1e6, vocab_size=130)
    edit_config(experts[2], max_position_embeddings=4096, torch_dtype="bfloat16", eos_token_id=7)  # not checked
    code, _, err = run_cli(["merge", recipe_file(tmp_path, base, experts), "-o", tmp_path / "out", "-q"], capsys)
    assert code == 0, err
    assert len([ln for ln in err.splitlines() if ln.startswith("warning:")]) == 1, err
    manifest = json.loads((tmp_path / "out" / "mergelab.json").read_text())
    assert manifest["config_differences"] == [
        {"model": str(experts[0]), "field": "vocab_size", "value": 130, "reference": str(base), "reference_value": 128},
        {"model": str(experts[0]), "field": "rope_theta", "value": 1e6, "reference": str(base),
         "reference_value": 10000.0},
    ]
    assert len(manifest["warnings"]) == 1 and "rope_theta" in manifest["warnings"][0]
    # the output config is the donor's (the base's)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["rope_theta"] == 10000.0


def test_text_config_is_compared_and_common_submatrix_expects_other_vocabularies(tiny_family, tmp_path, capsys):
    base, experts = tiny_family
    edit_config(base, text_config={"rope_theta": 10000.0, "vocab_size": 128})
    edit_config(experts[0], text_config={"rope_theta": 5e5, "vocab_size": 130}, vocab_size=130)
    code, _, err = run_cli(["merge", recipe_file(tmp_path, base, experts), "--dry-run"], capsys)
    assert code == 0, err
    warning = " ".join(err.split())
    assert "vocab_size: 130 (in" in warning and "text_config.rope_theta: 500000.0 (in" in warning
    assert "text_config.vocab_size: 130" in warning
    code, _, err = run_cli(["merge", recipe_file(tmp_path, base, experts, vocab_policy="common_submatrix"),
                            "--dry-run"], capsys)
    warning = " ".join(err.split())
    assert code == 0 and "text_config.rope_theta" in warning and "vocab_size" not in warning, err


@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_overflow_of_the_cast_to_float16_is_caught_like_any_nonfinite_value(tiny_family, tmp_path, capsys, method):
    """float32 merged values beyond 65504 become inf in float16: an error naming tensor, count and range."""
    base, experts = tiny_family

    def big(sd):
        sd["model.norm.weight"] = torch.full((32,), 1e5)  # out of float16's range in every input
        sd["model.layers.0.input_layernorm.weight"] = torch.full((32,), 6e4)  # in range; its float16 sum is not
        return sd

    for folder in [base, *experts]:
        rewrite(folder, big)
    r = recipe_file(tmp_path, base, experts, method=method, out_dtype="float16")
    flat = expect_failure(capsys, tmp_path, r, "tensor 'model.norm.weight'", "32 inf value(s)", "(32 of 32)",
                          "float16", "±65504", "reach 100000", "--allow-nonfinite")
    assert "Traceback" not in flat
    code, _, err = run_cli(["merge", r, "-o", tmp_path / "out", "-q", "--allow-nonfinite"], capsys)
    assert code == 0, err
    merged = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert merged["model.norm.weight"].dtype == torch.float16
    assert torch.isinf(merged["model.norm.weight"]).sum() == 32
    assert torch.equal(merged["model.layers.0.input_layernorm.weight"], torch.full((32,), 6e4).half())
    # bfloat16 has float32's range: the same merge fits
    r = recipe_file(tmp_path, base, experts, method=method, out_dtype="bfloat16")
    code, _, err = run_cli(["merge", r, "-o", tmp_path / "bf16", "-q"], capsys)
    assert code == 0, err
    assert torch.equal(load_file(str(tmp_path / "bf16" / "model.safetensors"))["model.norm.weight"],
                       torch.full((32,), 1e5).bfloat16())
