"""Method comparison: `ds-moekd compare` trains every method on several seeds and reports them side
by side with the teacher and the undistilled student (docs/comparison.md)."""
