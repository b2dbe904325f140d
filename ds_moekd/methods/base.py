"""What a method decides, and the defaults most methods keep (docs/methods.md).

A training step (ds_moekd/train.py) asks the method, in order: where each micro-batch's responses
come from (`responses`: the dataset, a student rollout, the teacher's own generation), anything to
update before the student learns from a micro-batch (`before_student`: SAR's router step), how
the teacher produces its targets (`teacher_targets`: routing policy and number of draws, keyed by
the step) and the loss terms (`terms`). A method also owns its checkpoint state and what it
writes when the run ends. The step itself never branches on the method.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ds_moekd.data.batching import Batch
from ds_moekd.losses import LossTerms
from ds_moekd.runtime.dist import ParallelGroups
from ds_moekd.runtime.telemetry import Stopwatch
from ds_moekd.teacher.routing import RoutingPolicy

if TYPE_CHECKING:  # methods read the config; only config validation imports the methods (registry.py)
    from ds_moekd.config import RunConfig


@dataclass(frozen=True)
class TeacherTargets:
    """How the teacher scores a micro-batch: routing policy (None: the family's native top-k) and
    the number of draws stacked into one batched forward (KA's M)."""

    routing: RoutingPolicy | None = None
    draws: int = 1


@dataclass
class StepContext:
    """What one optimizer step hands to the method's phases."""

    engine: object  # the student's DeepSpeed engine
    teacher: torch.nn.Module | None
    groups: ParallelGroups
    vocab: int  # the tokenizer's length: padded lm_head rows past it are never scored
    step: int  # the global step being trained (0-based): a key of every random draw
    watch: Stopwatch
    chunk: int = 0  # tokens per loss chunk (0: automatic in the fused head)
    metrics: dict[str, float] = field(default_factory=dict)  # extra per-step numbers (summed over micro-batches)


class Method:
    """A method is its phases (below) and its facts: the class attributes and class methods that
    config validation, `plan`, `train`, `compare` and the bench ask (docs/methods.md, "Adding a
    method"). The defaults: dataset responses, the teacher's native routing, one draw, nothing before
    the student step, no state of its own."""

    name: str
    needs_teacher: bool = True  # False: no teacher is loaded (and teacher.path is not required)
    on_policy: bool = False  # responses are the student's own rollouts (gkd.* sampling settings apply)
    supports_lora: bool = True  # a peft LoRA student can train with it
    supports_packing: bool = True  # data.packing can pack its responses
    trains_teacher_routers: bool = False  # updates the teacher's routers (exported as a tuned teacher)
    # its teacher targets depend on the data alone, so an offline teacher cache can hold them (teacher.cache)
    reads_teacher_cache: bool = False
    sections: tuple[str, ...] = ()  # the method's own config sections (beyond data, optim, loss, ...)
    terms: LossTerms  # the loss, built from the config

    def __init__(self, cfg: RunConfig, tokenizer):
        self.terms = self.loss_terms(cfg)
        self.routing = self.teacher_routing(cfg)
        self.draws = self.teacher_draws(cfg)

    @classmethod
    def loss_terms(cls, cfg: RunConfig) -> LossTerms:
        raise NotImplementedError

    @classmethod
    def sections_read(cls, cfg: RunConfig) -> tuple[str, ...]:
        """The sections this run of the method reads (a section may matter only under some settings)."""
        return cls.sections

    @classmethod
    def teacher_routing(cls, cfg: RunConfig) -> RoutingPolicy | None:
        """The teacher's routing policy (None: the family's native top-k), before it is keyed by step."""
        return None

    @classmethod
    def teacher_draws(cls, cfg: RunConfig) -> int:
        """Teacher draws stacked into one batched forward per micro-batch (KA's M)."""
        return 1

    def responses(self, batch: Batch, ctx: StepContext) -> Batch:
        return batch

    def before_student(self, batch: Batch, student_NH: torch.Tensor, ctx: StepContext) -> None:
        """`student_NH`: the student's final hidden states at the response positions, this step's
        forward (no graph), so a method that reads the student needs no forward of its own."""

    def teacher_targets(self, step: int) -> TeacherTargets:
        return TeacherTargets(None if self.routing is None else self.routing.at_step(step), self.draws)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def finish(self, ctx: StepContext, run_dir: Path) -> None:
        """Called on every rank after the last step (SAR exports its tuned teacher)."""
