"""`ka`: Knowledge Augmentation, on-policy with M sampled N−1-expert teachers (docs/methods/ka.md).

Per token and MoE layer the teacher takes its top-K experts (K = N−1 by default) or, with
probability `ka.resample_prob`, K experts drawn without replacement from its router's
probabilities; the chosen experts are weighted by the family's own rule. The M = `ka.draws`
draws run as ONE batched teacher forward (M copies of the micro-batch with draw indices
0..M−1) whose final hidden states `[M, N, H]` feed the fused head; the loss is the mean over
draws of D(p_m, q). Draws are keyed by (seed, global step, draw, layer, example id, position),
so no two steps reuse a draw and micro-batching or the number of ranks never changes one.
"""

from __future__ import annotations

from ds_moekd.methods.gkd import OnPolicyDistillation
from ds_moekd.teacher.routing import KASample


class KnowledgeAugmentation(OnPolicyDistillation):
    name = "ka"
    sections = ("gkd", "ka")

    @classmethod
    def teacher_routing(cls, cfg) -> KASample:
        return KASample(resample_prob=cfg.ka.resample_prob, num_selected=cfg.ka.num_selected or None,
                        seed=cfg.train.seed)

    @classmethod
    def teacher_draws(cls, cfg) -> int:
        return cfg.ka.draws
