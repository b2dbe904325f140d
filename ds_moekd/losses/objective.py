"""What a method's loss is made of (`LossTerms`), computed on logits the caller already has.

A loss on response tokens is ce_weight · CE(targets) + div_weight · D(teacher ‖ student), summed
over tokens (the caller divides by the global token count, losses/scaling.py). D runs through the
kernel dispatcher (`ds_moekd.kernels.divergence`: torch on CPU, the Triton row kernel on a GPU),
chunked over tokens so its fp32 working set stays `chunk x V`; teacher logits carry no gradient.
The same terms run without any `[N, V]` logits through the student's fused lm_head head
(losses/fused.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ds_moekd.kernels import divergence


def token_cross_entropy(student_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """sum_tokens -log q(target)."""
    return F.cross_entropy(student_logits.float(), targets, reduction="sum")


@dataclass(frozen=True)
class LossTerms:
    ce_weight: float = 1.0
    divergence: str | None = None  # forward_kl | reverse_kl | jsd (ds_moekd.kernels.divergence); None: CE only
    div_weight: float = 0.0
    temperature: float = 1.0
    beta: float = 0.5  # jsd's mixture weight
    div_name: str = "kl"  # the divergence's key in metrics.jsonl

    def on_logits(
        self, student_NV: torch.Tensor, teacher_NV: torch.Tensor | None, targets_N: torch.Tensor, chunk: int = 0
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(weighted loss summed over tokens, {part: its sum, detached})."""
        ce = token_cross_entropy(student_NV, targets_N)
        loss, parts = self.ce_weight * ce, {"ce": ce.detach()}
        if self.divergence is not None:
            div = divergence(
                student_NV, teacher_NV, kind=self.divergence, beta=self.beta, temperature=self.temperature, chunk=chunk
            )
            loss = loss + self.div_weight * div
            parts[self.div_name] = div.detach()
        return loss, parts
