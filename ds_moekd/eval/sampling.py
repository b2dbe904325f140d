"""Counter-based sampling: each sampled token is a pure function of (seed, prompt key, step).

Sampling from torch's global generator makes a prompt's sample depend on which other prompts
share its batch, the batch order and the number of ranks. Here each token is drawn by the
Gumbel-max trick with noise from a hash of (seed, the prompt's global index, decoding step, token
id): exact sampling from softmax(logits / temperature), and the same text for a prompt however
the data is batched or sharded, so a 2-rank evaluation equals the 1-process one.
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor

_MASK32 = 0xFFFFFFFF


def _mul32(h: torch.Tensor, const: int) -> torch.Tensor:
    """(h * const) mod 2^32 for int64 h in [0, 2^32), without int64 overflow (16-bit halves)."""
    lo, hi = const & 0xFFFF, const >> 16
    return (h * lo + (((h * hi) & 0xFFFF) << 16)) & _MASK32


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finaliser: a bijective mix of int64 values in [0, 2^32)."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def counter_uniform(seed: int, keys_B: torch.Tensor, step: int, vocab: int) -> torch.Tensor:
    """Uniform(0, 1) noise `[B, vocab]` (float64), a pure function of (seed, key, step, token id)."""
    device = keys_B.device
    h = _fmix32(torch.full_like(keys_B, seed & _MASK32) ^ (keys_B & _MASK32))
    h = _fmix32(h ^ (step & _MASK32))
    token_V = torch.arange(vocab, device=device, dtype=torch.int64)
    h_BV = _fmix32(_fmix32(h[:, None] ^ token_V[None, :]) ^ 0x9E3779B9)
    return (h_BV.double() + 0.5) / 2.0**32


def sample_next(logits_BV: torch.Tensor, seed: int, keys_B: torch.Tensor, step: int, temperature: float = 1.0,
                vocab_limit: int | None = None) -> torch.Tensor:
    """Next token per row, sampled from softmax(logits / temperature) with counter-based noise.

    `vocab_limit` drops logits past the tokenizer's length (padded lm_head rows are not tokens).
    """
    logits_BV = logits_BV[:, :vocab_limit].double() / temperature
    gumbel_BV = -torch.log(-torch.log(counter_uniform(seed, keys_B.to(logits_BV.device), step, logits_BV.shape[1])))
    return (logits_BV + gumbel_BV).argmax(dim=-1)


class CounterSampler(LogitsProcessor):
    """A transformers logits processor that samples (use it with greedy decoding: `do_sample=False`).

    It leaves only the sampled token finite, so greedy decoding emits it. `keys_B` are the rows'
    prompt keys; `prompt_width` is the padded prompt length, so the step counts new tokens only.
    """

    def __init__(self, seed: int, keys_B: torch.Tensor, prompt_width: int, temperature: float = 1.0,
                 vocab_limit: int | None = None):
        self.seed, self.keys_B, self.prompt_width = seed, keys_B, prompt_width
        self.temperature, self.vocab_limit = temperature, vocab_limit

    def __call__(self, input_ids_BT: torch.Tensor, scores_BV: torch.Tensor) -> torch.Tensor:
        step = input_ids_BT.shape[1] - self.prompt_width
        chosen_B = sample_next(scores_BV, self.seed, self.keys_B, step, self.temperature, self.vocab_limit)
        out_BV = torch.full_like(scores_BV, float("-inf"))
        return out_BV.scatter_(1, chosen_B[:, None], 0.0)
