"""Tokenise instruction records and collate them into padded micro-batches (`Batch`); which rows
each rank gets per step is data/stream.py's job."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ds_moekd.data.chat import end_with_eos, prompt_text, response_text
from ds_moekd.data.instructions import InstructionRecord


@dataclass(frozen=True)
class TokenizedExample:
    prompt_ids: list[int]
    response_ids: list[int]  # ends with EOS unless truncated


@dataclass(frozen=True)
class TokenizedDataset:
    examples: list[TokenizedExample]
    dropped_long_prompts: int  # prompts over the limit, dropped and counted (docs/data.md)


def tokenize_records(
    records: Sequence[InstructionRecord], tokenizer, *, max_prompt_tokens: int, max_response_tokens: int,
    template: str = "alpaca",
) -> TokenizedDataset:
    """Prompt and response text (data/chat.py) tokenised separately, so their boundary is a token boundary."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token: responses must end with one")
    prompt_texts = [prompt_text(r, tokenizer, template) for r in records]
    # One batched call per side: fast tokenizers encode a list in parallel, a loop would not.
    prompts = tokenizer(prompt_texts, add_special_tokens=False)
    responses = tokenizer([response_text(r, tokenizer, p) for r, p in zip(records, prompt_texts, strict=True)],
                          add_special_tokens=False)
    examples, dropped = [], 0
    for prompt_ids, response_ids in zip(prompts["input_ids"], responses["input_ids"], strict=True):
        if len(prompt_ids) > max_prompt_tokens:
            dropped += 1
            continue
        response_ids = end_with_eos(response_ids, tokenizer.eos_token_id)[:max_response_tokens]
        examples.append(TokenizedExample(prompt_ids, response_ids))
    if not examples:
        raise ValueError(f"every one of {len(records)} prompts is longer than max_prompt_tokens={max_prompt_tokens}")
    return TokenizedDataset(examples, dropped)


@dataclass
class Batch:
    """Right-padded prompt+response sequences for teacher-forcing."""

    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T] 1 = real token
    loss_mask: torch.Tensor  # [B, T-1] 1 where position t predicts a response token t+1
    # Each row's global example id (its index in the training data): the key of every random
    # choice made for it (rollout sampling, KA draws, gate noise; ds_moekd/runtime/rng.py).
    example_ids: torch.Tensor  # [B] int64
    prompt_lengths: torch.Tensor  # [B] int64
    # Packed rows (data/packing.py): positions restarting at each example; the model then gets no mask.
    position_ids: torch.Tensor | None = None  # [B, T]

    def model_inputs(self, repeat: int = 1) -> dict:
        """Keyword arguments of a causal LM's (or the teacher's) forward, the batch stacked `repeat` times."""
        if self.position_ids is None:
            return {"input_ids": self.input_ids.repeat(repeat, 1), "attention_mask": self.attention_mask.repeat(repeat, 1)}
        return {"input_ids": self.input_ids.repeat(repeat, 1), "attention_mask": None,
                "position_ids": self.position_ids.repeat(repeat, 1)}

    def response_rows(self, x_BSD: torch.Tensor) -> torch.Tensor:
        """Rows of `x` (logits or hidden states `[B, S, D]`) at positions that predict response tokens, `[N, D]`."""
        return x_BSD[:, :-1][self.loss_mask.bool()]

    def no_logits(self) -> torch.Tensor:
        """`logits_to_keep` value that makes a Hugging Face causal LM skip its lm_head (no positions)."""
        return torch.empty(0, dtype=torch.long, device=self.input_ids.device)

    def prompts(self) -> list[list[int]]:
        return [row[:n].tolist() for row, n in zip(self.input_ids, self.prompt_lengths.tolist(), strict=True)]

    def responses(self) -> list[list[int]]:
        ends = self.attention_mask.sum(dim=1).tolist()
        return [row[n:end].tolist() for row, n, end in
                zip(self.input_ids, self.prompt_lengths.tolist(), ends, strict=True)]

    def to(self, device: torch.device | str) -> Batch:
        """The batch on `device` (batches are built on the CPU, then moved to the rank's device)."""
        moved = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return Batch(**{name: t.to(device) if isinstance(t, torch.Tensor) else t for name, t in moved.items()})

    @property
    def targets(self) -> torch.Tensor:  # [B, T-1]
        return self.input_ids[:, 1:]

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())


def collate(examples: Sequence[TokenizedExample], pad_token_id: int, example_ids: Sequence[int] | None = None) -> Batch:
    """`example_ids`: the rows' global ids (default 0..B-1; training passes dataset indices)."""
    seqs = [ex.prompt_ids + ex.response_ids for ex in examples]
    length = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), length), dtype=torch.long)
    loss_mask = torch.zeros((len(seqs), length - 1), dtype=torch.float32)
    for i, (ex, seq) in enumerate(zip(examples, seqs, strict=True)):
        input_ids[i, : len(seq)] = torch.tensor(seq)
        attention_mask[i, : len(seq)] = 1
        # position t predicts token t+1: response tokens sit at [len(prompt), len(seq))
        loss_mask[i, len(ex.prompt_ids) - 1 : len(seq) - 1] = 1
    ids = range(len(examples)) if example_ids is None else example_ids
    prompt_lengths = torch.tensor([len(ex.prompt_ids) for ex in examples], dtype=torch.long)
    return Batch(input_ids, attention_mask, loss_mask, torch.tensor(list(ids), dtype=torch.long), prompt_lengths)
