import pytest

from mergelab.evaluate.metrics import (accuracy, correct_bits, negative_flip_rate, positive_flip_rate,
                                       summarise)


def test_correct_bits_and_accuracy():
    bits = correct_bits([0, 1, 2, 2], [0, 2, 2, 1])
    assert bits == "1010" and accuracy(bits) == 0.5
    with pytest.raises(ValueError):
        correct_bits([0, 1], [0])
    with pytest.raises(ValueError):
        accuracy("")


def test_flip_rates_follow_the_muscle_definition():
    old, new = "110110", "011100"
    assert negative_flip_rate(old, old) == 0.0
    both = sum(a == b == "1" for a, b in zip(old, new))
    assert negative_flip_rate(old, new) == pytest.approx(accuracy(old) - both / len(old))
    assert positive_flip_rate(old, new) == pytest.approx(accuracy(new) - both / len(old))
    with pytest.raises(ValueError, match="length"):
        negative_flip_rate("10", "101")


def test_summarise_normalises_by_each_tasks_expert():
    expert = {"a": "1111", "b": "1100"}
    merged = {"a": "1010", "b": "0110"}
    s = summarise(merged, ["a", "b"], expert, {"h": 0.25})
    assert s["accuracy"] == {"a": 0.5, "b": 0.5}
    assert s["normalised_accuracy"] == {"a": 0.5, "b": 1.0}
    assert s["mean_normalised_accuracy"] == 0.75
    assert s["negative_flip_rate"] == {"a": 0.5, "b": 0.25}
    assert s["positive_flip_rate"] == {"a": 0.0, "b": 0.25}
    assert s["mean_held_out_accuracy"] == 0.25
    zero = summarise({"a": "10"}, ["a"], {"a": "00"})
    assert zero["normalised_accuracy"]["a"] is None and zero["mean_normalised_accuracy"] is None
