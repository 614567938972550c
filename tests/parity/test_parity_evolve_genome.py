"""mergekit-evolve's genome: the same ``genome:`` block and genotype decoded by mergekit 0.1.5's
``ModelGenome.genotype_merge_config`` and by :mod:`mergelab.search.genome` give the same merge, compared
per (model, layer range, parameter, filter): values, slices, slerp's pair and t, base and normalize.

Differences by design, left out of the comparison: mergekit always writes ``dtype: bfloat16`` and
``int8_mask: true`` (mergelab writes the genome's ``dtype``; ``int8_mask`` only changes mergekit's mask
storage); with one layer group mergekit writes one slice over all layers, mergelab the equivalent
``models:`` list; mergelab also names the base on every slice.
"""

import json
import textwrap

import numpy as np
import pytest
import yaml

from mergelab.methods.registry import get_method
from mergelab.search.genome import parse_genome
from tests.parity.mergekit_runner import NEEDS_MERGEKIT, run_script

pytestmark = NEEDS_MERGEKIT

LAYERS = 4

SCRIPT = textwrap.dedent(
    """
    import json, sys
    from importlib.metadata import version
    import numpy as np
    import yaml
    from mergekit.evo.genome import ModelGenome, ModelGenomeDefinition

    assert version("mergekit") == "0.1.5", version("mergekit")
    spec = json.load(open(sys.argv[1]))
    out = {}
    for case in spec["cases"]:
        genome = ModelGenome(ModelGenomeDefinition.model_validate(case["genome"]))
        assert genome.num_layers == spec["layers"]
        x0 = genome.initial_genotype().reshape(-1).tolist()
        config = genome.genotype_merge_config(np.array(case["x"]))
        out[case["id"]] = {"x0": x0, "config": yaml.safe_load(config.to_yaml())}
    json.dump(out, open(spec["report"], "w"))
    """  # the genotype as CMA-ES hands it over: a float64 NumPy array
)

CASES = [
    ("ties-groups-filters", {"merge_method": "ties", "base": True, "layer_granularity": 2,
                             "filters": ["self_attn"]}),
    ("dare_ties-one-group", {"merge_method": "dare_ties", "base": True}),
    ("task_arithmetic-negative", {"merge_method": "task_arithmetic", "base": True, "layer_granularity": 1,
                                  "allow_negative_weights": True}),
    ("linear-smooth-filters", {"merge_method": "linear", "layer_granularity": 1, "smooth": True,
                               "filters": ["mlp"], "normalize": False}),
    ("slerp-groups", {"merge_method": "slerp", "layer_granularity": 2}),
]


def _family(tmp_path):
    """Model folders with a Llama config.json of LAYERS layers (all either side reads)."""
    refs = []
    for name in ("base", "a", "b", "c"):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({
            "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 16,
            "intermediate_size": 32, "num_attention_heads": 2, "num_key_value_heads": 2,
            "num_hidden_layers": LAYERS, "vocab_size": 32}))
        refs.append(str(folder))
    return refs[0], refs[1:]


def table(cfg: dict) -> dict:
    """``{(model, layer range, parameter, filter): value}`` plus each slice's base, pair and t, and the
    top-level base and normalize: what the merge depends on."""
    normalize = (cfg.get("parameters") or {}).get("normalize")
    if normalize is None and cfg["merge_method"] != "slerp":  # not written: the method's default
        normalize = get_method(cfg["merge_method"]).param("normalize").default
    out = {"base_model": cfg.get("base_model")}
    if cfg["merge_method"] != "slerp":  # slerp has no normalize (mergekit writes false)
        out["normalize"] = normalize

    def add(model, rng, params):
        for p, v in (params or {}).items():
            if isinstance(v, list) and v and isinstance(v[0], dict):  # per filter
                for item in v:
                    out[(model, rng, p, item.get("filter"))] = item["value"]
            else:
                out[(model, rng, p, None)] = v

    if cfg.get("slices"):
        for s in cfg["slices"]:
            rng = tuple(s["sources"][0]["layer_range"])
            if cfg["merge_method"] == "slerp":
                out[("slice", rng)] = ([src["model"] for src in s["sources"]], s["base_model"], s["parameters"]["t"])
            for src in s["sources"]:
                add(src["model"], tuple(src["layer_range"]), src.get("parameters"))
    else:
        for m in cfg["models"]:
            add(m["model"], tuple(m.get("layer_range") or (0, LAYERS)), m.get("parameters"))
    return out


def test_genome_decodes_as_mergekit_evolve(tmp_path):
    base, models = _family(tmp_path)
    rng = np.random.default_rng(0)
    cases, ours = [], {}
    for cid, spec in CASES:
        spec = dict(spec)
        genome = {"models": models, "merge_method": spec.pop("merge_method"), **spec}
        if genome.pop("base", False):
            genome["base_model"] = base
        g = parse_genome(dict(genome), lambda ref: LAYERS)
        x = rng.normal(0.3, 0.8, g.size)  # negatives and values above 1: abs and clamp are exercised
        cases.append({"id": cid, "genome": genome, "x": x.tolist()})
        ours[cid] = (g, x)
    report = tmp_path / "report.json"
    run_script(SCRIPT, {"cases": cases, "layers": LAYERS, "report": str(report)}, tmp_path, timeout=300)
    theirs = json.loads(report.read_text())
    for cid, (g, x) in ours.items():
        assert list(g.x0()) == pytest.approx(theirs[cid]["x0"], abs=1e-7), cid  # mergekit's x0 is float32
        mine = table(yaml.safe_load(yaml.safe_dump(g.decode(x))))
        want = table(theirs[cid]["config"])
        assert mine.keys() == want.keys(), cid
        for k in want:
            assert same(mine[k], want[k]), (cid, k, mine[k], want[k])


def same(a, b) -> bool:
    """Equal, numbers to 1e-12 relative (mergekit's softmax in torch against a closed form)."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(u, v) for u, v in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and abs(a - b) <= 1e-12 * max(1.0, abs(b))
    return a == b
