import pytest
import torch

from ds_moekd.data.batching import TokenizedDataset, TokenizedExample, collate, tokenize_records
from ds_moekd.data.instructions import InstructionRecord
from ds_moekd.data.stream import rank_batches


def test_collate_masks_exactly_the_response_predictions():
    batch = collate([TokenizedExample([5, 6, 7], [8, 9]), TokenizedExample([5], [4, 3, 2])], pad_token_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 9], [5, 4, 3, 2, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    # loss positions t predict tokens t+1; only response tokens are predicted
    assert batch.targets[batch.loss_mask.bool()].tolist() == [8, 9, 4, 3, 2]


def _dataset(n):
    return TokenizedDataset([TokenizedExample([i], [i + 100, 1]) for i in range(n)], 0)


def test_ranks_split_the_global_batch_of_a_single_rank_run():
    single = rank_batches(_dataset(20), micro_batch_size=4, dp_rank=0, dp_size=1, seed=3, pad_token_id=0)
    ranks = [rank_batches(_dataset(20), micro_batch_size=2, dp_rank=r, dp_size=2, seed=3, pad_token_id=0)
             for r in range(2)]
    for _ in range(12):  # crosses epoch boundaries
        whole = next(single).input_ids
        torch.testing.assert_close(torch.cat([next(r).input_ids for r in ranks]), whole)


def test_too_small_dataset_is_an_error():
    with pytest.raises(ValueError, match="cannot fill one global batch"):
        next(rank_batches(_dataset(3), micro_batch_size=2, dp_rank=0, dp_size=2, seed=0, pad_token_id=0))


class _CharTokenizer:
    eos_token_id = 1

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[ord(c) % 50 + 2 for c in text] for text in texts]}


def test_long_prompts_are_dropped_and_counted():
    records = [InstructionRecord("short", "", ("a",)), InstructionRecord("x" * 1000, "", ("b",))]
    data = tokenize_records(records, _CharTokenizer(), max_prompt_tokens=200, max_response_tokens=8)
    assert len(data.examples) == 1 and data.dropped_long_prompts == 1
    assert data.examples[0].response_ids[-1] == 1  # ends with EOS
