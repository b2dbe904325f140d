"""Decode one rank's share of prompts as text, alone or in lockstep with other ranks.

A thin wrapper over the project's one decoder (ds_moekd/decoding.py): prompts are batched in
order of length, decoded to token ids (any model: a Hugging Face student, a ZeRO-3 engine's
module, the expert-parallel teacher with a routing policy), cut at EOS and detokenised. Sampling
is keyed by each prompt's global index, so the text of a prompt does not depend on batching,
sharding or the model wrapper. Ranks whose forwards are collective run the same number of
batches (a rank out of prompts decodes a dummy row and discards it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ds_moekd.decoding import cut_at_eos, decode_ids, group_max, left_pad
from ds_moekd.rng import Sampling


@dataclass(frozen=True)
class Decoding:
    max_new_tokens: int
    seed: int | None  # None: greedy
    temperature: float = 1.0
    batch_size: int = 16


def decode_shard(model, tokenizer, prompts: list[list[int]], keys: list[int], decoding: Decoding, *,
                 lockstep_group=None, routing=None, on_batch: Callable[[], None] | None = None) -> list[str]:
    """Continuations (cut at EOS, decoded without special tokens) of token-id `prompts`, in order.

    `keys` are the prompts' global indices (sampling keys); `lockstep_group` the ranks that must
    decode together (None: this rank decodes alone); `routing` a teacher routing policy.
    """
    if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer needs pad and eos tokens for batched generation")
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # less padding per batch
    batches = [order[s:s + decoding.batch_size] for s in range(0, len(order), decoding.batch_size)]
    device = next(model.parameters()).device
    texts: list[str] = [""] * len(prompts)
    for b in range(group_max(len(batches), lockstep_group, device)):
        rows = batches[b] if b < len(batches) else []
        ids, mask = left_pad([prompts[i] for i in rows] or [[tokenizer.eos_token_id]], tokenizer.pad_token_id)
        keys_B = torch.tensor([keys[i] for i in rows] or [-1], dtype=torch.long, device=device)
        new_BN = decode_ids(
            model, ids.to(device), mask.to(device), max_new_tokens=decoding.max_new_tokens,
            sampling=None if decoding.seed is None else Sampling(temperature=decoding.temperature),
            seed=decoding.seed or 0, keys_B=keys_B, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, vocab_limit=len(tokenizer), lockstep_group=lockstep_group,
            routing=routing,
        )
        for r, i in enumerate(rows):
            texts[i] = tokenizer.decode(cut_at_eos(new_BN[r].tolist(), tokenizer.eos_token_id, keep_eos=False),
                                        skip_special_tokens=True)
        if on_batch is not None and rows:
            on_batch()
    return texts
