"""One rank of `ds-moekd bench e2e` (ds_moekd/bench/e2e.py starts it under torchrun): whole
distillation steps of one system on the same models and batches, timed with the ranks in step.

- `ours`: ds-moekd's own step (ds_moekd.train.train_step): EP teacher, ZeRO-3 student through
  DeepSpeed, fused-head loss, global token mean.
- `baseline`: the authors' style: the transformers teacher whole on every rank, full fp32 logits,
  a plain DDP student with torch AdamW, the loss averaged per rank.

Only `kd` has a baseline so far: the on-policy methods would need the authors' rollouts and KA's
modified router in the baseline too (docs/scale-out.md).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ds_moekd.bench.timing import _proc_status_bytes

REPO = Path(__file__).resolve().parents[2]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="ds_moekd.bench.e2e_worker")
    p.add_argument("--system", choices=("ours", "baseline"), required=True)
    p.add_argument("--config", required=True, help="run config (method, models, data, batch)")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--out", required=True, help="JSON file per rank: OUT.rank<r>.json")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("overrides", nargs="*")
    return p.parse_args(argv)


def _record(args, rank: int, step_s: list[float], tokens: list[int], losses: list[float]) -> None:
    Path(f"{args.out}.rank{rank}.json").write_text(json.dumps({
        "system": args.system, "rank": rank, "step_s": step_s, "tokens": tokens, "loss": losses,
        "peak_rss_bytes": _proc_status_bytes("VmHWM"),
    }))


def run_ours(args, cfg) -> None:
    from transformers import AutoTokenizer

    from ds_moekd import kernels
    from ds_moekd.assets import resolve_path
    from ds_moekd.device import rank_device, resolve_precision
    from ds_moekd.dist import ParallelGroups, init_distributed
    from ds_moekd.methods import build_method
    from ds_moekd.student.engine import build_student_engine
    from ds_moekd.telemetry import Stopwatch
    from ds_moekd.train import fused_head, load_teacher, train_step, training_data

    info = init_distributed(cfg.train.dist_backend)
    groups = ParallelGroups.create(ep_size=cfg.teacher.ep_size)
    device = rank_device(info.local_rank)
    precision = resolve_precision(cfg.precision, device)
    torch.manual_seed(cfg.train.seed)
    kernels.configure(expert_backend=cfg.teacher.expert_backend, loss_backend=cfg.kd.loss_backend)
    tokenizer = AutoTokenizer.from_pretrained(resolve_path(cfg.student.path))
    vocab = len(tokenizer)
    _, batches, _ = training_data(cfg, tokenizer, groups, device)
    method = build_method(cfg, tokenizer)
    teacher = load_teacher(cfg, groups, device, precision) if method.needs_teacher else None
    engine = build_student_engine(resolve_path(cfg.student.path), cfg, groups.world_size,
                                  prepare_model=fused_head(cfg, method, vocab), precision=precision, device=device)
    step_s, tokens, losses = [], [], []
    for step in range(args.steps):
        micro = [next(batches) for _ in range(cfg.train.gradient_accumulation_steps)]
        dist.barrier()
        start = time.perf_counter()
        loss, _, extras = train_step(engine, teacher, method, micro, groups, vocab, Stopwatch(), cfg.kd.token_chunk,
                                     step)
        dist.barrier()
        step_s.append(time.perf_counter() - start)
        totals = torch.tensor([extras["tokens"], loss], dtype=torch.float64)
        dist.all_reduce(totals)
        tokens.append(int(totals[0]))
        losses.append(float(totals[1]))
    _record(args, groups.rank, step_s, tokens, losses)


def _baseline_loss(student, teacher, batch, cfg, vocab: int) -> torch.Tensor:
    """Word-level KD (CE + forward KL) on full fp32 logits, averaged over this rank's response tokens."""
    logits = student(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[..., :vocab].float()
    s_logp = torch.log_softmax(batch.response_rows(logits), dim=-1)
    with torch.no_grad():
        t_logits = teacher(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[..., :vocab].float()
        t_logp = torch.log_softmax(batch.response_rows(t_logits), dim=-1)
    kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1).mean()
    ce = torch.nn.functional.nll_loss(s_logp, batch.targets[batch.loss_mask.bool()])
    return cfg.kd.ce_weight * ce + cfg.kd.kl_weight * kl


def run_baseline(args, cfg) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ds_moekd.assets import resolve_path
    from ds_moekd.dist import ParallelGroups, init_distributed
    from ds_moekd.train import training_data

    init_distributed("gloo")
    groups = ParallelGroups.create(ep_size=1)  # data parallel only: the teacher is whole on every rank
    torch.manual_seed(cfg.train.seed)
    tokenizer = AutoTokenizer.from_pretrained(resolve_path(cfg.student.path))
    vocab = len(tokenizer)
    _, batches, _ = training_data(cfg, tokenizer, groups, torch.device("cpu"))
    teacher = AutoModelForCausalLM.from_pretrained(resolve_path(cfg.teacher.path), dtype=torch.float32).eval()
    student = AutoModelForCausalLM.from_pretrained(resolve_path(cfg.student.path), dtype=torch.float32)
    student.config.use_cache = teacher.config.use_cache = False
    ddp = torch.nn.parallel.DistributedDataParallel(student)
    optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    step_s, tokens, losses = [], [], []
    for _ in range(args.steps):
        batch = next(batches)
        dist.barrier()
        start = time.perf_counter()
        loss = _baseline_loss(ddp, teacher, batch, cfg, vocab)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        dist.barrier()
        step_s.append(time.perf_counter() - start)
        totals = torch.tensor([float(batch.num_tokens), loss.item() / groups.world_size], dtype=torch.float64)
        dist.all_reduce(totals)
        tokens.append(int(totals[0]))
        losses.append(float(totals[1]))
    _record(args, groups.rank, step_s, tokens, losses)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from ds_moekd.config import load_config
    from ds_moekd.dist import shutdown

    cfg = load_config(args.config, args.overrides)
    if cfg.method != "kd":
        raise SystemExit(f"bench e2e: method {cfg.method!r} has no authors'-style baseline yet (kd only; "
                         "docs/scale-out.md says what the on-policy baselines need)")
    try:
        (run_ours if args.system == "ours" else run_baseline)(args, cfg)
    finally:
        shutdown()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
