"""Sequence packing: rows hold whole examples, and packed forwards equal unpadded, unpacked ones for
the student (transformers' own model, sdpa and eager attention) and the MoE teacher."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ds_moekd.data.batching import collate, tokenize_records
from ds_moekd.data.formats import load_eval_data
from ds_moekd.data.packing import collate_packed, pack
from ds_moekd.data.stream import rank_batches
from ds_moekd.modelfiles.assets import resolve_path

MAX_TOKENS = 160


@pytest.fixture(scope="module")
def dataset():
    tokenizer = AutoTokenizer.from_pretrained(resolve_path("demo:student"))
    records = load_eval_data(str(resolve_path("demo:data/valid.jsonl"))).records[:24]
    return tokenize_records(records, tokenizer, max_prompt_tokens=96, max_response_tokens=64), tokenizer


def test_pack_keeps_every_example_whole_and_rows_within_the_limit(dataset):
    data, _ = dataset
    rows = pack(data.examples, MAX_TOKENS)
    assert sorted(i for row in rows for i in row) == list(range(len(data.examples)))
    lengths = [sum(len(data.examples[i].prompt_ids) + len(data.examples[i].response_ids) for i in row) for row in rows]
    assert max(lengths) <= MAX_TOKENS and len(rows) < len(data.examples)  # several examples per row
    assert rows == pack(data.examples, MAX_TOKENS)
    with pytest.raises(ValueError, match="more than a packed row's 10"):
        pack(data.examples, 10)


def per_example_rows(model, batch, examples):
    """Response-position logits of each example, forward by forward (the reference: one unpadded sequence each)."""
    return [model(**collate([ex], 0).model_inputs()).logits[0, len(ex.prompt_ids) - 1 : -1] for ex in examples]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_student_forward_equals_unpacked(dataset, attention):
    data, tokenizer = dataset
    model = AutoModelForCausalLM.from_pretrained(resolve_path("demo:student"), dtype=torch.float32,
                                                 attn_implementation=attention).eval()
    model.config.use_cache = False  # as in training (student/engine.py): with a cache transformers ignores packing
    rows = pack(data.examples, MAX_TOKENS)[:4]
    batch = collate_packed([[data.examples[i] for i in row] for row in rows], tokenizer.pad_token_id, range(4))
    with torch.no_grad():
        packed = batch.response_rows(model(**batch.model_inputs()).logits)
        reference = torch.cat(per_example_rows(model, batch, [data.examples[i] for row in rows for i in row]))
    assert packed.shape == reference.shape
    torch.testing.assert_close(packed, reference, atol=2e-4, rtol=1e-4)
    # The loss (mean CE over response tokens) is the same number.
    targets = batch.targets[batch.loss_mask.bool()]
    ref_targets = torch.cat([torch.tensor(data.examples[i].response_ids) for row in rows for i in row])
    assert torch.equal(targets, ref_targets)
    torch.testing.assert_close(torch.nn.functional.cross_entropy(packed, targets),
                               torch.nn.functional.cross_entropy(reference, ref_targets), atol=1e-5, rtol=1e-5)


def test_packed_teacher_forward_equals_unpacked(dataset):
    from ds_moekd.teacher import MoETeacher

    data, tokenizer = dataset
    teacher = MoETeacher.from_pretrained(resolve_path("demo:teacher"))
    rows = pack(data.examples, MAX_TOKENS)[:3]
    batch = collate_packed([[data.examples[i] for i in row] for row in rows], tokenizer.pad_token_id, range(3))
    with torch.no_grad():
        packed = batch.response_rows(teacher(**batch.model_inputs()).logits)
        reference = torch.cat(per_example_rows(teacher, batch, [data.examples[i] for row in rows for i in row]))
    torch.testing.assert_close(packed, reference, atol=2e-4, rtol=1e-4)


def test_packed_stream_covers_every_pack_once_per_epoch(dataset):
    data, tokenizer = dataset
    rows = pack(data.examples, MAX_TOKENS)
    stream = rank_batches(data, micro_batch_size=2, dp_rank=0, dp_size=1, seed=0, pad_token_id=0, packs=rows)
    seen = [i for _ in range(len(rows) // 2) for i in next(stream).example_ids.tolist()]
    assert len(set(seen)) == len(seen) == len(rows) // 2 * 2  # one epoch: each pack at most once
