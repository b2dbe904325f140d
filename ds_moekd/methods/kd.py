"""`kd`: word-level KD on dataset responses, kd.ce_weight · CE + kd.kl_weight · KL(p‖q) at
loss.temperature (docs/methods/kd.md)."""

from __future__ import annotations

from ds_moekd.losses import LossTerms
from ds_moekd.methods.base import Method


class WordLevelKD(Method):
    name = "kd"
    sections = ("kd",)

    @classmethod
    def loss_terms(cls, cfg) -> LossTerms:
        return LossTerms(ce_weight=cfg.kd.ce_weight, divergence="forward_kl", div_weight=cfg.kd.kl_weight,
                         temperature=cfg.loss.temperature)
