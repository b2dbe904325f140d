"""`MoETeacher.generate`: batched decoding with transformers' KV cache, in lockstep under EP.

The MoE layers exchange tokens with the other ranks of the EP group, so every rank must run the
same number of forwards: after each step the group agrees (all-reduce MAX) whether any rank still
decodes, and a rank that is done (EOS everywhere, or its own max_new_tokens reached) keeps feeding
padding tokens whose outputs it ignores. Sampling is counter-based (a Gumbel per vocabulary entry
keyed by seed, sequence index and position), so a row's tokens do not depend on the batch or the
EP size; greedy decoding takes the argmax.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from transformers import DynamicCache

from ds_moekd.routing import RoutingContext, RoutingPolicy, counter_uniform

_SAMPLING_LAYER = -1  # the counter key's layer slot for token sampling (MoE layers are >= 0)


@torch.no_grad()
def generate(
    self,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    seed: int = 0,
    routing: RoutingPolicy | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    sequence_index: torch.Tensor | None = None,
    vocab_limit: int | None = None,
) -> torch.Tensor:
    """Prompt plus new tokens `[B, S + n]` (left-padded prompts; rows that ended get padding).

    n is the number of steps this rank's batch needed (<= max_new_tokens), as in transformers.
    `vocab_limit` (the tokenizer's length) keeps padded lm_head rows (Qwen, DeepSeek) from ever
    being chosen.
    """
    batch = input_ids.shape[0]
    device = input_ids.device
    if pad_token_id is None:
        pad_token_id = eos_token_id if eos_token_id is not None else 0
    mask_BS = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
    sequences_B = sequence_index if sequence_index is not None else torch.arange(batch, device=device)
    cache = DynamicCache(config=self.config)
    positions_BS = (mask_BS.cumsum(-1) - 1).clamp(min=0)
    logits_BV = self(
        input_ids, mask_BS, positions_BS, routing=routing, sequence_index=sequences_B, cache=cache
    ).logits[:, -1]
    next_position_B = positions_BS[:, -1] + 1
    done_B = torch.zeros(batch, dtype=torch.bool, device=device)
    new_tokens: list[torch.Tensor] = []
    step = 0
    while True:
        if step < max_new_tokens and not bool(done_B.all()):
            next_B = _choose(logits_BV[:, :vocab_limit], do_sample, temperature, seed, sequences_B, next_position_B)
            next_B = torch.where(done_B, torch.full_like(next_B, pad_token_id), next_B)
            new_tokens.append(next_B)
            if eos_token_id is not None:
                done_B |= next_B == eos_token_id
            feed_B = next_B
        else:  # this rank is done: a dummy step keeps the EP group's collectives matched
            feed_B = torch.full((batch,), pad_token_id, dtype=input_ids.dtype, device=device)
        step += 1
        more = step < max_new_tokens and not bool(done_B.all())
        if not _any_rank(more, self.groups.ep_group, device):
            break
        mask_BS = torch.cat([mask_BS, torch.ones_like(mask_BS[:, :1])], dim=1)
        logits_BV = self(
            feed_B[:, None],
            mask_BS,
            next_position_B[:, None],
            routing=routing,
            sequence_index=sequences_B,
            cache=cache,
        ).logits[:, -1]
        next_position_B = next_position_B + 1
    if not new_tokens:
        return input_ids
    return torch.cat([input_ids, torch.stack(new_tokens, dim=1)], dim=1)


def _choose(logits_BV, do_sample, temperature, seed, sequences_B, positions_B) -> torch.Tensor:
    if not do_sample:
        return logits_BV.argmax(dim=-1)
    context = RoutingContext(_SAMPLING_LAYER, sequences_B, positions_B)
    u_BV = counter_uniform(seed, 0, context, streams=logits_BV.shape[-1])
    gumbel_BV = -torch.log(-torch.log(u_BV))
    return (logits_BV.double() / temperature + gumbel_BV).argmax(dim=-1)


def _any_rank(flag: bool, group: dist.ProcessGroup | None, device: torch.device) -> bool:
    if group is None:
        return flag
    flag_1 = torch.tensor([int(flag)], device=device)
    dist.all_reduce(flag_1, op=dist.ReduceOp.MAX, group=group)
    return bool(flag_1.item())
