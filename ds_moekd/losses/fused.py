"""Student-side fused `lm_head` + loss: the `[tokens, vocab]` logits never exist in full.

`FusedLossHead` is a weightless module attached to the student (as `loss_head`) before
`deepspeed.initialize`. It scores the student's final hidden states through `lm_head`'s weight,
which it registers as a ZeRO-3 *external parameter*: DeepSpeed then gathers the partitioned weight
for the head's forward and again for its backward, and the weight's gradient reaches the parameter
and ZeRO's reduce-scatter like any other. (The fused forward computes the gradients as it goes,
ds_moekd.kernels.divergence.) Without ZeRO-3 the registration does nothing.
"""

from __future__ import annotations

import torch
from torch import nn

from ds_moekd.kernels import lm_head_loss
from ds_moekd.losses.objective import LossTerms
from ds_moekd.student.zero3 import register_external_weight


class FusedLossHead(nn.Module):
    def __init__(self, lm_head: nn.Linear, *, vocab: int, terms: LossTerms, chunk: int = 0, backend: str = "auto"):
        super().__init__()
        # a tuple, not a submodule: the student's state dict (and its HF export) stay unchanged
        self._lm_head = (lm_head,)
        self.vocab, self.terms, self.chunk, self.backend = vocab, terms, chunk, backend
        register_external_weight(self, lm_head.weight)  # ZeRO-3 gathers it for this head's forward and backward

    def forward(
        self,
        hidden_NH: torch.Tensor,
        teacher: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None,
        targets_N: torch.Tensor | None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`LossTerms.on_logits` of softmax(hidden @ lm_head[:vocab]ᵀ) without forming those logits.

        `teacher` is `[N, V]` logits or a (hidden, lm_head weight) pair (then its logits are formed
        one chunk at a time too); rows of a padded vocabulary past the tokenizer's `vocab` are never
        scored. Returns (weighted loss summed over the N tokens, {part: its sum, detached})."""
        t = self.terms
        loss, ce, div = lm_head_loss(
            hidden_NH,
            self._lm_head[0].weight[: self.vocab],
            teacher if t.divergence is not None else None,
            targets_N,
            kind=t.divergence or "forward_kl",
            beta=t.beta,
            temperature=t.temperature,
            ce_weight=t.ce_weight,
            div_weight=t.div_weight,
            chunk=self.chunk,
            backend=self.backend,
        )
        parts = {"ce": ce} if t.divergence is None else {"ce": ce, t.div_name: div}
        return loss, parts


HEAD_NAME = "loss_head"


def attach_fused_loss_head(model: nn.Module, **kwargs) -> FusedLossHead:
    """Add the head to `model` (as `loss_head`) so a ZeRO-3 engine built on `model` hooks it; call before
    `deepspeed.initialize`. kwargs: vocab, terms, chunk (tokens per chunk, 0: auto), backend."""
    head = FusedLossHead(model.get_output_embeddings(), **kwargs)
    model.add_module(HEAD_NAME, head)
    return head


def fused_loss_head(model: nn.Module) -> FusedLossHead | None:
    """The head `attach_fused_loss_head` added to `model`, or None (the loss then runs on full logits)."""
    return getattr(model, HEAD_NAME, None)
