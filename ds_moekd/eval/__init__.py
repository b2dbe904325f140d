"""Evaluation: text metrics and batched generation."""

from ds_moekd.eval.metrics import exact_match, rouge_l

__all__ = ["exact_match", "rouge_l"]
