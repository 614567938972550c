"""FuseLLM token alignment and the fusion rules, against values worked out by hand."""

from __future__ import annotations

import math

import pytest

from mergelab.fuse.align import (VocabMap, align_tokens, aligned_fraction, canonical, edit_distance, one_to_one,
                                 transfer_distribution)
from mergelab.fuse.fusion import avg_ce_weights, fusion_loss, fusion_weights, min_ce_index


def word_tokenizer(vocab: dict, bos="<s>", eos="</s>", pad="<pad>"):
    """A word-level tokenizer with exactly ``vocab`` (built with the tokenizers library)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=bos, eos_token=eos, pad_token=pad,
                                   unk_token="[UNK]")


def test_edit_distance_by_hand():
    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance("", "abc") == 3
    assert edit_distance("hel", "world") == 4  # h->w, e->o, insert r, l=l, insert d
    assert edit_distance("world", "world") == 0


def test_identical_sequences_align_on_the_diagonal():
    toks = ["Write", "Ġthe", "Ġlong", "est", "Ċ", "A", ":"]
    assert align_tokens(toks, toks) == [[i] for i in range(len(toks))]
    assert one_to_one(toks, toks, align_tokens(toks, toks)) == list(range(len(toks)))


def test_markers_and_one_to_many_by_hand():
    # stripped: source hel, lo, world; target hello, world. Costs: c(hel,hello)=2, c(hel,world)=4,
    # c(lo,hello)=3, c(lo,world)=4, c(world,hello)=4, c(world,world)=0. DTW table (rows source):
    #   D11=2  D12=6 ; D21=5  D22=4+min(2,6,5)=6 ; D31=5+4=9  D32=0+min(5,6,9)=5.
    # Back from (3,2): diagonal to (2,1) [5 < 6 < 9], then only "up" to (1,1) is finite.
    src, tgt = ["▁hel", "lo", "▁world"], ["Ġhello", "Ġworld"]
    al = align_tokens(src, tgt)
    assert al == [[0, 1], [2]]
    # "hello" spans two source tokens -> no source distribution; "▁world" is "Ġworld" once markers agree
    assert one_to_one(src, tgt, al) == [None, 2]
    assert canonical("Ġhello") == canonical("▁hello")


def test_every_token_is_on_the_path():
    src, tgt = ["a", "bc", "d", "ef", "g"], ["ab", "c", "def", "g"]
    al = align_tokens(src, tgt)
    assert all(al[j] for j in range(len(tgt)))
    assert sorted({i for x in al for i in x}) == list(range(len(src)))
    flat = [(j, i) for j, x in enumerate(al) for i in x]
    assert flat == sorted(flat) and all(b[1] >= a[1] for a, b in zip(flat, flat[1:]))  # monotone path


SRC = {"<s>": 0, "</s>": 1, "<pad>": 2, "[UNK]": 3, "Ġcat": 4, "dog": 5, "Ġcats": 6}
TGT = {"<pad>": 0, "<s>": 1, "</s>": 2, "[UNK]": 3, "▁car": 4, "▁cat": 5, "▁do": 6}


def test_vocab_map_exact_then_specials_then_edit_distance():
    vm = VocabMap(word_tokenizer(SRC), word_tokenizer(TGT))
    assert vm(4) == 5  # Ġcat == ▁cat (exact once markers agree)
    assert vm(0) == 1 and vm(1) == 2 and vm(2) == 0  # BOS, EOS, PAD by role, not by id or string
    # dog: ▁do is 2 edits (insert ▁, delete g), ▁cat and ▁car 4 each
    assert vm(5) == 6
    # Ġcats: ▁cat 1 edit, ▁car 2
    assert vm(6) == 5
    assert vm(99) is None
    assert vm.exact_matches == 5  # <s>, </s>, <pad>, [UNK] spelled alike, and Ġcat


def test_transfer_distribution_maps_drops_duplicates_and_renormalises():
    vm = VocabMap(word_tokenizer(SRC), word_tokenizer(TGT))
    # top-k: Ġcats (logit 2) -> ▁cat, Ġcat (1) -> ▁cat again (dropped), dog (0) -> ▁do
    ids, probs = transfer_distribution([6, 4, 5], [2.0, 1.0, 0.0], vm)
    assert ids == [5, 6]
    e = math.exp(2.0)
    assert probs == pytest.approx([e / (e + 1), 1 / (e + 1)], abs=1e-12)
    ids, probs = transfer_distribution([6, 5], [2.0, 0.0], vm, temperature=2.0)
    assert probs == pytest.approx([math.e / (math.e + 1), 1 / (math.e + 1)], abs=1e-12)


def test_aligned_fraction_of_unalignable_vocabulary_is_zero():
    target = word_tokenizer({"<s>": 0, "</s>": 1, "<pad>": 2, "[UNK]": 3, "the": 4, "cat": 5, "sat": 6})
    same = word_tokenizer({"<s>": 0, "</s>": 1, "<pad>": 2, "[UNK]": 3, "cat": 4, "the": 5, "sat": 6})
    alien = word_tokenizer({"<s>": 0, "</s>": 1, "<pad>": 2, "[UNK]": 3, "zzz": 4})
    texts = ["the cat sat", "the cat"]
    assert aligned_fraction(same, target, texts) == 1.0
    assert aligned_fraction(alien, target, texts) == 0.0


def test_min_ce_and_avg_ce_by_hand():
    ces = [2.0, 0.5, 0.5, 3.0]
    assert min_ce_index(ces) == 1  # lowest, first on a tie
    assert fusion_weights("min_ce", ces) == [0.0, 1.0, 0.0, 0.0]
    # AvgCE: softmax over the rewards exp(-CE), not over -CE
    r = [math.exp(-1.0), math.exp(-2.0)]
    z = math.exp(r[0]) + math.exp(r[1])
    assert avg_ce_weights([1.0, 2.0]) == pytest.approx([math.exp(r[0]) / z, math.exp(r[1]) / z], abs=1e-12)
    assert avg_ce_weights([1.0, 2.0])[0] == pytest.approx(0.5579, abs=1e-4)  # far from softmax(-CE) = 0.7311
    with pytest.raises(ValueError, match="fusion"):
        fusion_weights("max_ce", ces)


def test_fusion_loss_by_hand():
    import torch

    q = torch.tensor([[0.5, 0.25, 0.25]])
    p = torch.tensor([[0.0, 1.0, 0.0]])
    assert fusion_loss(q.log(), p, "ce").item() == pytest.approx(math.log(4), abs=1e-6)
    assert fusion_loss(q.log(), p, "kl").item() == pytest.approx(math.log(4), abs=1e-6)  # one-hot: H(P) = 0
    assert fusion_loss(q.log(), q, "kl").item() == pytest.approx(0.0, abs=1e-7)
    h = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
    assert fusion_loss(q.log(), q, "ce").item() == pytest.approx(h, abs=1e-6)
