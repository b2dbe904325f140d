"""`ds-moekd report PATH... --out DIR`: compare runs and evaluation results in `report.md` + PNG plots.

Each PATH is a run folder (`run.json`, `metrics.jsonl`, optional `validation.jsonl` and
`eval/*.json` written by `ds-moekd eval`) or an evaluation result (`ds-moekd eval --out`), or a
folder of them: teachers under each routing and the undistilled student come in as results.
Plots: scores per eval set (bars with std over seeds), loss and validation curves, throughput per
run, and the teacher's per-layer non-activated gate mass where an input carries
`routing_diagnostics.non_activated_gate_mass` (one value per MoE layer).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

from ds_moekd.reporting import plots
from ds_moekd.run.atomic import write_text
from ds_moekd.runtime.telemetry import FINAL_LOSS, final_loss, read_metrics

SCORE_METRICS = {"rouge_l": "ROUGE-L F1 (x100)", "exact_match": "exact match (%)",
                 "exact_match_strict": "strict exact match (%)"}


@dataclass
class Run:
    name: str
    method: str
    path: Path
    record: dict
    metrics: list[dict]
    validation: list[dict]


def _run_label(run: Run) -> str:
    return run.name if run.name == run.method else f"{run.name} ({run.method})"


@dataclass
class Inputs:
    runs: list[Run] = field(default_factory=list)
    results: list[tuple[str, dict]] = field(default_factory=list)  # (system label, eval result)
    gate_mass: dict[str, list[float]] = field(default_factory=dict)  # system label -> per-layer mass


def _is_result(data: dict) -> bool:
    return "counts" in data and "rouge_l" in data and "settings" in data


def _add_gate_mass(inputs: Inputs, label: str, data: dict) -> None:
    mass = data.get("routing_diagnostics", {}).get("non_activated_gate_mass")
    if mass:
        inputs.gate_mass[label] = mass


def _add_run(inputs: Inputs, p: Path) -> None:
    record = json.loads((p / "run.json").read_text())
    name = record.get("name", p.name)
    validation = p / "validation.jsonl"
    inputs.runs.append(Run(name, record.get("method", "?"), p, record, read_metrics(p / "metrics.jsonl"),
                           read_metrics(validation) if validation.is_file() else []))
    _add_gate_mass(inputs, name, record)
    for f in sorted((p / "eval").glob("*.json")):
        inputs.results.append((name, _with_file(json.loads(f.read_text()), f)))


def _add_result(inputs: Inputs, f: Path) -> None:
    data = json.loads(f.read_text())
    if not _is_result(data):
        raise ValueError(f"{f}: not an evaluation result of `ds-moekd eval`")
    inputs.results.append((data["model"]["label"], _with_file(data, f)))
    _add_gate_mass(inputs, data["model"]["label"], data)


def _with_file(result: dict, f: Path) -> dict:
    return {**result, "_file": str(f)}  # named in errors about clashing results


def collect(paths: list[str]) -> Inputs:
    """Runs and results from run folders, result JSONs, and folders of either (one level down)."""
    inputs = Inputs()
    for p in map(Path, paths):
        if (p / "run.json").is_file():
            _add_run(inputs, p)
        elif p.is_dir():
            runs = sorted(d for d in p.iterdir() if (d / "run.json").is_file())
            files = sorted(p.glob("*.json"))
            if not runs and not files:
                raise FileNotFoundError(f"{p}: no run.json, no run folders and no evaluation result JSON files")
            for d in runs:
                _add_run(inputs, d)
            for f in files:
                _add_result(inputs, f)
        elif p.suffix == ".json" and p.is_file():
            _add_result(inputs, p)
        else:
            raise FileNotFoundError(f"{p}: neither a run folder (run.json) nor an evaluation result JSON")
    _name_eval_sets(inputs.results)
    return inputs


def _name_eval_sets(results: list[tuple[str, dict]]) -> None:
    """Give every result its eval set's display name: its `data.name`, plus its source where two
    different sources share that name (they are different sets, never one column). The same system
    twice on one set is an error: which result should the report show?"""
    sources: dict[str, set[str]] = {}
    for _, r in results:
        sources.setdefault(r["data"]["name"], set()).add(str(r["data"].get("source")))
    seen: dict[tuple[str, str], str] = {}
    for label, r in results:
        name = r["data"]["name"]
        r["_set"] = name if len(sources[name]) == 1 else f"{name} ({r['data'].get('source')})"
        if (label, r["_set"]) in seen:
            raise ValueError(f"two results for {label} on eval set {r['_set']}: {seen[(label, r['_set'])]} and "
                             f"{r['_file']}; pass one of them (or give one a different --name or --label)")
        seen[(label, r["_set"])] = r["_file"]


def _eval_set(result: dict) -> str:
    return result["_set"]  # set by collect (_name_eval_sets)


def steady_tokens_per_s(run: Run) -> float:
    """Tokens/s over all ranks after the first tenth of the steps (warm-up)."""
    steady = run.metrics[len(run.metrics) // 10:] or run.metrics
    return sum(m["tokens"] for m in steady) / sum(m["step_s"] for m in steady)


def _curve(rows: list[dict], key: str) -> plots.Curve | None:
    """(steps, values) of the rows that logged `key`; None if none did."""
    points = [(row["step"], row[key]) for row in rows if key in row]
    return tuple(map(list, zip(*points))) if points else None


def _cell(result: dict | None, metric: str) -> str:
    if result is None:
        return "-"
    if len(result["per_seed"]) == 1:  # greedy or one seed: no spread to show
        return f"{result[metric]['mean']:.2f} (1 run)"
    return f"{result[metric]['mean']:.2f} ± {result[metric]['std']:.2f}"


def write_report(inputs: Inputs, out: Path) -> list[str]:
    """Write report.md and the plots into `out`; returns the PNG file names."""
    out.mkdir(parents=True, exist_ok=True)
    lines, pngs = ["# ds-moekd comparison report", ""], []
    if inputs.results:
        sets = sorted({_eval_set(r) for _, r in inputs.results})
        systems = list(dict.fromkeys(label for label, _ in inputs.results))
        by_key = {(label, _eval_set(r)): r for label, r in inputs.results}
        for metric in ("rouge_l", "exact_match_strict"):
            plots.score_bars_per_set(out / f"scores_{metric}.png", SCORE_METRICS[metric], systems,
                                     {(label, _eval_set(r)): (r[metric]["mean"], r[metric]["std"])
                                      for label, r in inputs.results}, sets)
            pngs.append(f"scores_{metric}.png")
            lines += [f"## {SCORE_METRICS[metric]} (mean ± std over seeds)", "",
                      "| system | " + " | ".join(sets) + " |", "|---" * (len(sets) + 1) + "|"]
            lines += [f"| {s} | " + " | ".join(_cell(by_key.get((s, e)), metric) for e in sets) + " |" for s in systems]
            lines += ["", f"![{metric}](scores_{metric}.png)", ""]
        lines += ["## Evaluation settings and counts", "",
                  "| system | eval set | evaluated / records | dropped (long prompt) | no reference | decoding | seeds |",
                  "|---|---|---|---|---|---|---|"]
        for label, r in inputs.results:
            c, st = r["counts"], r["settings"]
            lines.append(f"| {label} | {_eval_set(r)} | {c['evaluated']} / {c['records']} "
                         f"({100 * c['evaluated_fraction']:.1f}%) | {c['dropped_long_prompt']} | "
                         f"{c['dropped_no_reference']} | {st['decoding']}, max {st['max_new_tokens']} new tokens | "
                         f"{'-' if st['greedy'] else ','.join(map(str, st['seeds']))} |")
        lines.append("")
    if inputs.runs:
        labels = [_run_label(run) for run in inputs.runs]
        plots.loss_curves_per_run(out / "loss.png", labels, [_curve(run.metrics, "loss") for run in inputs.runs],
                                  [_curve(run.metrics, "ce") for run in inputs.runs])
        plots.throughput_bars(out / "throughput.png", labels, [steady_tokens_per_s(run) for run in inputs.runs])
        pngs += ["loss.png", "throughput.png"]
        lines += ["## Runs", "", (f"| run | method | steps | world size | tokens/s (all ranks) | {FINAL_LOSS} | "
                                  "best validation |"), "|---|---|---|---|---|---|---|"]
        for run in inputs.runs:
            best = max(run.validation, key=lambda v: v[v["metric"]], default=None)
            best_text = f"{best['metric']} {best[best['metric']]:.2f} at step {best['step']}" if best else "-"
            lines.append(f"| {run.name} | {run.method} | {run.record.get('steps', '?')} | "
                         f"{run.record.get('world_size', '?')} | {steady_tokens_per_s(run):.0f} | "
                         f"{final_loss(run.metrics):.4f} | {best_text} |")
        lines += ["", "![loss](loss.png)", "", "![throughput](throughput.png)", ""]
        if any(run.validation for run in inputs.runs):
            plots.validation_curves(out / "validation.png", [
                (SCORE_METRICS[metric], {_run_label(run): _curve(run.validation, metric)
                                         for run in inputs.runs if run.validation})
                for metric in ("rouge_l", "exact_match_strict")])
            pngs.append("validation.png")
            lines += ["![validation](validation.png)", ""]
    lines += ["## Teacher routing: non-activated gate mass", ""]
    if inputs.gate_mass:
        plots.gate_mass_per_layer(out / "gate_mass.png", inputs.gate_mass)
        pngs.append("gate_mass.png")
        lines += [("Router probability on experts that native top-k routing leaves out, per MoE layer: the "
                   "knowledge ALL/KA/SAR reach."), "", "![gate mass](gate_mass.png)", ""]
    else:
        lines += ["No input carries `routing_diagnostics.non_activated_gate_mass` (teacher evaluations write it).", ""]
    write_text(out / "report.md", "\n".join(lines))
    return pngs


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="ds-moekd report", description="Compare runs and evaluation results.")
    parser.add_argument("paths", nargs="+", help="run folders, `ds-moekd eval` result JSONs, or folders of either")
    parser.add_argument("--out", required=True, help="output folder for report.md and the plots")
    args = parser.parse_args(argv)
    pngs = write_report(collect(args.paths), Path(args.out))
    print(f"wrote {Path(args.out) / 'report.md'} and {', '.join(pngs)}")


if __name__ == "__main__":
    main()
