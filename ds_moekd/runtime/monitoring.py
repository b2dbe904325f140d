"""DeepSpeed's own monitors (TensorBoard, Weights & Biases, CSV) switched on from the run
config's `monitor` section, beside metrics.jsonl (docs/monitoring.md).

The section becomes the DeepSpeed JSON's `tensorboard` / `wandb` / `csv_monitor` sections, so the
engine builds its `MonitorMaster` (which already writes DeepSpeed's own learning-rate events);
each step's metrics.jsonl record goes through that same `engine.monitor.write_events`, which
writes on global rank 0 only.
"""

from __future__ import annotations

from ds_moekd.config import RunConfig

PREFIX = "Train/ds_moekd/"


def monitor_sections(cfg: RunConfig) -> dict:
    """The DeepSpeed JSON sections for `cfg.monitor` ({} when every monitor is off)."""
    mon = cfg.monitor
    path = str(mon.output_path or cfg.run_dir / "monitor")
    sections = {}
    if mon.tensorboard:
        sections["tensorboard"] = {"enabled": True, "output_path": path, "job_name": "tensorboard"}
    if mon.csv:
        sections["csv_monitor"] = {"enabled": True, "output_path": path, "job_name": "csv"}
    if mon.wandb:
        sections["wandb"] = {"enabled": True, "project": mon.wandb_project,
                             **{k: v for k, v in (("team", mon.wandb_team), ("group", mon.wandb_group)) if v}}
    return sections


def write_record(engine, record: dict) -> None:
    """One metrics.jsonl record as monitor events at its optimizer step (numbers only)."""
    monitor = getattr(engine, "monitor", None)
    if monitor is None or not monitor.enabled:
        return
    step = record["step"]
    events = [(PREFIX + key, float(value), step) for key, value in record.items()
              if key != "step" and isinstance(value, int | float) and not isinstance(value, bool)]
    monitor.write_events(events)
