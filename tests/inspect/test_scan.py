"""inspect_models on hand-made checkpoints: every number worked out by hand (see conftest.py)."""

import math

import pytest
import torch

from mergelab.errors import CheckpointError, NonFiniteError
from mergelab.inspect.scan import group_of, inspect_models
from tests.inspect.conftest import STEP, TAU, write_model

A, B, C = 0, 1, 2


def by_group(diag):
    return {g.name: g.stats for g in diag.groups}


def test_groups_and_order(hand_models):
    base, models = hand_models
    diag = inspect_models(base, models)
    assert [g.name for g in diag.groups] == ["embeddings", "0", "1", "other"]
    assert [g.layer for g in diag.groups] == [None, 0, 1, None]
    assert diag.labels == ["A", "B", "C"]
    assert diag.skipped == [{"tensor": STEP, "reason": "non-float dtype torch.int64 in the base (never merged)"}]
    assert group_of("lm_head.weight") == ("embeddings", None)
    assert group_of("transformer.wte.weight") == ("embeddings", None)
    assert group_of("model.norm.weight") == ("other", None)
    assert group_of("model.layers.17.mlp.up_proj.weight") == ("17", 17)


def test_layer0_by_hand(hand_models):
    # tau_A = [1, -1, 0, 2], tau_B = [2, 1, 0, -0.5], tau_C = [0, 3, 0, 0], base = [1, 2, 0, 4]
    base, models = hand_models
    s = by_group(inspect_models(base, models))["0"]
    assert s.numel == 4 and s.tensors == 1
    # squared norms 1+1+4 = 6, 4+1+0.25 = 5.25, 9
    assert s.norms == pytest.approx([math.sqrt(6), math.sqrt(5.25), 3.0], abs=1e-12)
    # dots: AB = 2 - 1 - 1 = 0, AC = -3, BC = 3
    assert s.gram.tolist() == [[6, 0, -3], [0, 5.25, 3], [-3, 3, 9]]
    cos = s.cosine
    assert cos[A][B] == 0.0
    assert cos[A][C] == pytest.approx(-3 / math.sqrt(54), abs=1e-12)
    assert cos[B][C] == pytest.approx(3 / math.sqrt(47.25), abs=1e-12)
    # coord0: A+ B+ (agree); coord1: A- B+ C+ (conflict); coord2: all zero; coord3: A+ B- (conflict)
    assert (s.conflicts, s.overlap) == (2, 3)
    assert s.conflict_rate == 0.5 and s.overlap_rate == 0.75
    assert s.conflict_in_overlap == pytest.approx(2 / 3)
    # chance: c=2 -> 1/2, c=3 -> 3/4, c=2 -> 1/2
    assert s.chance_conflicts == pytest.approx(1.75)
    assert s.conflict_vs_chance == pytest.approx(2 / 1.75)
    assert s.zeros.tolist() == [1, 1, 3]
    assert s.zero_share == [0.25, 0.25, 0.75]
    assert s.base_sumsq == 21.0


def test_whole_model_by_hand(hand_models):
    base, models = hand_models
    diag = inspect_models(base, models, rtol=0.1)
    g = by_group(diag)
    # embeddings: A and B disagree at (0,0), C alone at (0,1)
    assert (g["embeddings"].conflicts, g["embeddings"].overlap) == (1, 1)
    assert g["embeddings"].gram.tolist() == [[1, -1, 0], [-1, 1, 0], [0, 0, 1]]
    # layer 1: tau_B = 2 tau_A, C untouched -> cos(A, B) = 1, cos with C undefined
    l1 = g["1"]
    assert l1.cosine[A][B] == pytest.approx(1.0) and l1.cosine[A][C] is None and l1.cosine[C][C] is None
    assert l1.mean_cosine == pytest.approx(1.0)
    assert (l1.conflicts, l1.overlap, l1.chance_conflicts) == (0, 4, 2.0)
    # other: no coordinate has two non-zero entries
    o = g["other"]
    assert (o.conflicts, o.overlap) == (0, 0)
    assert o.conflict_in_overlap is None and o.conflict_vs_chance is None
    # A's 0.0625 at base 1 is below rtol 0.1 -> near zero; C's 0.5 is not
    assert o.near_zero.tolist() == [2, 2, 1] and o.zeros.tolist() == [1, 2, 1]

    s = diag.overall
    assert s.numel == 14 and s.tensors == 4
    assert s.gram.tolist() == [[11.00390625, 7, -3], [7, 22.25, 3], [-3, 3, 10.25]]
    assert s.norms == pytest.approx([math.sqrt(11.00390625), math.sqrt(22.25), math.sqrt(10.25)])
    assert s.relative_norms == pytest.approx([math.sqrt(11.00390625 / 29), math.sqrt(22.25 / 29),
                                              math.sqrt(10.25 / 29)])
    assert s.cosine[A][B] == pytest.approx(7 / math.sqrt(11.00390625 * 22.25))
    assert s.cosine[A][C] == pytest.approx(-3 / math.sqrt(11.00390625 * 10.25))
    assert s.cosine[B][C] == pytest.approx(3 / math.sqrt(22.25 * 10.25))
    assert (s.conflicts, s.overlap, s.chance_conflicts) == (3, 8, 4.25)
    assert s.conflict_rate == pytest.approx(3 / 14)
    assert s.zeros.tolist() == [5, 6, 11]
    assert s.near_zero.tolist() == [6, 6, 11]
    assert s.trimmed_conflicts is None and s.trimmed_conflict_rate is None


def test_ties_trimmed_conflicts_by_hand(hand_models):
    # density 0.5 keeps exactly int(0.5 * n) entries per tensor, ties at the threshold by lower flat
    # index: in layer 0, B keeps |2|, |1| and drops -0.5 (removing the conflict at coord3), and A keeps
    # |2| and the first of its two |1| (coord0), dropping -1 at coord1 (removing the conflict there). In
    # layer 1, A's and B's four tied entries keep their first two: two coordinates overlap.
    base, models = hand_models
    diag = inspect_models(base, models, density=0.5)
    g = by_group(diag)
    assert (g["0"].trimmed_conflicts, g["0"].trimmed_overlap) == (0, 2)
    assert (g["embeddings"].trimmed_conflicts, g["embeddings"].trimmed_overlap) == (1, 1)
    assert (g["1"].trimmed_conflicts, g["1"].trimmed_overlap) == (0, 2)
    assert (g["other"].trimmed_conflicts, g["other"].trimmed_overlap) == (0, 0)
    assert (diag.overall.trimmed_conflicts, diag.overall.trimmed_overlap) == (1, 5)
    assert diag.overall.trimmed_conflict_rate == pytest.approx(1 / 14)
    # density 1 trims nothing
    full = inspect_models(base, models, density=1.0).overall
    assert (full.trimmed_conflicts, full.trimmed_overlap) == (full.conflicts, full.overlap)


@pytest.mark.parametrize("chunk", [1, 3])
def test_chunked_streaming_gives_the_same_numbers(hand_models, chunk):
    base, models = hand_models
    whole = inspect_models(base, models, density=0.5)
    parts = inspect_models(base, models, density=0.5, chunk_elements=chunk)
    for a, b in zip([whole.overall] + [g.stats for g in whole.groups],
                    [parts.overall] + [g.stats for g in parts.groups]):
        assert (a.numel, a.conflicts, a.overlap, a.trimmed_conflicts, a.trimmed_overlap) == \
               (b.numel, b.conflicts, b.overlap, b.trimmed_conflicts, b.trimmed_overlap)
        assert a.zeros.tolist() == b.zeros.tolist() and a.near_zero.tolist() == b.near_zero.tolist()
        assert b.gram.ravel().tolist() == pytest.approx(a.gram.ravel().tolist())
        assert b.chance_conflicts == pytest.approx(a.chance_conflicts)


def test_storage_does_not_matter(tmp_path, hand_models):
    """bf16 and sharded checkpoints give the same numbers (all values here are exact in bf16)."""
    base, models = hand_models
    b16 = write_model(tmp_path / "B16", TAU["B"], dtype=torch.bfloat16)
    from mergelab.synthetic import write_checkpoint
    from safetensors.torch import load_file
    sharded = tmp_path / "C_sharded"
    write_checkpoint(sharded, load_file(f"{models[2]}/model.safetensors"), {}, shard_bytes=16)
    assert (sharded / "model.safetensors.index.json").exists()
    ref = inspect_models(base, models).overall
    got = inspect_models(base, [models[0], str(b16), str(sharded)]).overall
    assert got.gram.tolist() == ref.gram.tolist()
    assert (got.conflicts, got.overlap) == (ref.conflicts, ref.overlap)


# ------------------------------------------------------------------------------- bad input

def test_shape_mismatch_names_tensor_and_model(tmp_path, hand_models):
    base, models = hand_models
    bad = write_model(tmp_path / "wide", TAU["B"], extra={"model.layers.1.mlp.weight": torch.ones(5)})
    with pytest.raises(CheckpointError, match=r"tensor 'model\.layers\.1\.mlp\.weight' has shape \(5,\) in model 'wide'"):
        inspect_models(base, [models[0], str(bad)])


def test_missing_tensor_names_tensor_and_model(tmp_path, hand_models):
    base, models = hand_models
    bad = write_model(tmp_path / "short", TAU["B"], drop=("model.norm.weight",))
    with pytest.raises(CheckpointError, match=r"tensor 'model\.norm\.weight' is missing from model 'short'"):
        inspect_models(base, [str(bad), models[0]])


def test_skip_mismatched_lists_and_leaves_out(tmp_path, hand_models):
    base, models = hand_models
    bad = write_model(tmp_path / "short", TAU["B"], drop=("model.norm.weight",),
                      extra={"model.extra.weight": torch.ones(3)})
    diag = inspect_models(base, [models[0], str(bad)], skip_mismatched=True)
    reasons = {s["tensor"]: s["reason"] for s in diag.skipped}
    assert "missing from model 'short'" in reasons["model.norm.weight"]
    assert reasons["model.extra.weight"] == "in model 'short' but not in the base"
    assert [g.name for g in diag.groups] == ["embeddings", "0", "1"]
    assert diag.overall.numel == 12
    # A vs B without model.norm.weight: dots -1 + 0 + 8 = 7, squares 1+6+4 = 11 and 1+5.25+16
    assert diag.overall.gram.tolist() == [[11, 7], [7, 22.25]]


def test_missing_path_is_the_cores_error(hand_models):
    base, _ = hand_models
    with pytest.raises(CheckpointError, match="does not exist"):
        inspect_models(base, ["/nonexistent/model"])


def test_nonfinite_is_an_error(tmp_path, hand_models):
    base, _ = hand_models
    bad = write_model(tmp_path / "nan", TAU["A"], extra={"model.layers.0.mlp.weight": torch.tensor([1.0, float("nan"), 0, 4])})
    with pytest.raises(NonFiniteError, match=r"model\.layers\.0\.mlp\.weight.*'nan'"):
        inspect_models(base, [str(bad)])


def test_duplicate_folder_names_get_distinct_labels(tmp_path, hand_models):
    base, models = hand_models
    other = write_model(tmp_path / "x" / "A", TAU["A"])
    assert inspect_models(base, [models[0], str(other)]).labels == [f"{tmp_path.name}/A", "x/A"]
    assert inspect_models(base, [models[0], models[0]]).labels == ["A#2", "A#3"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("chunk", [1 << 20, 3])
def test_cuda_gives_the_cpu_numbers(hand_models, chunk):
    base, models = hand_models
    cpu = inspect_models(base, models, density=0.5, chunk_elements=chunk)
    gpu = inspect_models(base, models, density=0.5, chunk_elements=chunk, device="cuda")
    for a, b in zip([cpu.overall] + [g.stats for g in cpu.groups], [gpu.overall] + [g.stats for g in gpu.groups]):
        assert (a.conflicts, a.overlap, a.trimmed_conflicts, a.trimmed_overlap) == \
               (b.conflicts, b.overlap, b.trimmed_conflicts, b.trimmed_overlap)
        assert a.zeros.tolist() == b.zeros.tolist() and a.near_zero.tolist() == b.near_zero.tolist()
        assert b.gram.ravel().tolist() == pytest.approx(a.gram.ravel().tolist(), abs=1e-12)


def test_ties_trim_counts_exactly_with_tied_magnitudes(tmp_path):
    # 40 entries all of |tau| 0.5 in model A: density 0.25 keeps exactly int(0.25 * 40) = 10, the ten
    # of lowest flat index, whole and in row chunks; B disagrees everywhere, so the conflicts left
    # after the trim are exactly those 10.
    from safetensors.torch import save_file
    from mergelab.inspect import inspect_models

    base = torch.zeros(8, 5)
    paths = []
    for name, tau in (("base", base), ("a", torch.full((8, 5), 0.5)), ("b", torch.full((8, 5), -0.25))):
        d = tmp_path / name
        d.mkdir()
        save_file({"w.weight": base + tau if name != "base" else base}, str(d / "model.safetensors"))
        paths.append(str(d))
    for chunk in (None, 10):
        kw = {} if chunk is None else {"chunk_elements": chunk}
        diag = inspect_models(paths[0], paths[1:], density=0.25, **kw)
        assert (diag.overall.trimmed_conflicts, diag.overall.trimmed_overlap) == (10, 10)
