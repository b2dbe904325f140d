"""The process a rank runs in: its device and precision, process groups, host settings, counter-based
randomness, per-step telemetry and DeepSpeed's monitors."""
