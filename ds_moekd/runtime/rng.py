"""Counter-based randomness: every random number is a pure function of its keys.

One module serves every random choice the project makes during a run (docs/randomness.md):
KA's expert draws, SAR's gate noise, token sampling of rollouts and evaluation. A number is a
hash of (seed, step, layer slot, draw, global sequence index, position, stream), so it does not
depend on batching, padding, micro-batching, the number of ranks or the order of calls: a
2-rank step equals the 1-rank step on the concatenated batch, and a resumed run redraws exactly
what the uninterrupted one drew.

Layer slots: MoE layers use their index (>= 0); token sampling uses `SAMPLING_SLOT`, gate noise
`NOISE_SLOT_BASE - layer`, the on-policy/dataset coin `MIXING_SLOT`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SAMPLING_SLOT = -1
MIXING_SLOT = -2
NOISE_SLOT_BASE = -1000


@dataclass(frozen=True)
class CounterKey:
    """Per-token keys (one entry per token, int64) under one layer slot."""

    layer_index: int
    sequence_T: torch.Tensor  # global sequence (example) index
    position_T: torch.Tensor  # position in the sequence, padding not counted
    draw_T: torch.Tensor | None = None  # teacher draw index (KA's M draws; None: 0)


_M32 = 0xFFFFFFFF


def _mix32(h: torch.Tensor) -> torch.Tensor:
    """murmur3's 32-bit finaliser on int64 tensors holding uint32 values (products wrap mod 2^64;
    the mask keeps the exact low 32 bits)."""
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & _M32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & _M32
    return h ^ (h >> 16)


def _absorb(h, part):
    """Fold one 64-bit key part (int or int64 tensor) into the running hash (int or int64 tensor),
    32 bits at a time."""
    for half in (part & _M32, (part >> 32) & _M32):
        h = _mix32(((h ^ half) + 0x9E3779B9) & _M32)
    return h


def counter_uniform(seed: int, step: int, key: CounterKey, *, streams: int, first_stream: int = 0) -> torch.Tensor:
    """Uniforms in (0, 1) `[T, streams]` (float64), a pure function of
    (seed, step, layer, draw, sequence, position, stream) for each token. Streams
    `first_stream .. first_stream + streams - 1` are computed, so a caller can draw a few streams
    first and the rest only for the tokens that need them."""
    sequence_T = key.sequence_T.long()
    draw_T = torch.zeros_like(sequence_T) if key.draw_T is None else key.draw_T.long()
    h = 0x6A09E667
    for part in (seed, step, key.layer_index):  # the same for every token: hashed once, in Python
        h = _absorb(h, part & 0xFFFFFFFFFFFFFFFF)
    h_T = torch.full_like(sequence_T, h)
    for part in (draw_T, sequence_T, key.position_T.long()):
        h_T = _absorb(h_T, part)
    stream_S = torch.arange(first_stream, first_stream + streams, device=h_T.device, dtype=torch.long)
    h_TS = _absorb(h_T[:, None].expand(-1, streams), stream_S[None, :])
    return (h_TS.double() + 0.5) / 2.0**32


def gumbel(u: torch.Tensor) -> torch.Tensor:
    return -torch.log(-torch.log(u))


def counter_normal(seed: int, step: int, key: CounterKey, *, streams: int) -> torch.Tensor:
    """Standard normals `[T, streams]` (float64) by Box-Muller on counter uniforms."""
    u_TS2 = counter_uniform(seed, step, key, streams=2 * streams)
    radius = torch.sqrt(-2.0 * torch.log(u_TS2[:, :streams]))
    return radius * torch.cos(2.0 * torch.pi * u_TS2[:, streams:])


@dataclass(frozen=True)
class Sampling:
    """How a next token is drawn: softmax(logits / temperature), optionally cut to the top-k tokens
    and to the smallest set whose probability reaches top-p. Defaults sample the model's own
    distribution (the on-policy and MiniLLM setting)."""

    temperature: float = 1.0
    top_k: int = 0  # 0: no cut
    top_p: float = 1.0  # 1: no cut

    def __post_init__(self):
        if self.temperature <= 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"{self}: need temperature > 0, top_k >= 0 and 0 < top_p <= 1")


def sample_tokens(
    logits_BV: torch.Tensor,
    sampling: Sampling | None,
    *,
    seed: int,
    step: int,
    keys_B: torch.Tensor,
    positions_B: torch.Tensor,
    vocab_limit: int | None = None,
) -> torch.Tensor:
    """Next token per row: argmax for `sampling=None` (greedy), else Gumbel-max sampling keyed by
    (seed, step, row key, position). `vocab_limit` drops padded lm_head rows; a token's noise does
    not depend on the vocabulary width, so the limit never changes which of the others is drawn."""
    logits_BV = logits_BV[:, :vocab_limit]
    if sampling is None:
        return logits_BV.argmax(dim=-1)
    scaled_BV = logits_BV.double() / sampling.temperature
    if sampling.top_k and sampling.top_k < scaled_BV.shape[1]:
        kth_B1 = scaled_BV.topk(sampling.top_k, dim=-1).values[:, -1:]
        scaled_BV = scaled_BV.masked_fill(scaled_BV < kth_B1, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_BV, order_BV = scaled_BV.sort(dim=-1, descending=True)
        probs_BV = sorted_BV.softmax(dim=-1)
        before_BV = probs_BV.cumsum(dim=-1) - probs_BV  # mass of the tokens ranked above each one
        drop_BV = torch.zeros_like(before_BV, dtype=torch.bool).scatter(1, order_BV, before_BV >= sampling.top_p)
        scaled_BV = scaled_BV.masked_fill(drop_BV, float("-inf"))
    key = CounterKey(SAMPLING_SLOT, keys_B.to(logits_BV.device), positions_B.to(logits_BV.device))
    u_BV = counter_uniform(seed, step, key, streams=scaled_BV.shape[1])
    return (scaled_BV + gumbel(u_BV)).argmax(dim=-1)
