"""Sequence packing (`data.packing`): several prompt+response examples share one row.

A packed row carries `position_ids` that restart at 0 for every example (and for the padding after
the last one) and no attention mask: transformers then builds a block-diagonal causal mask from the
restarts (sdpa, eager and flex attention) or runs flash attention's variable-length kernel, so no
token attends across examples. transformers skips that detection when the model keeps a KV cache,
so the training student runs with `use_cache=False` (student/engine.py). The loss mask covers each example's response only, so an example's
EOS never learns to predict the next example's first token (docs/data.md).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import torch

from ds_moekd.data.batching import Batch, TokenizedExample


def pack(examples: Sequence[TokenizedExample], max_tokens: int) -> list[list[int]]:
    """Example indices grouped into rows of at most `max_tokens` tokens: best-fit decreasing (longest
    first, each into the fullest row it fits), which fills rows tightly; deterministic."""
    lengths = [len(ex.prompt_ids) + len(ex.response_ids) for ex in examples]
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (tokens left, row index), sorted
    for i in sorted(range(len(examples)), key=lambda i: (-lengths[i], i)):
        if lengths[i] > max_tokens:
            raise ValueError(f"example {i} has {lengths[i]} tokens, more than a packed row's {max_tokens}")
        slot = bisect.bisect_left(free, (lengths[i], -1))
        if slot == len(free):
            rows.append([i])
            left, row = max_tokens - lengths[i], len(rows) - 1
        else:
            left, row = free.pop(slot)
            rows[row].append(i)
            left -= lengths[i]
        bisect.insort(free, (left, row))
    return rows


def collate_packed(rows: Sequence[Sequence[TokenizedExample]], pad_token_id: int, example_ids: Sequence[int]) -> Batch:
    """One micro-batch of packed rows; `example_ids` are the rows' pack indices."""
    length = max(sum(len(ex.prompt_ids) + len(ex.response_ids) for ex in row) for row in rows)
    input_ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    position_ids = torch.zeros((len(rows), length), dtype=torch.long)
    loss_mask = torch.zeros((len(rows), length - 1), dtype=torch.float32)
    for r, row in enumerate(rows):
        start = 0
        for ex in row:
            seq = ex.prompt_ids + ex.response_ids
            end = start + len(seq)
            input_ids[r, start:end] = torch.tensor(seq)
            position_ids[r, start:end] = torch.arange(len(seq))
            loss_mask[r, start + len(ex.prompt_ids) - 1 : end - 1] = 1
            start = end
        attention_mask[r, :start] = 1
        position_ids[r, start:] = torch.arange(length - start)  # the padding is a sequence of its own
    prompt_lengths = torch.tensor([len(row[0].prompt_ids) for row in rows], dtype=torch.long)
    return Batch(input_ids, attention_mask, loss_mask, torch.tensor(list(example_ids), dtype=torch.long),
                 prompt_lengths, position_ids=position_ids)
