"""Decode one rank's share of prompts, alone or in lockstep with other ranks.

Two decoders, both with a KV cache: a Hugging Face model's own `generate`, and the expert-parallel
`MoETeacher.generate`. Both sample by one counter-based rule (`sampling.py`) keyed by each prompt's
global index, so the text of a prompt does not depend on batching, sharding or the decoder.

Lockstep: ranks whose forwards are collective (an EP teacher's MoE layers exchange tokens; a
ZeRO-3 student gathers its parameters) must run the same forwards. They run the same number of
batches (a rank out of prompts decodes a dummy row and discards it), and every batch steps until
every rank's batch is done (`synced_gpus` in transformers; `MoETeacher.generate` does it itself).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from transformers import LogitsProcessorList

from ds_moekd.eval.sampling import CounterSampler


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
        args = (ids.to(device), mask.to(device), keys_B.to(device), decoding, tokenizer)
        new_BN = _teacher_generate(model, *args, routing) if is_teacher else _hf_generate(model, *args, lockstep_group)
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
        processors.append(CounterSampler(decoding.seed, keys_B, mask, decoding.temperature, len(tokenizer)))
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


def _teacher_generate(teacher, ids, mask, keys_B, decoding: Decoding, tokenizer, routing) -> torch.Tensor:
    out = teacher.generate(
        ids, mask, max_new_tokens=decoding.max_new_tokens, do_sample=decoding.seed is not None,
        temperature=decoding.temperature, seed=decoding.seed or 0, routing=routing,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        sequence_index=keys_B,  # the prompt's global index: its sampling and KA routing keys
        vocab_limit=len(tokenizer),
    )
    return out[:, ids.shape[1]:]
