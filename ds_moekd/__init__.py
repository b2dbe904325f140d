"""ds-moekd: distil large Mixture-of-Experts teachers into smaller students with DeepSpeed."""

__version__ = "0.1.0"
