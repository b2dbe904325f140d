"""`sft`: cross-entropy on the dataset responses (no teacher)."""

from __future__ import annotations

from ds_moekd.losses import LossTerms
from ds_moekd.methods.base import Method


class SupervisedFineTuning(Method):
    name = "sft"
    needs_teacher = False

    @classmethod
    def loss_terms(cls, cfg) -> LossTerms:
        return LossTerms(ce_weight=1.0)
