"""The training loop. Run under a launcher, e.g.

    deepspeed --num_gpus 2 --module ds_moekd.train --config ds_configs/quickstart.yaml
    torchrun --nproc_per_node 2 -m ds_moekd.train --config ds_configs/quickstart.yaml

or in one process with `ds-moekd train --config FILE [a.b=c ...]`.
"""

from __future__ import annotations

import argparse
import time

import torch
from tqdm import tqdm
from transformers import AutoTokenizer

from ds_moekd import kernels
from ds_moekd.assets import resolve_path
from ds_moekd.config import RunConfig, check_paths_exist, load_config, save_config
from ds_moekd.data.batching import Batch, rank_batches, tokenize_records
from ds_moekd.data.formats import load_eval_data
from ds_moekd.dist import ParallelGroups, init_distributed, shutdown
from ds_moekd.eval.validation import Validator
from ds_moekd.losses import backward_scale, global_token_count
from ds_moekd.methods import build_method
from ds_moekd.run_record import finish_run
from ds_moekd.student.engine import build_student_engine
from ds_moekd.telemetry import MetricsWriter, Stopwatch, log, peak_memory_mb, phase, setup_logging


def response_rows(x_BSD: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Rows of `x` (logits or hidden states) at positions that predict response tokens, `[N, D]`."""
    return x_BSD[:, :-1][batch.loss_mask.bool()]


def no_logits(batch: Batch) -> torch.Tensor:
    """`logits_to_keep` value that makes a Hugging Face causal LM skip its lm_head (no positions)."""
    return torch.empty(0, dtype=torch.long, device=batch.input_ids.device)


def teacher_scores(teacher, batch: Batch, vocab: int, fused: bool):
    """The teacher's side of the divergence at response positions: `[N, vocab]` logits, or for the
    fused head a (final hidden states `[N, H]`, lm_head weight `[vocab, H]`) pair, so the teacher's
    logits are formed one token chunk at a time as well."""
    if not fused:
        return response_rows(teacher(batch.input_ids, attention_mask=batch.attention_mask).logits, batch)[:, :vocab]
    out = teacher(
        batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True, logits_to_keep=no_logits(batch)
    )
    return response_rows(out.hidden_states[-1], batch), teacher.get_output_embeddings().weight[:vocab]


def student_loss(engine, head, method, batch: Batch, teacher, vocab: int, chunk: int):
    """(loss summed over this micro-batch's response tokens, {part: sum}) of the student, through the
    fused lm_head `head` (losses/fused.py) when there is one, else on full logits."""
    targets = batch.targets[batch.loss_mask.bool()]
    if head is None:
        logits = engine(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        return method.terms.on_logits(response_rows(logits, batch)[:, :vocab], teacher, targets, chunk)
    out = engine(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        output_hidden_states=True,
        logits_to_keep=no_logits(batch),
    )
    return head(response_rows(out.hidden_states[-1], batch), teacher, targets)


def train_step(
    engine, teacher, method, micro_batches: list[Batch], groups: ParallelGroups, vocab: int, watch, chunk: int = 0
):
    """One optimizer step over this rank's micro-batches; returns (loss share, loss parts share).

    Each returned value is this rank's share of the global mean: summing it over ranks gives the
    loss of the whole global batch. `chunk` bounds the divergence's fp32 working set on full logits.
    """
    global_tokens = global_token_count([b.loss_mask for b in micro_batches], groups)
    scale = backward_scale(groups, len(micro_batches))
    head = getattr(engine.module, "kd_head", None)  # the fused lm_head + loss, when attached
    loss_sum, parts_sum = 0.0, {}
    for batch in micro_batches:
        scores = None
        if teacher is not None:
            with watch.time("teacher_s"), torch.no_grad():
                scores = teacher_scores(teacher, batch, vocab, fused=head is not None)
        with watch.time("student_s"):
            loss, parts = student_loss(engine, head, method, batch, scores, vocab, chunk)
            loss = loss / global_tokens
            engine.backward(loss * scale)
            engine.step()
        loss_sum += loss.item()
        parts_sum = {k: parts_sum.get(k, 0.0) + v.item() / global_tokens for k, v in parts.items()}
    return loss_sum, parts_sum


def step_record(step, engine, groups, micro_batches, loss_sum, parts_sum, watch, step_time) -> dict:
    """One metrics.jsonl line; losses are global means (the per-rank shares summed)."""
    local_tokens = sum(b.num_tokens for b in micro_batches)
    totals = torch.tensor([loss_sum, float(local_tokens), *parts_sum.values()], dtype=torch.float64)
    if groups.dp_group is not None:
        torch.distributed.all_reduce(totals, group=groups.dp_group)
    return {
        "step": step,
        "loss": totals[0].item(),
        **{k: totals[2 + i].item() for i, k in enumerate(parts_sum)},
        "lr": engine.get_lr()[0],
        "tokens": int(totals[1].item()),
        "tokens_per_s": totals[1].item() / step_time,
        "step_s": step_time,
        "teacher_s": watch.totals.get("teacher_s", 0.0),
        "student_s": watch.totals.get("student_s", 0.0),
        "peak_memory_mb": peak_memory_mb(),
    }


def save_checkpoint(engine, ckpt_dir, step: int) -> None:
    # DeepSpeed writes the tag folder first and `latest` last: a crash mid-save leaves `latest`
    # on the previous complete checkpoint.
    engine.save_checkpoint(str(ckpt_dir), tag=f"step{step}", client_state={"step": step})


def resume_from_checkpoint(engine, ckpt_dir) -> int:
    """Load `ckpt_dir/latest` into the engine (weights, optimizer, scheduler); return its step."""
    if not (ckpt_dir / "latest").is_file():
        log.info("train.resume: no checkpoint in %s yet, starting at step 0", ckpt_dir)
        return 0
    path, client_state = engine.load_checkpoint(str(ckpt_dir))
    if path is None:
        raise RuntimeError(f"train.resume: DeepSpeed could not load the checkpoint in {ckpt_dir}")
    log.info("resumed from %s at step %d", path, client_state["step"])
    return int(client_state["step"])


def load_teacher(cfg: RunConfig, groups: ParallelGroups):
    from ds_moekd.teacher import MoETeacher

    dtype = getattr(torch, cfg.teacher.dtype)
    return MoETeacher.from_pretrained(resolve_path(cfg.teacher.path), groups=groups, dtype=dtype)


def fused_head(cfg: RunConfig, method, vocab: int):
    """What attaches the fused lm_head + loss head to the student before DeepSpeed wraps it (None:
    the loss runs on full logits)."""
    if not cfg.kd.fused_head:
        return None
    from ds_moekd.losses.fused import attach_fused_loss_head

    return lambda model: attach_fused_loss_head(
        model, vocab=vocab, terms=method.terms, chunk=cfg.kd.token_chunk, backend=cfg.kd.loss_backend
    )


def train(cfg: RunConfig) -> dict:
    start_time = time.time()
    check_paths_exist(cfg)
    with phase("distributed start"):
        info = init_distributed()
        setup_logging(info.rank)
        groups = ParallelGroups.create(ep_size=cfg.teacher.ep_size if cfg.method != "sft" else 0)
    log.info("world size %d (%s), teacher expert-parallel size %d", groups.world_size, info.source, groups.ep_size)
    torch.manual_seed(cfg.train.seed)
    kernels.configure(expert_backend=cfg.teacher.expert_backend, loss_backend=cfg.kd.loss_backend)
    is_main = groups.rank == 0
    run_dir = cfg.run_dir
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")

    student_path = resolve_path(cfg.student.path)
    tokenizer = AutoTokenizer.from_pretrained(student_path)
    vocab = len(tokenizer)
    with phase("data"):
        dataset = tokenize_records(
            load_eval_data(str(resolve_path(cfg.data.train_file)), format=cfg.data.format).records,
            tokenizer,
            max_prompt_tokens=cfg.data.max_prompt_tokens,
            max_response_tokens=cfg.data.max_response_tokens,
        )
    log.info("%d training examples (%d prompts over the limit dropped)", len(dataset.examples),
             dataset.dropped_long_prompts)
    batches = rank_batches(
        dataset,
        micro_batch_size=cfg.data.micro_batch_size,
        dp_rank=groups.dp_rank,
        dp_size=groups.dp_size,
        seed=cfg.train.seed,
        pad_token_id=tokenizer.pad_token_id,
    )
    method = build_method(cfg)
    with phase("teacher load"):
        teacher = load_teacher(cfg, groups) if method.needs_teacher else None
    with phase("student engine"):
        engine = build_student_engine(student_path, cfg, groups.world_size, prepare_model=fused_head(cfg, method, vocab))
    ckpt_dir = run_dir / "checkpoints"
    start_step = resume_from_checkpoint(engine, ckpt_dir) if cfg.train.resume else 0
    gas = cfg.train.gradient_accumulation_steps
    for _ in range(start_step * gas):  # the data stream continues exactly where the checkpoint left it
        next(batches)
    metrics = MetricsWriter(run_dir / "metrics.jsonl", enabled=is_main, keep_steps_upto=start_step)
    validator = Validator.create(cfg, tokenizer, groups, start_step)  # None unless validation.every > 0
    steps = range(start_step, cfg.train.steps)
    progress = tqdm(steps, initial=start_step, total=cfg.train.steps, disable=not is_main, desc=cfg.method,
                    dynamic_ncols=True)
    for step in progress:
        step_start, watch = time.perf_counter(), Stopwatch()
        micro_batches = [next(batches) for _ in range(gas)]
        loss_sum, parts_sum = train_step(engine, teacher, method, micro_batches, groups, vocab, watch,
                                         cfg.kd.token_chunk)
        record = step_record(step + 1, engine, groups, micro_batches, loss_sum, parts_sum, watch,
                             time.perf_counter() - step_start)
        if (step + 1) % cfg.train.log_every == 0 or step + 1 == cfg.train.steps:
            metrics.write(record)
        progress.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
        if cfg.train.save_every and (step + 1) % cfg.train.save_every == 0:
            save_checkpoint(engine, ckpt_dir, step + 1)
        if validator is not None and validator.due(step + 1):
            validator.run(engine, step + 1)
    metrics.close()
    with phase("DeepSpeed checkpoint"):
        if not (cfg.train.save_every and cfg.train.steps % cfg.train.save_every == 0):
            save_checkpoint(engine, ckpt_dir, cfg.train.steps)
    return finish_run(cfg, engine, teacher, tokenizer, groups, dataset, start_time)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ds-moekd train", description="Distil a MoE teacher into a student.")
    parser.add_argument("--config", required=True, help="run config (YAML or JSON)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=50 optim.lr=1e-4")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by `deepspeed`
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        train(load_config(args.config, args.overrides))
    finally:
        shutdown()


if __name__ == "__main__":
    main()
