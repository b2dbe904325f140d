"""What a method decides: whether it needs the teacher, and the loss terms on response tokens."""

from __future__ import annotations

from typing import Protocol

from ds_moekd.losses import LossTerms


class Method(Protocol):
    name: str
    needs_teacher: bool
    terms: LossTerms  # computed on logits or through the fused lm_head head (losses/)
