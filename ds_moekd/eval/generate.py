"""Batched text generation from prompt strings: greedy, or seeded sampling (temperature 1).

A thin wrapper over `decode_shard` (the project's one decoder underneath): prompts are tokenised,
batched in order of length and decoded; results come back in the caller's order, each cut at the
first EOS and decoded without special tokens. Sampling is keyed by each prompt's index, so a
prompt's text does not depend on the batch size.
"""

from __future__ import annotations

from ds_moekd.eval.decode import Decoding, decode_shard


def generate_responses(model, tokenizer, prompts: list[str], *, max_new_tokens: int, batch_size: int,
                       do_sample: bool = False, seed: int | None = None, routing=None) -> list[str]:
    """The decoded continuation of each prompt (sampling needs a seed, so it can be repeated);
    `routing`: a teacher routing policy (ds_moekd/routing.py) for a `MoETeacher`."""
    if do_sample and seed is None:
        raise ValueError("do_sample=True needs a seed, so that sampled evaluations can be repeated")
    encoded = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]
    decoding = Decoding(max_new_tokens, seed if do_sample else None, batch_size=batch_size)
    was_training = model.training
    model.eval()
    try:
        return decode_shard(model, tokenizer, encoded, list(range(len(prompts))), decoding, routing=routing)
    finally:
        model.train(was_training)
