"""Distillation methods, one small file each (docs/methods.md): where responses come from, how the
teacher scores them, the loss terms, and any extra update."""

from ds_moekd.methods.base import Method, StepContext, TeacherTargets


def build_method(cfg, tokenizer=None) -> Method:
    """The method named by `cfg.method`, configured from the run config (on-policy methods need the
    tokenizer for their rollouts' special tokens)."""
    if cfg.method == "sft":
        from ds_moekd.methods.sft import SupervisedFineTuning

        return SupervisedFineTuning()
    if cfg.method == "kd":
        from ds_moekd.methods.kd import WordLevelKD

        return WordLevelKD(cfg.kd)
    if tokenizer is None:
        raise ValueError(f"method {cfg.method!r} samples rollouts: build_method needs the tokenizer")
    if cfg.method == "gkd":
        from ds_moekd.methods.gkd import OnPolicyDistillation

        return OnPolicyDistillation(cfg, tokenizer)
    if cfg.method == "all":
        from ds_moekd.methods.gkd import AllExpertsDistillation

        return AllExpertsDistillation(cfg, tokenizer)
    if cfg.method == "ka":
        from ds_moekd.methods.ka import KnowledgeAugmentation

        return KnowledgeAugmentation(cfg, tokenizer)
    if cfg.method == "sar":
        from ds_moekd.methods.sar import StudentAwareRouter

        return StudentAwareRouter(cfg, tokenizer)
    raise ValueError(f"method={cfg.method!r} is not implemented")


__all__ = ["Method", "StepContext", "TeacherTargets", "build_method"]
