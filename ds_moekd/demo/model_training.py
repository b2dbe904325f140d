"""A small, deterministic supervised fine-tuning loop for the demo models (CPU).

Sequences are prompt + response + EOS, without BOS; the loss covers the response tokens and the
EOS only. Steps, not wall-clock, bound every stage, so a build is reproducible.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from ds_moekd.data.template import alpaca_prompt


@dataclass(frozen=True)
class Stage:
    steps: int
    batch_size: int
    lr: float
    warmup: int


def encode_records(records: list[dict], tokenizer) -> list[tuple[list[int], int]]:
    """(token ids, prompt length) per record; prompt and response are tokenized separately."""
    encoded = []
    for record in records:
        prompt = tokenizer(alpaca_prompt(record["instruction"], record["input"]), add_special_tokens=False)
        response = tokenizer(record["output"], add_special_tokens=False)
        encoded.append((prompt["input_ids"] + response["input_ids"] + [tokenizer.eos_token_id],
                        len(prompt["input_ids"])))
    return encoded


def _batch(examples: list[tuple[list[int], int]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (ids, prompt_len) in enumerate(examples):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        labels[row, prompt_len:len(ids)] = torch.tensor(ids[prompt_len:])
        attention_mask[row, :len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def _lr_factor(step: int, stage: Stage) -> float:
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step < stage.warmup:
        return (step + 1) / stage.warmup
    progress = (step - stage.warmup) / max(1, stage.steps - stage.warmup)
    return 0.1 + 0.45 * (1.0 + math.cos(math.pi * progress))


def train(model, examples: list[tuple[list[int], int]], stage: Stage, pad_id: int, seed: int,
          log=print, name: str = "train") -> dict:
    """Train in place; returns the stage's summary (no timings: summaries must be reproducible)."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=stage.lr, betas=(0.9, 0.98), weight_decay=0.01)
    model.train()
    order: list[int] = []
    started, running = time.time(), None
    for step in range(stage.steps):
        if len(order) < stage.batch_size:  # a fresh permutation per epoch
            order += torch.randperm(len(examples), generator=generator).tolist()
        rows, order = order[:stage.batch_size], order[stage.batch_size:]
        for group in optimizer.param_groups:
            group["lr"] = stage.lr * _lr_factor(step, stage)
        loss = model(**_batch([examples[i] for i in rows], pad_id)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if (step + 1) % max(1, stage.steps // 10) == 0 or step + 1 == stage.steps:
            log(f"[{name}] step {step + 1}/{stage.steps} loss {running:.4f} ({time.time() - started:.0f}s)")
    model.eval()
    return {"steps": stage.steps, "batch_size": stage.batch_size, "lr": stage.lr,
            "final_loss_ema": round(running, 4)}
