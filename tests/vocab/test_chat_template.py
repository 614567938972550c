"""``chat_template:`` in recipes (mergekit's setting; mergelab.vocab.chat) on the tiny trained Llama experts
that added task tokens: an inline template and ``auto`` (the most common template among the inputs) end up
as the merged tokenizer's template, with a built tokenizer (union) and with the donor's files copied; bad
values and an output without a tokenizer are refused before anything is written."""

from __future__ import annotations

import json
import shutil

import yaml

from tests.conftest import run_cli

T1 = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
T2 = "{% for m in messages %}[{{ m['role'] | upper }}] {{ m['content'] }}\n{% endfor %}"
CHAT = [{"role": "user", "content": "12 + 7"}, {"role": "assistant", "content": "19"}]


def _family(fam, tmp_path, templates, stripped=False):
    """Copies of base, calc and rev (``stripped``: the experts without their added tokens, so one vocabulary)
    with the given chat templates (None: none), written the three ways a folder can carry one."""
    out = {}
    for i, (name, t) in enumerate(zip(("base", "calc", "rev"), templates)):
        out[name] = tmp_path / f"in-{name}"
        shutil.copytree(fam[name + ("_stripped" if stripped and name != "base" else "")], out[name])
        if t is None:
            continue
        if i == 0:
            (out[name] / "chat_template.jinja").write_text(t)
        elif i == 1:
            cfg = json.loads((out[name] / "tokenizer_config.json").read_text())
            cfg["chat_template"] = [{"name": "default", "template": t + "\n"}]  # compared stripped
            (out[name] / "tokenizer_config.json").write_text(json.dumps(cfg))
        else:
            (out[name] / "chat_template.json").write_text(json.dumps({"chat_template": t}))
    return out


def _merge(tmp_path, fam, name, capsys, **extra):
    recipe = {"merge_method": "task_arithmetic", "base_model": str(fam["base"]), "dtype": "float32",
              "models": [{"model": str(fam[e]), "parameters": {"weight": 0.7}} for e in ("calc", "rev")], **extra}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return run_cli(["merge", path, "-o", tmp_path / name, "--quiet"], capsys)


def _rendered(folder):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    if tok.chat_template is None:
        return None, None
    return tok.chat_template, tok.apply_chat_template(CHAT, tokenize=False)


def test_inline_and_auto_templates_are_the_outputs(token_experts, tmp_path, capsys):
    fam = _family(token_experts, tmp_path, (T2, T1, T1))  # the donor (base) carries T2, both experts T1
    code, out, err = _merge(tmp_path, fam, "inline", capsys, tokenizer_source="union", chat_template=T1)
    assert code == 0, err
    template, text = _rendered(tmp_path / "inline")
    assert template == T1 and text == "<user>12 + 7\n<assistant>19\n"
    assert not (tmp_path / "inline" / "chat_template.json").exists()
    record = json.loads((tmp_path / "inline" / "mergelab.json").read_text())["chat_template"]
    assert record == {"setting": "inline", "source": "recipe", "written": True}
    # auto, donor files copied as they are (no tokenizer_source, one vocabulary): the template two inputs
    # carry replaces the donor's
    fam = _family(token_experts, tmp_path / "one-vocab", (T2, T1, T1), stripped=True)
    code, out, err = _merge(tmp_path, fam, "auto", capsys, chat_template="auto")
    assert code == 0, err
    template, text = _rendered(tmp_path / "auto")
    assert template == T1 and text == "<user>12 + 7\n<assistant>19\n"
    assert "chat_template" not in json.loads((tmp_path / "auto" / "tokenizer_config.json").read_text())
    # a tie (T2 once, T1 once; the base has none): the first in recipe order
    fam2 = _family(token_experts, tmp_path / "tie-in", (None, T2, T1))
    code, out, err = _merge(tmp_path, fam2, "tie", capsys, tokenizer_source="union", chat_template="auto")
    assert code == 0, err
    assert _rendered(tmp_path / "tie") == (T2, "[USER] 12 + 7\n[ASSISTANT] 19\n")
    # auto with no template anywhere: the output carries none
    fam3 = _family(token_experts, tmp_path / "none-in", (None, None, None), stripped=True)
    code, out, err = _merge(tmp_path, fam3, "none", capsys, chat_template="auto")
    assert code == 0, err
    assert _rendered(tmp_path / "none")[0] is None
    assert json.loads((tmp_path / "none" / "mergelab.json").read_text())["chat_template"]["written"] is False


def test_bad_chat_templates_write_nothing(token_experts, tmp_path, capsys):
    fam = {k: token_experts[k] for k in ("base", "calc", "rev")}
    for value, needle in (("chatml", "built-in template names"), ("hello", "neither 'auto' nor a Jinja template"),
                          ("{{ x }}", "neither 'auto' nor a Jinja template")):
        code, out, err = _merge(tmp_path, fam, "bad", capsys, chat_template=value)
        assert code == 2 and needle in " ".join(err.split()) and "Traceback" not in err, err
        assert not (tmp_path / "bad").exists()
    # an output without a tokenizer cannot carry a template
    bare = {}
    for k in ("base", "calc", "rev"):
        bare[k] = tmp_path / f"bare-{k}"
        bare[k].mkdir()
        for f in ("config.json", "model.safetensors"):
            shutil.copy2(token_experts[k + "_stripped" if k != "base" else k] / f, bare[k] / f)
    code, out, err = _merge(tmp_path, bare, "bad", capsys, chat_template=T1)
    assert code == 2 and "no tokenizer to carry it" in err, err
    assert not (tmp_path / "bad").exists()
