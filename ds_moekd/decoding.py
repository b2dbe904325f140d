"""The one decoder: responses to token-id prompts, with a KV cache, alone or in lockstep (docs/rollouts.md).

`decode` serves on-policy rollouts (ds_moekd/student/rollout.py), sequence-level KD's teacher
responses, evaluation and validation (ds_moekd/eval/runner.py) and the demo's scores. It knows no
model class: it calls a `Forward`, which a Hugging Face model gets from `HFForward` and the
expert-parallel teacher from `MoETeacher.decoding_forward(routing)`.

Tokens are drawn by `ds_moekd.runtime.rng.sample_tokens`, keyed by (seed, step, the row's example key,
position counting real tokens only), so a row's tokens do not depend on which rows share its
batch, the padding, the number of ranks or the model wrapper.

Lockstep: when a forward is collective (the teacher's MoE layers exchange tokens over the EP
group; a partitioned ZeRO-3 student gathers each layer's parameters over the data-parallel group),
every rank of the forward's `lockstep_group` must run the same number of forwards. The group agrees
(all-reduce MAX) on the number of batches and, after each step, on whether any rank still decodes;
a rank that is done feeds padding (or a dummy row) whose outputs it ignores. So ranks with
different numbers of prompts, or responses of different lengths, never deadlock.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.distributed as dist
from transformers import DynamicCache

from ds_moekd.runtime.rng import Sampling, sample_tokens
from ds_moekd.student.zero3 import torch_linear


class Forward(Protocol):
    """What the decoder needs of a model. A call runs the model on `input_ids_BS` (first the whole
    left-padded prompts, then one new token per row), with `attention_mask_BS` covering the cached
    tokens too, and returns the last position's logits `[B, V]` and the KV cache (`cache` is None on
    the first call: the forward makes one). `keys_B` are the rows' example keys (a teacher keys its
    routing draws by them)."""

    device: torch.device
    lockstep_group: dist.ProcessGroup | None  # the ranks whose forwards are collective; None: alone

    def __call__(self, input_ids_BS: torch.Tensor, attention_mask_BS: torch.Tensor, position_ids_BS: torch.Tensor,
                 keys_B: torch.Tensor, cache: Any) -> tuple[torch.Tensor, Any]: ...


class HFForward:
    """A Hugging Face causal LM as a `Forward`: a plain model, or the partitioned module of a ZeRO-3
    engine with its data-parallel group as `lockstep_group` (each forward gathers its layers)."""

    def __init__(self, model: torch.nn.Module, lockstep_group: dist.ProcessGroup | None = None):
        self.model, self.lockstep_group = model, lockstep_group
        self.device = next(model.parameters()).device

    def __call__(self, input_ids_BS, attention_mask_BS, position_ids_BS, keys_B, cache):
        cache = DynamicCache(config=self.model.config) if cache is None else cache
        with torch_linear():
            out = self.model(input_ids=input_ids_BS, attention_mask=attention_mask_BS, position_ids=position_ids_BS,
                             cache=cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1], cache


@dataclass(frozen=True, kw_only=True)
class Decoding:
    max_new_tokens: int
    sampling: Sampling | None  # None: greedy
    eos_token_id: int | None
    pad_token_id: int
    vocab_limit: int | None = None  # the tokenizer's length: padded lm_head rows are never drawn
    seed: int = 0
    step: int = 0
    batch_size: int | None = None  # prompts per batch, taken in order of length; None: all in one batch


# no_grad, not inference_mode: synced validation decodes with the live ZeRO-3 module, and parameters
# gathered under inference mode become inference tensors that the next training backward cannot save.
@torch.no_grad()
def decode(forward: Forward, prompts: list[list[int]], keys: list[int], decoding: Decoding, *,
           on_batch: Callable[[], None] | None = None) -> list[list[int]]:
    """Each prompt's new tokens, in the prompts' order: up to and including the first EOS, or
    `max_new_tokens` of them. `keys` are the prompts' example keys (global indices: sampling keys).

    Every rank of `forward.lockstep_group` calls this, with or without prompts of its own.
    `on_batch` is called after each batch that held prompts of this rank."""
    device = forward.device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # less padding per batch
    size = decoding.batch_size or max(1, len(prompts))
    batches = [order[s:s + size] for s in range(0, len(order), size)]
    filler = decoding.pad_token_id if decoding.eos_token_id is None else decoding.eos_token_id
    responses: list[list[int]] = [[] for _ in prompts]
    for b in range(group_max(len(batches), forward.lockstep_group, device)):
        rows = batches[b] if b < len(batches) else []  # none left: a dummy row keeps the group's forwards matched
        ids, mask = left_pad([prompts[i] for i in rows] or [[filler]], decoding.pad_token_id)
        keys_B = torch.tensor([keys[i] for i in rows] or [-1], dtype=torch.long, device=device)
        new_BN = _decode_batch(forward, ids.to(device), mask.to(device), keys_B, decoding)
        for r, i in enumerate(rows):
            responses[i] = cut_at_eos(new_BN[r].tolist(), decoding.eos_token_id)
        if on_batch is not None and rows:
            on_batch()
    return responses


def _decode_batch(forward: Forward, input_ids_BS: torch.Tensor, mask_BS: torch.Tensor, keys_B: torch.Tensor,
                  decoding: Decoding) -> torch.Tensor:
    """New tokens `[B, n]` after each left-padded prompt (n <= max_new_tokens: the steps this rank's
    rows needed; a row that ended early is filled with the pad token after its EOS)."""
    batch, device = input_ids_BS.shape[0], input_ids_BS.device
    position_BS = (mask_BS.cumsum(-1) - 1).clamp(min=0)
    logits_BV, cache = forward(input_ids_BS, mask_BS, position_BS, keys_B, None)
    next_position_B = position_BS[:, -1] + 1
    done_B = torch.zeros(batch, dtype=torch.bool, device=device)
    new_tokens: list[torch.Tensor] = []
    while True:
        if len(new_tokens) < decoding.max_new_tokens and not bool(done_B.all()):
            next_B = sample_tokens(logits_BV, decoding.sampling, seed=decoding.seed, step=decoding.step, keys_B=keys_B,
                                   positions_B=next_position_B, vocab_limit=decoding.vocab_limit)
            next_B = torch.where(done_B, torch.full_like(next_B, decoding.pad_token_id), next_B)
            new_tokens.append(next_B)
            if decoding.eos_token_id is not None:
                done_B |= next_B == decoding.eos_token_id
            feed_B = next_B
        else:  # this rank is done: a dummy step keeps the group's collectives matched
            feed_B = torch.full((batch,), decoding.pad_token_id, dtype=input_ids_BS.dtype, device=device)
        more = len(new_tokens) < decoding.max_new_tokens and not bool(done_B.all())
        if not group_max(int(more), forward.lockstep_group, device):  # no rank of the group decodes any more
            break
        mask_BS = torch.cat([mask_BS, torch.ones_like(mask_BS[:, :1])], dim=1)
        logits_BV, cache = forward(feed_B[:, None], mask_BS, next_position_B[:, None], keys_B, cache)
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


def cut_at_eos(ids: list[int], eos_token_id: int | None) -> list[int]:
    """The tokens up to and including the first EOS, or all of them."""
    if eos_token_id is None or eos_token_id not in ids:
        return ids
    return ids[: ids.index(eos_token_id) + 1]
