"""`ds-moekd plan`: per-rank memory and FLOPs of a run from config files only (docs/plan.md)."""
