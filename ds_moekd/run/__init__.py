"""A run's lifecycle: checkpoints, the run folder and its lock, preemption, the watchdog, numerics,
resharding and elastic resume, lost launchers and peers, errors and exit codes, the end-of-run record
(docs/reliability.md)."""
