"""Evaluation: text metrics, the scorer (runner.py), validation during training and `ds-moekd eval`."""

from ds_moekd.eval.metrics import exact_match, rouge_l

__all__ = ["exact_match", "rouge_l"]
