"""`gkd` and `all`: on-policy distillation, the student learns on its own samples (docs/methods/gkd.md).

Each example's response is a student rollout with probability `gkd.on_policy_fraction` (a coin
keyed by seed, step and example id), otherwise the teacher's own generation (`gkd.seq_kd`) or the
dataset's. The loss is a divergence between teacher p and student q on those responses: reverse
KL(q‖p) by default, forward KL or generalized JSD(β) selectable, no CE term unless asked.
`all` is the same step with a teacher that uses every expert (`AllExperts`, original router
weights).
"""

from __future__ import annotations

import torch

from ds_moekd.data.batching import Batch, TokenizedExample, collate
from ds_moekd.decoding import decode
from ds_moekd.losses import LossTerms
from ds_moekd.methods.base import Method, StepContext
from ds_moekd.runtime.rng import MIXING_SLOT, CounterKey, Sampling, counter_uniform
from ds_moekd.student.rollout import RolloutSettings, student_rollout
from ds_moekd.teacher.routing import AllExperts

DIVERGENCE_NAMES = {"reverse_kl": "rkl", "forward_kl": "kl", "jsd": "jsd"}  # metrics.jsonl keys


class OnPolicyDistillation(Method):
    """`gkd`; subclasses change the teacher's targets (`all`, `ka`) or add a router step (`sar`)."""

    name = "gkd"
    on_policy = True
    supports_lora = False  # rollouts decode with the plain student module (docs/rollouts.md)
    supports_packing = False  # responses are sampled per example, after the data is batched
    sections = ("gkd",)

    @classmethod
    def loss_terms(cls, cfg) -> LossTerms:
        gkd = cfg.gkd
        return LossTerms(ce_weight=gkd.ce_weight, divergence=gkd.divergence, div_weight=1.0, beta=gkd.beta,
                         temperature=cfg.loss.temperature, div_name=DIVERGENCE_NAMES[gkd.divergence])

    def __init__(self, cfg, tokenizer):
        super().__init__(cfg, tokenizer)
        self.cfg = cfg.gkd
        self.seed = cfg.train.seed
        self.rollout = RolloutSettings(
            max_new_tokens=cfg.gkd.max_new_tokens,
            sampling=Sampling(temperature=cfg.gkd.temperature, top_k=cfg.gkd.top_k, top_p=cfg.gkd.top_p),
            mode=cfg.gkd.rollout, seed=cfg.train.seed, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, vocab_limit=len(tokenizer),
        )

    def on_policy_rows(self, batch: Batch, step: int) -> torch.Tensor:
        """Which rows get a student rollout `[B]` bool: a coin per (seed, step, example id)."""
        if self.cfg.on_policy_fraction >= 1.0:
            return torch.ones(len(batch.example_ids), dtype=torch.bool, device=batch.example_ids.device)
        key = CounterKey(MIXING_SLOT, batch.example_ids, torch.zeros_like(batch.example_ids))
        return counter_uniform(self.seed, step, key, streams=1)[:, 0] < self.cfg.on_policy_fraction

    def responses(self, batch: Batch, ctx: StepContext) -> Batch:
        on_policy = self.on_policy_rows(batch, ctx.step).tolist()
        prompts, responses, ids = batch.prompts(), batch.responses(), batch.example_ids.tolist()
        rows = [i for i, flag in enumerate(on_policy) if flag]
        # Every rank calls the rollout (and the teacher's generation) even with no rows of its own:
        # their forwards may be collective.
        with ctx.watch.time("rollout_s"):
            sampled = student_rollout(ctx.engine, [prompts[i] for i in rows], [ids[i] for i in rows], self.rollout,
                                      ctx.step, ctx.groups)
        for i, response in zip(rows, sampled, strict=True):
            responses[i] = response
        if self.cfg.seq_kd:
            rest = [i for i, flag in enumerate(on_policy) if not flag]
            with ctx.watch.time("teacher_generate_s"):
                generated = decode(ctx.teacher.decoding_forward(), [prompts[i] for i in rest],
                                   [ids[i] for i in rest], self.rollout.decoding(ctx.step))
            for i, response in zip(rest, generated, strict=True):
                responses[i] = response
        ctx.metrics["on_policy_examples"] = ctx.metrics.get("on_policy_examples", 0) + len(rows)
        ctx.metrics["response_tokens"] = ctx.metrics.get("response_tokens", 0) + sum(map(len, responses))
        examples = [TokenizedExample(p, r) for p, r in zip(prompts, responses, strict=True)]
        return collate(examples, self.rollout.pad_token_id, example_ids=ids).to(batch.input_ids.device)


class AllExpertsDistillation(OnPolicyDistillation):
    """`all`: on-policy, the teacher uses all N experts with its original router weights."""

    name = "all"

    @classmethod
    def teacher_routing(cls, cfg) -> AllExperts:
        return AllExperts()
