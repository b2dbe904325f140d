"""`kd`: word-level KD on dataset responses, ce_weight * CE + kl_weight * KL(p || q) (docs/methods.md)."""

from __future__ import annotations

from ds_moekd.config import KDConfig
from ds_moekd.losses import LossTerms
from ds_moekd.methods.base import Method


class WordLevelKD(Method):
    name = "kd"

    def __init__(self, cfg: KDConfig):
        self.terms = LossTerms(
            ce_weight=cfg.ce_weight, divergence="forward_kl", div_weight=cfg.kl_weight, temperature=cfg.temperature
        )
