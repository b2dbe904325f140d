"""What runs report: a run's report.md, `ds-moekd report` over several runs, `ds-moekd compare`'s
report, the held-out scores, and every plot (plots.py)."""
