"""`ds-moekd eval`: score a student or a teacher checkpoint on instruction data.

    ds-moekd eval --model DIR --data FILE_OR_DATASET --out results.json [options]
    torchrun --nproc_per_node 2 -m ds_moekd.eval.cli --model DIR --data FILE --out results.json
    deepspeed --num_gpus 2 --module ds_moekd.eval.cli --model DIR --data FILE --ep-size 2 --out results.json

Prompts are sharded over ranks. A dense model runs as transformers' own model, replicated on every
rank. The process is set up as for training: `--precision` (auto: bf16 on GPUs that have it, else
fp32) sets the dtype unless `--dtype` names one, and threads and LOCAL_SIZE come from
ds_moekd/runtime/host.py. A MoE teacher (config.json's model_type one of the teacher families) runs as the
expert-parallel `MoETeacher` under any `--routing`, decoding with its KV cache in lockstep with its
EP group; `--backend hf` runs it as transformers' own model instead (native routing, one rank's full
copy: a cross-check).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, AutoTokenizer

from ds_moekd.data.formats import FORMATS, load_eval_data
from ds_moekd.decoding import HFForward
from ds_moekd.eval.router_mass import non_activated_gate_mass
from ds_moekd.eval.runner import TEMPLATES, evaluate, load_settings, prompt_ids
from ds_moekd.modelfiles.assets import resolve_path
from ds_moekd.modelfiles.checks import check_model_files
from ds_moekd.modelfiles.locate import resolve_model
from ds_moekd.run.atomic import write_text
from ds_moekd.run.errors import UserError
from ds_moekd.runtime.device import DTYPE_NAMES, PRECISION_DTYPES, PRECISIONS, bind_device, resolve_precision
from ds_moekd.runtime.dist import ParallelGroups, discover_ranks, init_distributed, shutdown
from ds_moekd.runtime.host import configure_process
from ds_moekd.teacher import MoETeacher
from ds_moekd.teacher.families import FAMILIES
from ds_moekd.teacher.routing import AllExperts, KASample, NativeTopK

ROUTINGS = ("native", "all", "ka")


def routing_policy(args: argparse.Namespace, num_experts: int):
    """The routing policy of `--routing` (KA: `--ka-*`, K defaulting to N-1) and its settings record."""
    if args.routing == "native":
        return NativeTopK(), {"policy": "native"}
    if args.routing == "all":
        return AllExperts(), {"policy": "all", "num_selected": num_experts}
    num_selected = num_experts - 1 if args.ka_num_selected is None else args.ka_num_selected
    policy = KASample(resample_prob=args.ka_resample_prob, num_selected=num_selected, seed=args.ka_seed)
    return policy, {"policy": "ka", "resample_prob": policy.resample_prob, "num_selected": num_selected,
                    "seed": policy.seed}


def is_moe_checkpoint(path: Path) -> bool:
    """config.json's model_type is a teacher family (read directly: transformers knows no llama_moe)."""
    config = path / "config.json"
    return config.is_file() and json.loads(config.read_text()).get("model_type") in FAMILIES


def choose_backend(requested: str, *, moe: bool, routing: str, ep_size: int) -> str:
    if not moe:
        if routing != "native" or ep_size != 1 or requested == "moe":
            raise ValueError("--routing/--ep-size/--backend moe apply to a MoE teacher checkpoint; "
                             "this model's config.json is not one of the supported MoE families")
        return "hf"
    if requested == "hf" and (routing != "native" or ep_size != 1):
        raise ValueError(f"--backend hf runs transformers' own model: native routing on one rank's full copy "
                         f"only (got --routing {routing}, --ep-size {ep_size}); use --backend moe")
    return "moe" if requested == "auto" else requested


def gate_diagnostics(teacher, tokenizer, data, settings, info, world_group, lockstep_group, routing) -> dict:
    """Non-activated router mass per MoE layer on this eval set's kept prompts (sharded like decoding)."""
    encoded = [prompt_ids(r, tokenizer, settings.template) for r in data.records]
    mine = [i for i, ids in enumerate(encoded) if len(ids) <= settings.max_prompt_tokens][info.rank::info.world_size]
    return non_activated_gate_mass(teacher, [encoded[i] for i in mine], mine, tokenizer.pad_token_id,
                                   batch_size=settings.batch_size, routing=routing, world_group=world_group,
                                   lockstep_group=lockstep_group)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="ds-moekd eval", description="Evaluate a model (ROUGE-L, exact match).")
    p.add_argument("--model", required=True, help="HF model dir or cached model id (student, or MoE teacher); demo:student works")
    p.add_argument("--data", required=True, help="JSONL/JSON file, S-NI task folder, saved dataset dir or dataset name")
    p.add_argument("--format", default="auto", choices=("auto", *FORMATS))
    p.add_argument("--references", help="answers file for Vicuna questions (`text` or `choices[0].turns`)")
    p.add_argument("--split", help="dataset split (🤗 datasets with several splits)")
    p.add_argument("--config", help="evaluation settings YAML, e.g. ds_configs/eval/minillm.yaml")
    p.add_argument("--template", choices=TEMPLATES)
    p.add_argument("--seeds", type=lambda s: tuple(int(x) for x in s.split(",")), help="e.g. 10,20,30,40,50")
    p.add_argument("--greedy", action="store_true", default=None, help="greedy decoding (one run)")
    p.add_argument("--temperature", type=float)
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--max-prompt-tokens", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--routing", default="native", choices=ROUTINGS, help="teacher routing: native top-k, all "
                   "experts, or KA (top-K, resampled from the router's distribution with --ka-resample-prob)")
    p.add_argument("--ka-resample-prob", type=float, help="KA: per token and layer, probability of drawing the "
                   "K experts from the router instead of taking the top-K (default 0.05)")
    p.add_argument("--ka-num-selected", type=int, help="KA: K, experts per token (default N-1)")
    p.add_argument("--ka-seed", type=int, help="KA: seed of the routing draws (default 0)")
    p.add_argument("--backend", default="auto", choices=("auto", "hf", "moe"))
    p.add_argument("--ep-size", type=int, default=1, help="teacher expert-parallel size (0: the whole world)")
    p.add_argument("--precision", default="auto", choices=PRECISIONS, help="as training's `precision`: auto is bf16 "
                   "on GPUs that have it, else fp32")
    p.add_argument("--dtype", choices=tuple(DTYPE_NAMES), help="model dtype (default: from --precision)")
    p.add_argument("--name", help="name of the eval set in reports (default: from the data path)")
    p.add_argument("--label", help="name of this system in reports (default: model dir, plus routing for a teacher)")
    p.add_argument("--out", required=True, help="results JSON")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by `deepspeed`
    return p.parse_args(argv)


def model_dtype(args: argparse.Namespace, device: torch.device) -> torch.dtype:
    """`--dtype` when given, else the dtype of `--precision` on this device (as training's teacher)."""
    return DTYPE_NAMES[args.dtype] if args.dtype else PRECISION_DTYPES[resolve_precision(args.precision, device)]


def main(argv=None) -> dict:
    args = parse_args(argv)
    configure_process()  # threads and LOCAL_SIZE, as `ds-moekd train` sets them
    settings = load_settings(args.config, template=args.template, seeds=args.seeds, greedy=args.greedy,
                             temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                             max_prompt_tokens=args.max_prompt_tokens, batch_size=args.batch_size)
    try:  # a folder, or a Hugging Face id already in the local cache: never a hub lookup
        model_dir = resolve_model(args.model)
    except FileNotFoundError as exc:
        raise UserError(f"--model {args.model}: no such model folder; {exc}") from None
    if not model_dir.is_dir():
        raise UserError(f"--model {args.model}: no such model folder")
    check_model_files(model_dir, "--model")  # safetensors only, no truncated shards
    data_source = str(resolve_path(args.data))
    moe = is_moe_checkpoint(model_dir)
    info = discover_ranks()
    if info.world_size > 1:
        init_distributed()  # binds the rank to its GPU first (ds_moekd/runtime/device.py)
    ep_size = info.world_size if args.ep_size == 0 else args.ep_size
    backend = choose_backend(args.backend, moe=moe, routing=args.routing, ep_size=ep_size)
    ka_options = (args.ka_resample_prob, args.ka_num_selected, args.ka_seed)
    if args.routing != "ka" and any(v is not None for v in ka_options):
        raise ValueError("--ka-resample-prob/--ka-num-selected/--ka-seed apply to --routing ka")
    args.ka_resample_prob = 0.05 if args.ka_resample_prob is None else args.ka_resample_prob
    args.ka_seed = 0 if args.ka_seed is None else args.ka_seed
    data = load_eval_data(data_source, format=args.format, references=args.references, split=args.split)
    device = bind_device(info.local_rank)
    dtype = model_dtype(args, device)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    groups = ParallelGroups.create(ep_size=ep_size) if backend == "moe" else ParallelGroups.single()
    if backend == "moe":
        model = MoETeacher.from_pretrained(str(model_dir), groups=groups, dtype=dtype, device=device)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, device_map=str(device)).eval()
    routing, routing_settings = None, None
    if moe:  # all/ka run on the MoETeacher only (choose_backend)
        num_experts = model.family.router_spec(model.config).num_experts if backend == "moe" else None
        routing, routing_settings = routing_policy(args, num_experts)
    world_group = dist.group.WORLD if info.world_size > 1 else None
    forward = model.decoding_forward(routing) if backend == "moe" else HFForward(model)
    results = evaluate(forward, tokenizer, data, settings, rank=info.rank, world_size=info.world_size,
                       world_group=world_group)
    results["settings"]["routing"] = routing_settings
    if moe:
        if backend == "hf":  # the diagnostics read the MoETeacher's gates (every family's router)
            model = MoETeacher.from_pretrained(str(model_dir), dtype=dtype, device=device)
        results["routing_diagnostics"] = gate_diagnostics(model, tokenizer, data, settings, info, world_group,
                                                          groups.ep_group, routing)
    results["model"] = {
        "path": args.model, "label": args.label or (f"{model_dir.name} ({args.routing})" if moe else model_dir.name),
        "kind": "teacher" if moe else "student", "routing": args.routing if moe else None,
        "backend": "transformers" if backend == "hf" else "MoETeacher", "ep_size": ep_size if backend == "moe" else None,
        "dtype": str(dtype).removeprefix("torch."),
    }
    results["data"] = {"source": args.data, "format": data.format, "references": args.references,
                       "name": args.name or _default_name(Path(data_source))}
    if info.rank == 0:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_text(out, json.dumps(results, indent=2) + "\n")
        print(_summary_line(results))
    return results


def _default_name(path: Path) -> str:
    """`dolly/valid.jsonl` -> dolly, `data/test.jsonl` -> test, `questions.jsonl` -> questions."""
    generic = path.stem in ("valid", "validation", "test", "dev") and path.parent.name not in ("", "data")
    return path.parent.name if generic else path.stem


def _summary_line(results: dict) -> str:
    c = results["counts"]
    return (f"{results['model']['label']} on {results['data']['name']}: ROUGE-L {results['rouge_l']['mean']:.2f} "
            f"± {results['rouge_l']['std']:.2f}, exact match {results['exact_match']['mean']:.2f} "
            f"(strict {results['exact_match_strict']['mean']:.2f}); evaluated {c['evaluated']} of {c['records']} "
            f"({100 * c['evaluated_fraction']:.1f}%), dropped {c['dropped_long_prompt']} long prompts, "
            f"{c['dropped_no_reference']} without reference")


if __name__ == "__main__":
    try:
        main()
    finally:
        shutdown()
