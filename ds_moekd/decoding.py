"""The one decoder: new token ids for left-padded prompts, with a KV cache, alone or in lockstep.

It drives any causal LM of the project the same way: a Hugging Face model (a plain student, or
the student inside a ZeRO-3 engine), and the expert-parallel `MoETeacher` (with a routing
policy). Rollouts for on-policy training, sequence-level KD's teacher responses and evaluation's
text generation all run through `decode_ids` (docs/rollouts.md).

Tokens are drawn by `ds_moekd.rng.sample_tokens`, keyed by (seed, step, the row's global example
key, position counting real tokens only), so a row's tokens do not depend on which rows share its
batch, the padding, the number of ranks or the model wrapper.

Lockstep: when a forward is collective (the teacher's MoE layers exchange tokens over the EP
group; a ZeRO-3 student gathers each layer's parameters over the data-parallel group), every rank
of `lockstep_group` must run the same number of forwards. After each step the group agrees
(all-reduce MAX) whether any rank still decodes; a rank that is done keeps feeding padding whose
outputs it ignores. So ranks with prompts or responses of different lengths never deadlock.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from transformers import DynamicCache

from ds_moekd.rng import Sampling, sample_tokens
from ds_moekd.zero3_linear import torch_linear


# no_grad, not inference_mode: synced validation decodes with the live ZeRO-3 module, and parameters
# gathered under inference mode become inference tensors that the next training backward cannot save.
@torch.no_grad()
def decode_ids(
    model,
    input_ids_BS: torch.Tensor,
    attention_mask_BS: torch.Tensor,
    *,
    max_new_tokens: int,
    sampling: Sampling | None,
    seed: int = 0,
    step: int = 0,
    keys_B: torch.Tensor | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int = 0,
    vocab_limit: int | None = None,
    lockstep_group: dist.ProcessGroup | None = None,
    routing=None,
) -> torch.Tensor:
    """New tokens `[B, n]` after each left-padded prompt (n <= max_new_tokens: the steps this
    rank's rows needed; a row that ended early is filled with `pad_token_id` after its EOS).

    `sampling=None` decodes greedily. `keys_B` are the rows' global example keys (default
    0..B-1); `routing` is a teacher routing policy (MoETeacher only). `lockstep_group`: the
    ranks whose forwards are collective (None: this rank decodes alone).
    """
    from ds_moekd.teacher import MoETeacher

    batch, device = input_ids_BS.shape[0], input_ids_BS.device
    is_teacher = isinstance(model, MoETeacher)
    if routing is not None and not is_teacher:
        raise ValueError("a routing policy applies to the expert-parallel teacher (MoETeacher) only")
    keys_B = torch.arange(batch, device=device) if keys_B is None else keys_B.to(device)
    if is_teacher and lockstep_group is None:
        lockstep_group = model.groups.ep_group  # its MoE layers are collective over the EP group
    mask_BS = attention_mask_BS
    cache = DynamicCache(config=model.config)
    position_BS = (mask_BS.cumsum(-1) - 1).clamp(min=0)

    def forward(ids_BS, position_ids_BS):
        if is_teacher:
            out = model(ids_BS, mask_BS, position_ids_BS, routing=routing, sequence_index=keys_B, cache=cache,
                        logits_to_keep=1)
        else:
            with torch_linear():
                out = model(input_ids=ids_BS, attention_mask=mask_BS, position_ids=position_ids_BS, cache=cache,
                            use_cache=True, logits_to_keep=1)
        return out.logits[:, -1]

    logits_BV = forward(input_ids_BS, position_BS)
    next_position_B = position_BS[:, -1] + 1
    done_B = torch.zeros(batch, dtype=torch.bool, device=device)
    new_tokens: list[torch.Tensor] = []
    while True:
        if len(new_tokens) < max_new_tokens and not bool(done_B.all()):
            next_B = sample_tokens(logits_BV, sampling, seed=seed, step=step, keys_B=keys_B,
                                   positions_B=next_position_B, vocab_limit=vocab_limit)
            next_B = torch.where(done_B, torch.full_like(next_B, pad_token_id), next_B)
            new_tokens.append(next_B)
            if eos_token_id is not None:
                done_B |= next_B == eos_token_id
            feed_B = next_B
        else:  # this rank is done: a dummy step keeps the group's collectives matched
            feed_B = torch.full((batch,), pad_token_id, dtype=input_ids_BS.dtype, device=device)
        more = len(new_tokens) < max_new_tokens and not bool(done_B.all())
        if not group_max(int(more), lockstep_group, device):  # no rank of the group decodes any more
            break
        mask_BS = torch.cat([mask_BS, torch.ones_like(mask_BS[:, :1])], dim=1)
        logits_BV = forward(feed_B[:, None], next_position_B[:, None])
        next_position_B = next_position_B + 1
    if not new_tokens:
        return input_ids_BS.new_zeros(batch, 0)
    return torch.stack(new_tokens, dim=1)


def group_max(value: int, group: dist.ProcessGroup | None, device: torch.device | str = "cpu") -> int:
    """The largest `value` over the ranks of `group` (every rank calls this; None: this rank alone)."""
    if group is None:
        return value
    value_1 = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(value_1, op=dist.ReduceOp.MAX, group=group)
    return int(value_1.item())


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id rows as a left-padded `[B, S]` batch and its attention mask."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    return ids, mask


def cut_at_eos(ids: list[int], eos_token_id: int, *, keep_eos: bool) -> list[int]:
    """The tokens up to the first EOS (inclusive when `keep_eos`), or all of them."""
    if eos_token_id not in ids:
        return ids
    end = ids.index(eos_token_id)
    return ids[: end + 1] if keep_eos else ids[:end]
