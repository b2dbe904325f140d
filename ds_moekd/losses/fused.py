"""Student-side fused `lm_head` + divergence: the full fp32 `[tokens, vocab]` logits never exist.

`FusedDivergenceHead` is a weightless module attached to the student before `deepspeed.initialize`.
It scores the student's final hidden states through `lm_head`'s weight, which it registers as a
ZeRO-3 *external parameter*: DeepSpeed then gathers the partitioned weight for the head's forward
and again for its backward, and the weight's gradient reaches the parameter and ZeRO's
reduce-scatter like any other. (The fused forward computes the gradients as it goes,
ds_moekd.kernels.divergence.) Without ZeRO-3 the registration does nothing.
"""

from __future__ import annotations

import torch
from torch import nn

from ds_moekd.kernels import lm_head_divergence


class FusedDivergenceHead(nn.Module):
    def __init__(
        self,
        lm_head: nn.Linear,
        *,
        vocab: int,
        kind: str,
        beta: float = 0.5,
        temperature: float = 1.0,
        chunk: int = 1024,
        backend: str = "auto",
    ):
        super().__init__()
        # a tuple, not a submodule: the student's state dict (and its HF export) stay unchanged
        self._lm_head = (lm_head,)
        self.vocab, self.kind, self.beta = vocab, kind, beta
        self.temperature, self.chunk, self.backend = temperature, chunk, backend
        from deepspeed.runtime.zero import register_external_parameter

        register_external_parameter(self, lm_head.weight)

    def forward(self, hidden_NH: torch.Tensor, teacher: torch.Tensor | tuple[torch.Tensor, torch.Tensor]):
        """Sum over the N response tokens of the divergence between the teacher (`[N, V]` logits or
        a (hidden, lm_head weight) pair) and softmax(hidden @ lm_head[:vocab]ᵀ); rows of a padded
        vocabulary past the tokenizer's `vocab` are never scored."""
        weight = self._lm_head[0].weight
        return lm_head_divergence(
            hidden_NH,
            weight[: self.vocab],
            teacher,
            kind=self.kind,
            beta=self.beta,
            temperature=self.temperature,
            chunk=self.chunk,
            backend=self.backend,
        )


def attach_fused_divergence_head(model: nn.Module, **kwargs) -> FusedDivergenceHead:
    """Add the head to `model` (as `kd_head`) so a ZeRO-3 engine built on `model` hooks it; call before
    `deepspeed.initialize`. kwargs: vocab, kind, beta, temperature, chunk, backend."""
    head = FusedDivergenceHead(
        model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else model.lm_head, **kwargs
    )
    model.add_module("kd_head", head)
    return head
