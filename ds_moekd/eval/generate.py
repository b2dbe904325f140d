"""Batched generation for a Hugging Face causal LM: greedy, or seeded sampling.

Prompts are left-padded (so every row's new tokens start at the same position) and batched in
order of length (less padding); results come back in the caller's order, each cut at the first
EOS and decoded without special tokens.
"""

from __future__ import annotations

import torch


def generate_responses(model, tokenizer, prompts: list[str], *, max_new_tokens: int, batch_size: int,
                       do_sample: bool = False, seed: int | None = None, **generate_kwargs) -> list[str]:
    """The decoded continuation of each prompt.

    Sampling defaults to the MiniLLM protocol (temperature 1, no top-k/top-p truncation); pass
    generation arguments through `generate_kwargs` to change that. `seed` makes sampling repeatable
    without disturbing the caller's global RNG state.
    """
    if do_sample and seed is None:
        raise ValueError("do_sample=True needs a seed, so that sampled evaluations can be repeated")
    if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer needs pad and eos tokens for batched generation")
    sampling = {"temperature": 1.0, "top_k": 0, "top_p": 1.0} if do_sample else {}
    options = {**sampling, **generate_kwargs}
    encoded = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    responses: list[str] = [""] * len(prompts)
    was_training = model.training
    model.eval()
    with torch.random.fork_rng(devices=[]), torch.inference_mode():
        if seed is not None:
            torch.manual_seed(seed)
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            width = max(len(encoded[i]) for i in rows)
            input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
            attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, i in enumerate(rows):
                input_ids[r, width - len(encoded[i]):] = torch.tensor(encoded[i])
                attention_mask[r, width - len(encoded[i]):] = 1
            output = model.generate(
                input_ids=input_ids.to(model.device), attention_mask=attention_mask.to(model.device),
                max_new_tokens=max_new_tokens, do_sample=do_sample,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **options,
            )
            for r, i in enumerate(rows):
                new_ids = output[r, width:].tolist()
                if tokenizer.eos_token_id in new_ids:
                    new_ids = new_ids[:new_ids.index(tokenizer.eos_token_id)]
                responses[i] = tokenizer.decode(new_ids, skip_special_tokens=True)
    model.train(was_training)
    return responses
