"""A plain Hugging Face causal LM in the teacher's place of a training step, for tests whose teacher
is not a MoE: `train.teacher_scores` asks the teacher for `forward_draws` (MoETeacher's), and this
answers it for one draw under the model's own (dense) computation."""

from __future__ import annotations

import torch


class DenseTeacher(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward_draws(self, input_ids, attention_mask, routing, num_draws, sequence_index=None, *,
                      position_ids=None, fused_head=False):
        if routing is not None or num_draws != 1:
            raise ValueError("a dense teacher has no routing and gives one draw")
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         output_hidden_states=fused_head,
                         logits_to_keep=torch.empty(0, dtype=torch.long) if fused_head else 0)
        if fused_head:
            return out.hidden_states[-1][None], self.model.get_output_embeddings().weight
        return out.logits[None]
