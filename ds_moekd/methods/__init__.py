"""Distillation methods: one small file each (which responses, which routing, which loss)."""

from ds_moekd.methods.base import Method
from ds_moekd.methods.kd import WordLevelKD
from ds_moekd.methods.sft import SupervisedFineTuning


def build_method(cfg) -> Method:
    """The method named by `cfg.method`, configured from the run config."""
    if cfg.method == "sft":
        return SupervisedFineTuning()
    if cfg.method == "kd":
        return WordLevelKD(cfg.kd)
    raise ValueError(f"method={cfg.method!r} is not implemented")


__all__ = ["Method", "build_method"]
