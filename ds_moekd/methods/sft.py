"""`sft`: cross-entropy on the dataset responses (no teacher)."""

from __future__ import annotations

from ds_moekd.losses import token_cross_entropy


class SupervisedFineTuning:
    name = "sft"
    needs_teacher = False

    def loss(self, student_logits, teacher_logits, targets, global_tokens):
        ce = token_cross_entropy(student_logits, targets) / global_tokens
        return ce, {"ce": ce.item()}
