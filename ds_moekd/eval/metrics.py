"""Text metrics: ROUGE-L (MiniLLM protocol) and exact match (S-NI style and strict).

Both take one prediction and one or more references and return the best score over the
references, on a 0-100 scale (exact match is therefore 0 or 100 per example, so means over a
data set read as percentages like ROUGE-L).
"""

from __future__ import annotations

import re
import string
from functools import lru_cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rouge_score import rouge_scorer

_PUNCTUATION = frozenset(string.punctuation)


@lru_cache(maxsize=1)
def _scorer() -> rouge_scorer.RougeScorer:
    from rouge_score import rouge_scorer  # on first use: nltk's import costs every rank ~0.25 s

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def _as_list(references: list[str] | str) -> list[str]:
    refs = [references] if isinstance(references, str) else list(references)
    if not refs:
        raise ValueError("at least one reference is needed to score a prediction")
    return refs


def rouge_l(prediction: str, references: list[str] | str) -> float:
    """ROUGE-L F1 with Porter stemming (rouge-score lowercases and drops punctuation), max over refs, x100."""
    return 100.0 * max(_scorer().score(ref, prediction)["rougeL"].fmeasure for ref in _as_list(references))


def normalize_answer(text: str) -> str:
    """S-NI / SQuAD normalisation: lowercase, drop punctuation and articles, collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, references: list[str] | str, strict: bool = False) -> float:
    """100 if the prediction equals some reference, else 0.

    strict=False compares normalised answers (S-NI/MiniLLM); strict=True compares the texts with only
    leading/trailing whitespace stripped (the demo's primary metric: case, order and spacing count).
    """
    canon = str.strip if strict else normalize_answer
    target = canon(prediction)
    return 100.0 if any(canon(ref) == target for ref in _as_list(references)) else 0.0
