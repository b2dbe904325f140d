"""`kd`: word-level KD on dataset responses, kd.ce_weight · CE + kd.kl_weight · KL(p‖q) at
loss.temperature (docs/methods/kd.md).

`kd.targets` picks the teacher's routing: its native top-k (the default), all experts with their
router weights, or KA's `ka.draws` N−1-expert draws (the loss then averages KL over the draws).
Responses come from the dataset, so the targets depend on the data alone: KA's draws are keyed by
(seed, example, draw, layer, position) and not by the step, the same draws every epoch. That is
what lets an offline teacher cache (`teacher.cache`, docs/teacher-cache.md) hold exactly the
targets a live run computes.
"""

from __future__ import annotations

from ds_moekd.losses import LossTerms
from ds_moekd.methods.base import Method, TeacherTargets
from ds_moekd.teacher.routing import AllExperts, KASample, RoutingPolicy


def routing_of(cfg, name: str) -> RoutingPolicy | None:
    """The teacher routing `name` of `kd.targets` (None: the family's native top-k)."""
    if name == "all":
        return AllExperts()
    if name == "ka":
        return KASample(resample_prob=cfg.ka.resample_prob, num_selected=cfg.ka.num_selected or None,
                        seed=cfg.train.seed)
    return None


def targets_of(cfg, name: str) -> TeacherTargets:
    """Routing `name`'s teacher targets: its policy and its number of draws."""
    return TeacherTargets(routing_of(cfg, name), cfg.ka.draws if name == "ka" else 1)


class WordLevelKD(Method):
    name = "kd"
    sections = ("kd", "ka")
    reads_teacher_cache = True

    @classmethod
    def loss_terms(cls, cfg) -> LossTerms:
        return LossTerms(ce_weight=cfg.kd.ce_weight, divergence="forward_kl", div_weight=cfg.kd.kl_weight,
                         temperature=cfg.loss.temperature)

    @classmethod
    def sections_read(cls, cfg) -> tuple[str, ...]:
        return cls.sections if cfg.kd.targets == "ka" else ("kd",)  # ka: KA's settings when kd.targets=ka

    @classmethod
    def teacher_routing(cls, cfg) -> RoutingPolicy | None:
        return routing_of(cfg, cfg.kd.targets)

    @classmethod
    def teacher_draws(cls, cfg) -> int:
        return targets_of(cfg, cfg.kd.targets).draws

    def teacher_targets(self, step: int) -> TeacherTargets:
        return TeacherTargets(self.routing, self.draws)  # not keyed by the step (module docstring)
