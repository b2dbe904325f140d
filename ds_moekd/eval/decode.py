"""Decode one rank's share of prompts, alone or in lockstep with other ranks.

Two decoders: a Hugging Face model's own `generate` (KV cache), and a step loop for the
expert-parallel `MoETeacher`, which has no `generate` yet (a full forward per new token, no KV
cache: slow on long outputs, exact). Sampling is counter-based (`sampling.py`), keyed by each
prompt's global index, so the text of a prompt does not depend on batching or sharding.

Lockstep: ranks whose forwards are collective (an EP teacher's MoE layers exchange tokens; a
ZeRO-3 student gathers its parameters) must run the same forwards. They run the same number of
batches (a rank out of prompts decodes a dummy row and discards it), and every batch steps until
every rank's batch is done (`synced_gpus` in `generate`; an all-reduce per step in the loop).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from transformers import LogitsProcessorList

from ds_moekd.eval.sampling import CounterSampler, sample_next


@dataclass(frozen=True)
class Decoding:
    max_new_tokens: int
    seed: int | None  # None: greedy
    temperature: float = 1.0
    batch_size: int = 16


def _group_max(value: int, group) -> int:
    if group is None:
        return value
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return int(t.item())


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    return ids, mask


def decode_shard(model, tokenizer, prompts: list[list[int]], keys: list[int], decoding: Decoding, *,
                 lockstep_group=None, routing=None, on_batch: Callable[[], None] | None = None) -> list[str]:
    """Continuations (cut at EOS, decoded without special tokens) of token-id `prompts`, in order.

    `keys` are the prompts' global indices (sampling keys); `lockstep_group` the ranks that must
    decode together (None: this rank decodes alone); `routing` a teacher routing policy.
    """
    from ds_moekd.teacher import MoETeacher

    if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer needs pad and eos tokens for batched generation")
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # less padding per batch
    batches = [order[s:s + decoding.batch_size] for s in range(0, len(order), decoding.batch_size)]
    is_teacher = isinstance(model, MoETeacher)
    if routing is not None and not is_teacher:
        raise ValueError("a routing policy applies to the expert-parallel teacher (MoETeacher) only")
    device = next(model.parameters()).device
    texts: list[str] = [""] * len(prompts)
    for b in range(_group_max(len(batches), lockstep_group)):
        rows = batches[b] if b < len(batches) else []
        ids, mask = left_pad([prompts[i] for i in rows] or [[tokenizer.eos_token_id]], tokenizer.pad_token_id)
        keys_B = torch.tensor([keys[i] for i in rows] or [-1], dtype=torch.long)
        args = (ids.to(device), mask.to(device), keys_B, decoding, tokenizer, lockstep_group)
        new_BN = _step_loop(model, *args, routing, finished=not rows) if is_teacher else _hf_generate(model, *args)
        for r, i in enumerate(rows):
            new_ids = new_BN[r].tolist()
            if tokenizer.eos_token_id in new_ids:
                new_ids = new_ids[:new_ids.index(tokenizer.eos_token_id)]
            texts[i] = tokenizer.decode(new_ids, skip_special_tokens=True)
        if on_batch is not None and rows:
            on_batch()
    return texts


def _hf_generate(model, ids, mask, keys_B, decoding: Decoding, tokenizer, lockstep_group) -> torch.Tensor:
    processors = LogitsProcessorList()
    if decoding.seed is not None:
        processors.append(CounterSampler(decoding.seed, keys_B, ids.shape[1], decoding.temperature, len(tokenizer)))
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=decoding.max_new_tokens, do_sample=False,
            logits_processor=processors, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            synced_gpus=lockstep_group is not None, use_cache=True,
            # Neutralise logits processors a checkpoint's generation_config may switch on: the protocol
            # samples from the model's own distribution.
            num_beams=1, repetition_penalty=1.0, no_repeat_ngram_size=0, min_new_tokens=0,
        )
    return out[:, ids.shape[1]:]


def _step_loop(teacher, ids, mask, keys_B, decoding: Decoding, tokenizer, lockstep_group, routing, *,
               finished: bool) -> torch.Tensor:
    """Decode with full forwards; a row that emitted EOS gets padding from then on."""
    done_B = torch.full((ids.shape[0],), finished, dtype=torch.bool, device=ids.device)
    new_tokens = []
    with torch.inference_mode():
        for step in range(decoding.max_new_tokens):
            if _group_max(int(not bool(done_B.all())), lockstep_group) == 0:
                break
            position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # as HF generate does for left padding
            logits_BV = teacher(ids, attention_mask=mask, position_ids=position_ids, routing=routing,
                                sequence_index=keys_B.clamp(min=0).to(ids.device)).logits[:, -1]
            if decoding.seed is None:
                next_B = logits_BV[:, :len(tokenizer)].argmax(dim=-1)
            else:
                next_B = sample_next(logits_BV, decoding.seed, keys_B, step, decoding.temperature, len(tokenizer))
            next_B = torch.where(done_B, torch.full_like(next_B, tokenizer.pad_token_id), next_B)
            new_tokens.append(next_B)
            ids = torch.cat([ids, next_B[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            done_B |= next_B == tokenizer.eos_token_id
    if not new_tokens:
        return ids[:, :0]
    return torch.stack(new_tokens, dim=1)
