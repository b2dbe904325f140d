"""Counter-based sampling: each sampled token is a pure function of (seed, prompt key, position).

Sampling from torch's global generator makes a prompt's sample depend on which other prompts
share its batch, the batch order and the number of ranks. Here each token is drawn by the
Gumbel-max trick with noise hashed from (seed, the prompt's global index, the token's position
counting real tokens only, token id): exact sampling from softmax(logits / temperature), and the
same text for a prompt however the data is batched, padded or sharded, so a 2-rank evaluation
equals the 1-process one.

It is the rule of `MoETeacher.generate` (ds_moekd/teacher/generation.py: `counter_uniform` with
layer slot -1 and step 0, the prompt's global index as `sequence_index`), so a student decoded
by transformers and a teacher decoded by `MoETeacher.generate` sample alike.
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor

from ds_moekd.routing import RoutingContext, counter_uniform

_SAMPLING_LAYER = -1  # MoETeacher.generate's layer slot for token sampling (MoE layers are >= 0)


def sample_next(logits_BV: torch.Tensor, seed: int, keys_B: torch.Tensor, positions_B: torch.Tensor,
                temperature: float = 1.0, vocab_limit: int | None = None) -> torch.Tensor:
    """Next token per row, sampled from softmax(logits / temperature) with counter-based noise.

    `positions_B`: the new token's position (real tokens before it). `vocab_limit` drops logits
    past the tokenizer's length (padded lm_head rows are not tokens); a token's noise does not
    depend on the vocabulary width, so the limit never changes which of the others is drawn.
    """
    logits_BV = logits_BV[:, :vocab_limit].double() / temperature
    context = RoutingContext(_SAMPLING_LAYER, keys_B.to(logits_BV.device), positions_B.to(logits_BV.device))
    u_BV = counter_uniform(seed, 0, context, streams=logits_BV.shape[1])
    return (logits_BV - torch.log(-torch.log(u_BV))).argmax(dim=-1)


class CounterSampler(LogitsProcessor):
    """A transformers logits processor that samples (use it with greedy decoding: `do_sample=False`).

    It leaves only the sampled token finite, so greedy decoding emits it. `keys_B` are the rows'
    prompt keys, `prompt_mask_BS` the prompts' attention mask (left padding).
    """

    def __init__(self, seed: int, keys_B: torch.Tensor, prompt_mask_BS: torch.Tensor, temperature: float = 1.0,
                 vocab_limit: int | None = None):
        self.seed, self.keys_B, self.temperature, self.vocab_limit = seed, keys_B, temperature, vocab_limit
        self.prompt_width = prompt_mask_BS.shape[1]
        self.prompt_lengths_B = prompt_mask_BS.sum(dim=-1)

    def __call__(self, input_ids_BT: torch.Tensor, scores_BV: torch.Tensor) -> torch.Tensor:
        positions_B = self.prompt_lengths_B + (input_ids_BT.shape[1] - self.prompt_width)
        chosen_B = sample_next(scores_BV, self.seed, self.keys_B, positions_B, self.temperature, self.vocab_limit)
        out_BV = torch.full_like(scores_BV, float("-inf"))
        return out_BV.scatter_(1, chosen_B[:, None], 0.0)
