from collections import Counter

from ds_moekd.data import synthetic
from ds_moekd.data.synthetic import FAMILIES, generate_splits, split_of

PER_FAMILY = {"train": 300, "valid": 20, "test": 20}


def _item(record):
    return record["family"], record["instruction"], record["input"]


def test_every_family_in_every_split_with_requested_counts():
    splits = generate_splits(PER_FAMILY, seed=3)
    assert len(FAMILIES) >= 6
    for split, records in splits.items():
        counts = Counter(r["family"] for r in records)
        assert counts == {family: PER_FAMILY[split] for family in FAMILIES}
        assert all(set(r) == {"instruction", "input", "output", "family"} for r in records)
        assert all(r["output"].strip() for r in records)


def test_evaluation_items_never_occur_in_training():
    splits = generate_splits(PER_FAMILY, seed=3)
    train = {_item(r) for r in splits["train"]}
    valid, test = {_item(r) for r in splits["valid"]}, {_item(r) for r in splits["test"]}
    assert not train & valid and not train & test and not valid & test
    assert len(test) == len(splits["test"])  # evaluation items are distinct


def test_sort_words_held_out_by_word_set_not_by_string():
    # A permutation of a test word set must never be a training input: the key is the set.
    splits = generate_splits(PER_FAMILY, seed=5)
    word_sets = {split: {frozenset(r["input"].split()) for r in records if r["family"] == "sort_words"}
                 for split, records in splits.items()}
    assert not word_sets["train"] & word_sets["test"]


def test_split_of_depends_on_the_key_alone():
    assert split_of("addition", (12, 34)) == split_of("addition", (12, 34))
    buckets = Counter(split_of("addition", (a, b)) for a in range(10, 100) for b in range(10, 100))
    assert 0.75 < buckets["train"] / sum(buckets.values()) < 0.85
    assert buckets["valid"] > 0 and buckets["test"] > 0


def test_answers_are_correct():
    records = generate_splits(PER_FAMILY, seed=1)["train"]
    for r in records:
        if r["family"] == "addition":
            a, b = map(int, r["input"].split(" + "))
            assert r["output"] == str(a + b)
        elif r["family"] == "subtraction":
            a, b = map(int, r["input"].split(" - "))
            assert r["output"] == str(a - b) and a >= b
        elif r["family"] == "sort_words":
            assert r["output"].split() == sorted(r["input"].split())
        elif r["family"] == "reverse_words":
            assert r["output"].split() == r["input"].split()[::-1]
        elif r["family"] == "count_words":
            assert r["output"] == str(len(r["input"].split()))
        elif r["family"] == "category_name":
            assert all(w in synthetic.CATEGORIES[r["output"]] for w in r["input"].split())
        elif r["family"] == "key_lookup":
            pairs, query = r["input"].removeprefix("pairs: ").split(" ; ")
            assert r["output"] == dict(p.split("=") for p in pairs.split())[query.rstrip("=")]
        elif r["family"] == "extreme_number":
            numbers = list(map(int, r["input"].split()))
            expected = max(numbers) if "largest" in r["instruction"] else min(numbers)
            assert r["output"] == str(expected)


def test_deterministic_given_seed_and_seed_matters():
    assert generate_splits(PER_FAMILY, seed=7) == generate_splits(PER_FAMILY, seed=7)
    assert generate_splits(PER_FAMILY, seed=7)["train"] != generate_splits(PER_FAMILY, seed=8)["train"]
