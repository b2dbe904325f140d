"""Left-padded prompt tensors in, prompt plus new tokens out: the teacher through the project's decoder.

transformers' `generate` takes and returns tensors; the decoder (ds_moekd/decoding.py) takes token-id
lists and returns each row's new tokens. This shapes one like the other for tests that compare them.
"""

from __future__ import annotations

import torch

from ds_moekd.decoding import Decoding, decode
from ds_moekd.runtime.rng import Sampling


def teacher_generate(teacher, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                     max_new_tokens: int, routing=None, do_sample: bool = False, temperature: float = 1.0,
                     seed: int = 0, pad_token_id: int = 0, sequence_index: torch.Tensor | None = None,
                     vocab_limit: int | None = None) -> torch.Tensor:
    """`[B, S + max_new_tokens]`: the prompts and the teacher's new tokens (no EOS: every row decodes
    `max_new_tokens`). Every rank of the teacher's EP group calls this."""
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    prompts = [row[keep.bool()].tolist() for row, keep in zip(input_ids, mask, strict=True)]
    keys = torch.arange(len(prompts)) if sequence_index is None else sequence_index
    decoding = Decoding(max_new_tokens=max_new_tokens, sampling=Sampling(temperature=temperature) if do_sample else None,
                        seed=seed, eos_token_id=None, pad_token_id=pad_token_id, vocab_limit=vocab_limit)
    new = decode(teacher.decoding_forward(routing), prompts, keys.tolist(), decoding)
    return torch.cat([input_ids, torch.tensor(new, dtype=input_ids.dtype).reshape(len(prompts), -1)], dim=1)
