"""Expert-parallel MoE teacher (see DESIGN §3, §5)."""

from ds_moekd.teacher.model import MoETeacher

__all__ = ["MoETeacher"]
