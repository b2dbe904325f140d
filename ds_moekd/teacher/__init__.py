"""Expert-parallel MoE teacher (docs/teacher.md, docs/parallelism.md)."""

from ds_moekd.teacher.model import MoETeacher

__all__ = ["MoETeacher"]
