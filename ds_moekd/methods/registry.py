"""The method registry: a method's name in a run config → its class (docs/methods.md).

Everything outside ds_moekd/methods asks the class for a method's facts (needs_teacher,
on_policy, supports_lora, supports_packing, sections, teacher_routing, teacher_draws) instead
of comparing method names. A new method is one file in this package plus one entry below.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ds_moekd.methods.base import Method
from ds_moekd.methods.gkd import AllExpertsDistillation, OnPolicyDistillation
from ds_moekd.methods.ka import KnowledgeAugmentation
from ds_moekd.methods.kd import WordLevelKD
from ds_moekd.methods.sar import StudentAwareRouter
from ds_moekd.methods.sft import SupervisedFineTuning

if TYPE_CHECKING:
    from ds_moekd.config import RunConfig

METHODS: dict[str, type[Method]] = {
    cls.name: cls
    for cls in (
        SupervisedFineTuning,
        WordLevelKD,
        OnPolicyDistillation,
        AllExpertsDistillation,
        KnowledgeAugmentation,
        StudentAwareRouter,
    )
}


def method_class(name: str) -> type[Method]:
    if name not in METHODS:
        raise KeyError(f"method {name!r} is not registered; one of {tuple(METHODS)} (ds_moekd/methods/registry.py)")
    return METHODS[name]


def build_method(cfg: RunConfig, tokenizer=None) -> Method:
    """The method named by `cfg.method`, configured from the run config (on-policy methods need the
    tokenizer for their rollouts' special tokens)."""
    cls = method_class(cfg.method)
    if cls.on_policy and tokenizer is None:
        raise ValueError(f"method {cfg.method!r} samples rollouts: build_method needs the tokenizer")
    return cls(cfg, tokenizer)
