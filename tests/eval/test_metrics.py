import pytest

from ds_moekd.eval import exact_match, rouge_l
from ds_moekd.eval.metrics import normalize_answer


def test_rouge_l_hand_computed():
    # LCS("the cat sat", "the cat ran") = 2 tokens; P = R = 2/3, F1 = 2/3.
    assert rouge_l("the cat sat", "the cat ran") == pytest.approx(200 / 3)
    # LCS("a b c d", "a c") = 2; P = 2/2, R = 2/4 -> F1 = 2/3 (prediction "a c", reference "a b c d").
    assert rouge_l("a c", "a b c d") == pytest.approx(200 / 3)
    assert rouge_l("blue cat", "cat blue") == pytest.approx(50.0)
    assert rouge_l("", "cat") == 0.0


def test_rouge_l_lowercases_drops_punctuation_and_stems():
    assert rouge_l("Cats, running!", "cat run") == pytest.approx(100.0)


def test_rouge_l_takes_the_best_reference():
    assert rouge_l("85", ["84", "85"]) == pytest.approx(100.0)
    assert rouge_l("the cat sat", ["dog", "the cat ran"]) == pytest.approx(200 / 3)


def test_exact_match_normalised_and_strict():
    assert normalize_answer("  The Cat, sat!  ") == "cat sat"
    assert exact_match("The cat sat.", "cat sat") == 100.0
    assert exact_match("The cat sat.", "cat sat", strict=True) == 0.0
    assert exact_match(" cat sat\n", "cat sat", strict=True) == 100.0
    assert exact_match("Cat sat", "cat sat", strict=True) == 0.0
    assert exact_match("85", ["84", "85"], strict=True) == 100.0
    assert exact_match("86", ["84", "85"]) == 0.0


def test_no_references_is_an_error():
    with pytest.raises(ValueError):
        rouge_l("x", [])
    with pytest.raises(ValueError):
        exact_match("x", [])
