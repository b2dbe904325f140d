"""`ds-moekd bench placement`: kd's teacher forward (native top-k) with the experts placed contiguously
against balanced by measured load (docs/parallelism.md, "Expert placement"), in the same ranks.

Each EP rank loads the teacher once per placement: contiguous (expert e on rank e // (N/E)),
balanced (packed by the per-expert loads a calibration pass over the first `--calibration`
micro-batches measured, summed over the ranks: what `teacher.expert_placement: balanced` does) and,
with `--redundant R`, balanced with 1..R replica slots per rank. The batches are the training
stream of the demo data (`--data`), cut per rank as `ds-moekd train` cuts them. Each round takes the
next micro-batch and runs each placement's forward `--iters` times, the placements in a rotating
order, timed barrier to barrier (a step waits for its slowest rank); `contiguous_again` times the
contiguous teacher a second time in each round, so its ratio to `contiguous` shows the noise.

Recorded besides the times, free of any load on the machine: the assignments each EP rank computed
per MoE layer, and their imbalance (per layer the heaviest rank over the mean, summed over layers),
expected from the calibration loads and measured on the timed batches; the largest difference of
the final hidden states to the contiguous placement's.

    ds-moekd bench placement --size random-300mb --ep 2 --rounds 30 --iters 1 --json OUT.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ds_moekd.teacher.calibration import CALIBRATION_BATCHES

from .moe_layer import _versions
from .options import is_launched_rank, parse_with_run_options, publish, run_on_local_ranks, start_ranks
from .random_teacher import SIZES, build_random_teacher
from .timing import device_name


def teacher_path(size: str, work: Path) -> str:
    """The shipped demo teacher, or a random-weight Mixtral of one of bench e2e's sizes."""
    if size == "demo":
        return "demo:teacher"
    from ds_moekd.modelfiles.assets import resolve_path

    layers, hidden, inter = SIZES[size]
    return str(build_random_teacher(work / f"teacher-{layers}x{hidden}-8x{inter}", resolve_path("demo:student"),
                                    layers=layers, hidden=hidden, inter=inter))


def training_stream(data: str, tokenizer, micro_batch: int, groups, device):
    """This rank's micro-batches of `data` as training cuts them (data.* defaults, seed 1234)."""
    from ds_moekd.config import DataConfig
    from ds_moekd.data.batching import tokenize_records
    from ds_moekd.data.chat import install_template
    from ds_moekd.data.formats import load_eval_data
    from ds_moekd.data.stream import rank_batches
    from ds_moekd.modelfiles.assets import resolve_path

    defaults = DataConfig(train_file=data)
    records = load_eval_data(str(resolve_path(data)), format=defaults.format).records
    install_template(tokenizer, conversations=any(r.messages for r in records), template=defaults.template)
    dataset = tokenize_records(records, tokenizer, max_prompt_tokens=defaults.max_prompt_tokens,
                               max_response_tokens=defaults.max_response_tokens, template=defaults.template)
    stream = rank_batches(dataset, micro_batch_size=micro_batch, dp_rank=groups.rank, dp_size=groups.world_size,
                          seed=1234, pad_token_id=tokenizer.pad_token_id)
    return (batch.to(device) for batch in stream)


def _gather(values: list[int], groups) -> list[list[int]]:
    """Each EP rank's `values`, by rank."""
    mine = torch.tensor(values, dtype=torch.long)
    everyone = [torch.empty_like(mine) for _ in range(groups.ep_size)]
    dist.all_gather(everyone, mine, group=groups.ep_group)
    return [t.tolist() for t in everyone]


def run(size: str, path: str, data: str, micro_batch: int, calibration: int, redundant: int, rounds: int, iters: int,
        warmup: int, groups, device, dtype, save_loads_to: Path | None) -> dict:
    from transformers import AutoTokenizer

    from ds_moekd.modelfiles.assets import resolve_path
    from ds_moekd.teacher import MoETeacher
    from ds_moekd.teacher.calibration import measure_expert_loads
    from ds_moekd.teacher.placement import balanced_placement, imbalance, rank_loads, save_loads
    from ds_moekd.teacher.routing import NativeTopK

    load_before = os.getloadavg()
    folder = str(resolve_path(path))
    batches = training_stream(data, AutoTokenizer.from_pretrained(folder), micro_batch, groups, device)
    contiguous = MoETeacher.from_pretrained(folder, groups=groups, dtype=dtype, device=device)
    start = time.perf_counter()
    loads_LN = measure_expert_loads(contiguous, [next(batches).model_inputs() for _ in range(calibration)],
                                    groups.world_group)
    setup_s = {"calibration": time.perf_counter() - start}
    if save_loads_to and groups.rank == 0:
        save_loads(save_loads_to, loads_LN)
    placements = {"contiguous": contiguous.placement,
                  **{_balanced_name(r): balanced_placement(loads_LN.tolist(), groups.ep_size, r)
                     for r in range(redundant + 1)}}
    teachers = {"contiguous": contiguous, "contiguous_again": contiguous}
    for name, placement in list(placements.items())[1:]:  # placed as training places them: re-read a loaded teacher
        teachers[name] = MoETeacher.from_pretrained(folder, groups=groups, dtype=dtype, device=device)
        start = time.perf_counter()
        teachers[name].place_experts(placement)
        setup_s[f"place_experts {name}"] = time.perf_counter() - start
    names = list(teachers)
    ms = {name: [] for name in names}
    assignments = {name: [[0] * groups.ep_size for _ in contiguous.moe_blocks] for name in names}
    hidden_diff = dict.fromkeys(names, 0.0)
    with torch.no_grad():
        for round_index in range(warmup + rounds):
            batch = next(batches)
            shift = round_index % len(names)
            outputs = {}
            for name in names[shift:] + names[:shift]:
                teacher, samples = teachers[name], []
                for _ in range(iters):
                    dist.barrier()
                    start = time.perf_counter()
                    hidden, _ = teacher.forward_draws(**batch.model_inputs(), routing=NativeTopK(), num_draws=1,
                                                      sequence_index=batch.example_ids, fused_head=True)
                    dist.barrier()
                    samples.append((time.perf_counter() - start) * 1e3)
                outputs[name] = hidden[0][batch.attention_mask.bool()]
                if round_index >= warmup:
                    ms[name].append(statistics.median(samples))
                    per_rank = _gather([int(b.last_load_E.sum()) for b in teacher.moe_blocks], groups)
                    for layer, row in enumerate(assignments[name]):
                        for rank in range(groups.ep_size):
                            row[rank] += per_rank[rank][layer]
            for name in names:
                diff = torch.tensor((outputs[name] - outputs["contiguous"]).abs().max().item())
                dist.all_reduce(diff, op=dist.ReduceOp.MAX)
                hidden_diff[name] = max(hidden_diff[name], diff.item())
    result = {name: {
        "median_ms": round(statistics.median(ms[name]), 2),
        "ms_by_round": [round(x, 2) for x in ms[name]],
        "over_contiguous_by_round": [round(x / c, 4) for x, c in zip(ms[name], ms["contiguous"])],
        "assignments_per_layer_per_rank": assignments[name],
        "imbalance_measured": round(imbalance(assignments[name]), 4),
        "max_abs_hidden_diff_vs_contiguous": hidden_diff[name],
    } for name in names}
    for name, entry in result.items():
        ratios = entry["over_contiguous_by_round"]
        quartiles = statistics.quantiles(ratios, n=4)
        entry.update(median_over_contiguous=round(statistics.median(ratios), 4),
                     quartiles_over_contiguous=[round(quartiles[0], 4), round(quartiles[2], 4)],
                     range_over_contiguous=[min(ratios), max(ratios)])
        placement = placements.get(name.removesuffix("_again"))
        entry.update(layers=placement.to_json()["layers"],
                     imbalance_expected=round(imbalance(rank_loads(placement, loads_LN.tolist())), 4),
                     expert_mb_per_rank=round(teachers[name].expert_param_bytes / 1e6, 1))
    config = contiguous.config
    return {
        "benchmark": "placement",
        "device": device_name(device),
        "dtype": str(dtype).removeprefix("torch."),
        "versions": _versions(),
        "teacher": {"size": size, "layers": config.num_hidden_layers, "hidden": config.hidden_size,
                    "experts": contiguous.num_experts, "top_k": contiguous.top_k,
                    # this rank's parameters plus the other ranks' experts (each holds N/E under contiguous)
                    "mb": round((sum(p.numel() * p.element_size() for p in contiguous.parameters())
                                 + (groups.ep_size - 1) * contiguous.expert_param_bytes) / 1e6, 1)},
        "ep_size": groups.ep_size,
        "micro_batch": micro_batch,
        "calibration_batches": calibration,
        "rounds": rounds,
        "iters": iters,
        "warmup_rounds": warmup,
        "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "setup_s_rank0": {k: round(v, 3) for k, v in setup_s.items()},
        "calibration_loads": loads_LN.tolist(),
        "placements": result,
        "expected_imbalance_by_ep_size": imbalance_by_ep_size(loads_LN.tolist(), redundant),
    }


def _balanced_name(redundant: int) -> str:
    return "balanced" + (f"+{redundant}" if redundant else "")


def imbalance_by_ep_size(loads_LN: list[list[float]], redundant: int) -> dict:
    """The calibration loads placed at every EP size that divides N (noise-free): where packing
    whole experts runs out (one expert per rank at EP = N), only replicas help."""
    from ds_moekd.teacher.placement import balanced_placement, contiguous_placement, imbalance, rank_loads

    num_experts, table = len(loads_LN[0]), {}
    for ep in (ep for ep in range(2, num_experts + 1) if num_experts % ep == 0):
        placements = {"contiguous": contiguous_placement(len(loads_LN), num_experts, ep),
                      **{_balanced_name(r): balanced_placement(loads_LN, ep, r) for r in range(redundant + 1)}}
        table[ep] = {name: round(imbalance(rank_loads(p, loads_LN)), 4) for name, p in placements.items()}
    return table


def format_table(result: dict) -> str:
    t = result["teacher"]
    lines = [f"{t['size']} ({t['mb']} MB): {t['layers']} layers, hidden {t['hidden']}, {t['experts']} experts, "
             f"top-{t['top_k']}; "
             f"EP {result['ep_size']}, micro-batch {result['micro_batch']}, {result['rounds']} rounds, "
             f"{result['dtype']} on {result['device']}, load {result['load_average_before_after']}",
             "| placement | median ms | / contiguous (median, quartiles, range) | imbalance expected | measured "
             "| expert MB/rank | max hidden diff |", "|---|---|---|---|---|---|---|"]
    for name, p in result["placements"].items():
        lines.append(f"| {name} | {p['median_ms']:.1f} | {p['median_over_contiguous']:.3f} "
                     f"({p['quartiles_over_contiguous'][0]:.3f}-{p['quartiles_over_contiguous'][1]:.3f}, "
                     f"{p['range_over_contiguous'][0]:.3f}-{p['range_over_contiguous'][1]:.3f}) | "
                     f"{p['imbalance_expected']:.3f} | {p['imbalance_measured']:.3f} | {p['expert_mb_per_rank']} | "
                     f"{p['max_abs_hidden_diff_vs_contiguous']:.3g} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="ds-moekd bench placement", description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["demo", *SIZES], default="random-300mb")
    parser.add_argument("--data", default="demo:data/train.jsonl", help="training data the batches come from")
    parser.add_argument("--micro-batch", type=int, default=16, help="sequences per rank")
    parser.add_argument("--calibration", type=int, default=CALIBRATION_BATCHES,
                        help="micro-batches per rank measuring the loads (default: training's)")
    parser.add_argument("--redundant", type=int, default=1, help="also balanced with 1..R replica slots per rank")
    parser.add_argument("--rounds", type=int, default=20, help="timed rounds, each on the next micro-batch")
    parser.add_argument("--save-loads", type=Path, default=None, help="write the calibration loads (JSON) here")
    parser.add_argument("--json", type=Path, default=None, help="write the result here (rank 0)")
    parser.add_argument("--work", type=Path, default=None, help="where random teachers are built (default: temporary)")
    parser.add_argument("--teacher-path", default=None, help=argparse.SUPPRESS)  # the launched ranks' teacher
    args, opts = parse_with_run_options(parser, argv, gpu_warmup=2, ep=True)
    if opts.ep < 2 or args.rounds < 2:
        raise SystemExit("bench placement: --ep 2 or more (a placement spreads experts over EP ranks), --rounds 2 "
                         "or more (the spread of the per-round ratios)")
    if not is_launched_rank():
        with tempfile.TemporaryDirectory() as scratch:
            work = args.work or Path(scratch)
            path = teacher_path(args.size, work)
            argv = sys.argv[1:] if argv is None else list(argv)
            run_on_local_ranks("ds_moekd.bench.placement", [*argv, "--teacher-path", path], opts.ep)
        return
    groups, device = start_ranks(opts)
    result = run(args.size, args.teacher_path, args.data, args.micro_batch, args.calibration, args.redundant, args.rounds,
                 opts.iters, opts.warmup, groups, device, opts.dtype, args.save_loads)
    publish(groups, format_table(result), result, args.json)


if __name__ == "__main__":
    main()
