"""This rank's endless stream of training micro-batches: a seeded permutation per epoch, split over
data-parallel ranks and accumulation steps, of examples (data/batching.py) or packed rows
(data/packing.py).

A global batch is `micro_batch_size * dp_size` rows drawn from one seeded permutation; rank r takes
its contiguous slice. So a 2-rank run sees exactly the examples a 1-rank run with twice the
micro-batch sees, which is what makes the 2-rank == 1-rank loss tests meaningful.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import torch

from ds_moekd.data.batching import Batch, TokenizedDataset, collate
from ds_moekd.data.packing import collate_packed


def micro_batches_per_epoch(rows: int, *, micro_batch_size: int, dp_size: int, accumulation: int = 1) -> int:
    """Micro-batches one rank takes per pass over `rows` examples or packed rows (the ragged tail, short
    of a whole optimizer step of `accumulation` micro-batches, is dropped)."""
    return rows // (micro_batch_size * dp_size * accumulation) * accumulation


def rank_batches(
    dataset: TokenizedDataset,
    *,
    micro_batch_size: int,
    dp_rank: int,
    dp_size: int,
    seed: int,
    pad_token_id: int,
    packs: list[list[int]] | None = None,
    accumulation: int = 1,
) -> Iterator[Batch]:
    """Endless stream of this rank's micro-batches; a fresh seeded permutation every epoch. With
    `packs` (data/packing.py) a row is one pack of examples and the permutation is over packs.
    An epoch ends on a whole optimizer step (`accumulation` micro-batches), so every step draws the
    same examples for any split of its global batch into ranks, micro-batches and accumulation
    (what keeps a resume at another world size on the same data, ds_moekd/run/elastic.py)."""
    n, global_batch = len(packs if packs is not None else dataset.examples), micro_batch_size * dp_size
    if n < global_batch * accumulation:
        what = "packed rows" if packs is not None else "training examples"
        raise ValueError(f"{n} {what} cannot fill one global batch of {global_batch * accumulation}")
    for epoch in itertools.count():
        generator = torch.Generator().manual_seed(seed + epoch)
        order = torch.randperm(n, generator=generator).tolist()
        for start in range(0, n - n % (global_batch * accumulation), global_batch):  # drop the ragged tail
            mine = order[start + dp_rank * micro_batch_size : start + (dp_rank + 1) * micro_batch_size]
            if packs is None:
                yield collate([dataset.examples[i] for i in mine], pad_token_id, example_ids=mine)
            else:
                yield collate_packed([[dataset.examples[i] for i in packs[j]] for j in mine], pad_token_id, mine)
