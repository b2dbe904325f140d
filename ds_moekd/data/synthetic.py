"""Synthetic multi-skill instruction data with exact answers (the embedded demo's workload).

Every family draws *items* (operand pairs, word tuples, ...) from a large space and renders them
as MiniLLM-style records. Each item has a canonical key; a salted SHA-256 of the key assigns it to
train, valid or test once and for all, so an evaluation item can never occur in training, however
many records are drawn. Scores therefore measure generalisation, not memory (small item pools
saturate by memory and hide capacity differences).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Iterable
from pathlib import Path

SPLITS = ("train", "valid", "test")
# Share of the item space per split, in percent (by key hash, not by sampled record).
_SPLIT_BUCKETS = {"train": range(80), "valid": range(80, 90), "test": range(90, 100)}

CATEGORIES: dict[str, tuple[str, ...]] = {
    "animals": ("cat", "dog", "horse", "mouse", "tiger", "sheep", "goat", "eagle", "snake", "whale",
                "zebra", "camel", "otter", "rabbit", "fox", "wolf"),
    "colors": ("red", "blue", "green", "yellow", "purple", "orange", "black", "white", "brown", "pink",
               "gray", "violet", "silver", "golden", "teal", "navy"),
    "fruits": ("apple", "banana", "cherry", "grape", "lemon", "mango", "peach", "pear", "plum", "melon",
               "kiwi", "lime", "papaya", "apricot", "fig", "guava"),
    "tools": ("hammer", "saw", "drill", "wrench", "chisel", "shovel", "rake", "axe", "pliers", "ladder",
              "brush", "knife", "needle", "spade", "file", "clamp"),
    "countries": ("france", "spain", "italy", "japan", "china", "india", "brazil", "egypt", "kenya",
                  "peru", "chile", "norway", "sweden", "canada", "mexico", "greece"),
    "jobs": ("doctor", "nurse", "farmer", "pilot", "baker", "teacher", "lawyer", "artist", "singer",
             "dancer", "writer", "chef", "judge", "miner", "sailor", "tailor"),
}
WORDS: tuple[str, ...] = tuple(w for ws in CATEGORIES.values() for w in ws)
_KEY_LETTERS = "abcdefghijklmnopqrstuvwxyz"

# An item: (key identifying it for the split, instruction, input, output).
Item = tuple[tuple, str, str, str]


def _addition(rng: random.Random) -> Item:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return (a, b), "Add the two numbers.", f"{a} + {b}", str(a + b)


def _subtraction(rng: random.Random) -> Item:
    a, b = sorted((rng.randint(10, 99), rng.randint(10, 99)), reverse=True)
    return (a, b), "Subtract the second number from the first.", f"{a} - {b}", str(a - b)


def _sort_words(rng: random.Random) -> Item:
    words = rng.sample(WORDS, rng.randint(4, 6))
    # Keyed by the word set: no permutation of a test set is ever seen sorted in training.
    return (tuple(sorted(words)),), "Sort the words in alphabetical order.", " ".join(words), " ".join(sorted(words))


def _reverse_words(rng: random.Random) -> Item:
    words = rng.sample(WORDS, rng.randint(2, 4))
    return tuple(words), "Write the words in reverse order.", " ".join(words), " ".join(reversed(words))


def _count_words(rng: random.Random) -> Item:
    words = [rng.choice(WORDS) for _ in range(rng.randint(3, 12))]
    return tuple(words), "How many words are in the input?", " ".join(words), str(len(words))


def _extreme_number(rng: random.Random) -> Item:
    numbers = rng.sample(range(10, 100), 3)
    largest = rng.random() < 0.5
    which = "largest" if largest else "smallest"
    answer = max(numbers) if largest else min(numbers)
    return (which, tuple(sorted(numbers))), f"What is the {which} number in the list?", \
        " ".join(map(str, numbers)), str(answer)


def _category_name(rng: random.Random) -> Item:
    # Knowledge, not copying: which of the six groups 2-3 member words share. Every word is seen in
    # training; held-out items are unseen combinations.
    category = rng.choice(sorted(CATEGORIES))
    words = rng.sample(CATEGORIES[category], rng.randint(2, 3))
    return (tuple(sorted(words)),), "Which group do these words belong to?", " ".join(words), category


def _key_lookup(rng: random.Random) -> Item:
    keys = rng.sample(_KEY_LETTERS, rng.randint(2, 4))
    values = [rng.randint(0, 9) for _ in keys]
    query = rng.choice(keys)
    pairs = tuple(zip(keys, values))
    # The query is written as its key is (` a=`) and values are one digit (one token), so the answer
    # is the single token that followed the query's earlier occurrence (an induction-head copy).
    return (query, pairs), "Complete the last pair with the value given earlier.", \
        "pairs: " + " ".join(f"{k}={v}" for k, v in pairs) + f" ; {query}=", str(dict(pairs)[query])


FAMILIES: dict[str, Callable[[random.Random], Item]] = {
    "addition": _addition,
    "subtraction": _subtraction,
    "sort_words": _sort_words,
    "reverse_words": _reverse_words,
    "count_words": _count_words,
    "extreme_number": _extreme_number,
    "category_name": _category_name,
    "key_lookup": _key_lookup,
}


def split_of(family: str, key: tuple) -> str:
    """The split an item belongs to, fixed by its key alone (independent of the seed)."""
    digest = hashlib.sha256(f"{family}|{key!r}".encode()).digest()
    bucket = int.from_bytes(digest[:8], "big") % 100
    return next(split for split, buckets in _SPLIT_BUCKETS.items() if bucket in buckets)


def _draw(family: str, split: str, count: int, rng: random.Random, unique: bool) -> list[dict]:
    make = FAMILIES[family]
    records: list[dict] = []
    seen: set[tuple] = set()
    while len(records) < count:
        key, instruction, input_text, output = make(rng)
        if split_of(family, key) != split or (unique and key in seen):
            continue
        seen.add(key)
        records.append({"instruction": instruction, "input": input_text, "output": output, "family": family})
    return records


def generate_splits(per_family: dict[str, int], seed: int = 0) -> dict[str, list[dict]]:
    """Records per split; `per_family` maps split -> records per family.

    Evaluation items are distinct; training items may repeat (as in any sampled corpus).
    """
    splits: dict[str, list[dict]] = {}
    for split in SPLITS:
        records: list[dict] = []
        for index, family in enumerate(FAMILIES):
            # One stream per (seed, split, family): changing one family's size leaves the others' alone.
            rng = random.Random(f"{seed}|{split}|{index}")
            records += _draw(family, split, per_family[split], rng, unique=split != "train")
        random.Random(f"{seed}|{split}|shuffle").shuffle(records)
        splits[split] = records
    return splits


def write_jsonl(records: Iterable[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
