"""`kd`: word-level KD on dataset responses, ce_weight * CE + kl_weight * KL(p || q)."""

from __future__ import annotations

from ds_moekd.config import KDConfig
from ds_moekd.losses import forward_kl, token_cross_entropy


class WordLevelKD:
    name = "kd"
    needs_teacher = True

    def __init__(self, cfg: KDConfig):
        self.cfg = cfg

    def loss(self, student_logits, teacher_logits, targets, global_tokens):
        ce = token_cross_entropy(student_logits, targets) / global_tokens
        kl = forward_kl(
            teacher_logits, student_logits, temperature=self.cfg.temperature, chunk=self.cfg.token_chunk
        ) / global_tokens
        loss = self.cfg.ce_weight * ce + self.cfg.kl_weight * kl
        return loss, {"ce": ce.item(), "kl": kl.item()}
