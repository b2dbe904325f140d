"""Responses sampled from the ZeRO-3 student (on-policy rollouts), in one of two modes (docs/rollouts.md).

  gather     every rank gathers the whole student once per rollout and decodes alone: the
             partitioned parameters are gathered and ZeRO-3's module hooks removed, and put back
             afterwards (student/zero3.py, `whole_student`). Fast; needs the full student to fit
             on one device for the rollout.
  layerwise  decode with the partitioned module itself: each forward gathers one layer's
             parameters at a time over the data-parallel group, so every rank must run the same
             number of forwards; ranks step in lockstep until all have finished.

Both give identical tokens: sampling is keyed by (seed, step, example id, position), ds_moekd/runtime/rng.py.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from ds_moekd.decoding import Decoding, HFForward, decode
from ds_moekd.runtime.dist import ParallelGroups
from ds_moekd.runtime.rng import Sampling
from ds_moekd.student.zero3 import is_partitioned, whole_student


@dataclass(frozen=True)
class RolloutSettings:
    max_new_tokens: int
    sampling: Sampling
    mode: str  # gather | layerwise
    seed: int
    eos_token_id: int
    pad_token_id: int
    vocab_limit: int  # the tokenizer's length

    def decoding(self, step: int) -> Decoding:
        """The decoder's settings for the rollouts of training step `step` (one batch per call)."""
        return Decoding(max_new_tokens=self.max_new_tokens, sampling=self.sampling, eos_token_id=self.eos_token_id,
                        pad_token_id=self.pad_token_id, vocab_limit=self.vocab_limit, seed=self.seed, step=step)


@contextlib.contextmanager
def student_forward(engine, mode: str, groups: ParallelGroups):
    """The student in `engine` as the decoder's forward for `mode`; restores training mode afterwards."""
    module = engine.module
    was_training = module.training
    module.eval()
    try:
        if not is_partitioned(module):  # every rank holds the whole student already
            yield HFForward(module)
        elif mode == "gather":
            with whole_student(engine):
                yield HFForward(module)
        else:
            yield HFForward(module, groups.dp_group)
    finally:
        module.train(was_training)


def student_rollout(engine, prompts: list[list[int]], keys: list[int], settings: RolloutSettings, step: int,
                    groups: ParallelGroups) -> list[list[int]]:
    """One sampled response per prompt of the student in `engine` (ending with EOS unless cut at
    max_new_tokens). Every rank calls this, once per micro-batch, with or without prompts."""
    with student_forward(engine, settings.mode, groups) as forward:
        return decode(forward, prompts, keys, settings.decoding(step))
