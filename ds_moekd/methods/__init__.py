"""Distillation methods, one small file each (docs/methods.md): where responses come from, how the
teacher scores them, the loss terms, any extra update, and the facts the rest of the project asks
(registry.py)."""

from ds_moekd.methods.base import Method, StepContext, TeacherTargets
from ds_moekd.methods.registry import METHODS, build_method, method_class

__all__ = ["METHODS", "Method", "StepContext", "TeacherTargets", "build_method", "method_class"]
