"""The training loop. Run under a launcher, e.g.

    deepspeed --num_gpus 2 --module ds_moekd.train --config ds_configs/quickstart.yaml
    torchrun --nproc_per_node 2 -m ds_moekd.train --config ds_configs/quickstart.yaml

or in one process with `ds-moekd train --config FILE [a.b=c ...]`.

One step is the same for every method; the method supplies its phases (docs/methods.md): the
responses of each micro-batch (dataset or rollouts), an update before the student's (SAR's
router step), the teacher's routing and draws, and the loss terms.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import sys
import time

import torch
from tqdm import tqdm
from transformers import AutoTokenizer

from ds_moekd import kernels
from ds_moekd.cache.reader import TeacherCache
from ds_moekd.config import RunConfig, check_paths_exist, ignored_sections, load_config, save_config
from ds_moekd.data.batching import Batch, TokenizedDataset, tokenize_records
from ds_moekd.data.chat import install_template
from ds_moekd.data.formats import load_eval_data
from ds_moekd.data.packing import pack
from ds_moekd.data.stream import micro_batches_per_epoch, rank_batches
from ds_moekd.eval.validation import Validator
from ds_moekd.losses import backward_scale, global_token_count
from ds_moekd.losses.fused import attach_fused_loss_head, fused_loss_head
from ds_moekd.methods import StepContext, TeacherTargets, build_method, method_class
from ds_moekd.modelfiles.assets import resolve_path
from ds_moekd.modelfiles.checks import check_model_files, check_teacher_vocabulary
from ds_moekd.modelfiles.locate import resolve_model
from ds_moekd.run import checkpoints, watchdog
from ds_moekd.run.elastic import keep_global_batch
from ds_moekd.run.errors import Preempted, peer_failure, run_command
from ds_moekd.run.folder import check_run_folder, clear_previous_run
from ds_moekd.run.launcher_watch import LauncherWatch
from ds_moekd.run.lock import hold_run_folder
from ds_moekd.run.numerics import NumericsGuard, check_finite_parameters, step_outcome
from ds_moekd.run.peers import PeerHeartbeat, loss_report, lost_peer
from ds_moekd.run.preemption import StopSignal
from ds_moekd.run.record import finish_run
from ds_moekd.run.reshard import universal_resume_config
from ds_moekd.runtime.device import rank_device, resolve_precision, teacher_dtype
from ds_moekd.runtime.dist import ParallelGroups, init_distributed, set_collective_timeout, shutdown
from ds_moekd.runtime.host import configure_process
from ds_moekd.runtime.monitoring import monitor_sections
from ds_moekd.runtime.monitoring import write_record as write_monitor_record
from ds_moekd.runtime.telemetry import MetricsWriter, Stopwatch, log, peak_memory_mb, phase, setup_logging
from ds_moekd.student.engine import build_student_engine
from ds_moekd.student.schedule import total_steps
from ds_moekd.teacher import MoETeacher
from ds_moekd.teacher.calibration import CALIBRATION_BATCHES, apply_expert_placement
from ds_moekd.teacher.dense_dispatch import takes_dense_path
from ds_moekd.teacher.routing import experts_per_token


def teacher_scores(teacher, batch: Batch, vocab: int, fused: bool, targets: TeacherTargets):
    """The teacher's side of the divergence at response positions, for `targets.draws` draws stacked
    into one batched forward (each draw keyed by its index, every row by its example id): `[N, vocab]`
    logits (`[M, N, vocab]` for M > 1 draws), or for the fused head a (final hidden states `[N, H]` /
    `[M, N, H]`, lm_head weight `[vocab, H]`) pair, so the teacher's logits are formed one token chunk
    at a time as well. From a teacher cache: its top-k targets (a SparseTeacher, `[M, N, k]`)."""
    if isinstance(teacher, TeacherCache):  # read, not computed (docs/teacher-cache.md)
        return teacher.scores(batch, targets.draws)
    draws = targets.draws
    out = teacher.forward_draws(**batch.model_inputs(), routing=targets.routing, num_draws=draws,
                                sequence_index=batch.example_ids, fused_head=fused)
    x_MBSD, head_VH = out if fused else (out[..., :vocab], None)
    scores = torch.stack([batch.response_rows(x_BSD) for x_BSD in x_MBSD])
    scores = scores[0] if draws == 1 else scores
    return (scores, head_VH[:vocab]) if fused else scores


def student_forward(engine, head, batch: Batch, vocab: int):
    """The student's side at response positions, with its graph: final hidden states `[N, H]` for the
    fused lm_head `head` (losses/fused.py), else logits `[N, vocab]`; and, for methods that read the
    student before it learns (SAR's router step), its final hidden states without the graph."""
    if head is None:
        out = engine(**batch.model_inputs(), output_hidden_states=True)
        return batch.response_rows(out.logits)[:, :vocab], batch.response_rows(out.hidden_states[-1]).detach()
    out = engine(**batch.model_inputs(), output_hidden_states=True, logits_to_keep=batch.no_logits())
    hidden_NH = batch.response_rows(out.hidden_states[-1])
    return hidden_NH, hidden_NH.detach()


def student_loss(head, method, batch: Batch, student, teacher, chunk: int):
    """(loss summed over this micro-batch's response tokens, {part: sum}) from `student_forward`'s
    first output: through the fused head when there is one, else on the full logits."""
    targets = batch.targets[batch.loss_mask.bool()]
    if head is None:
        return method.terms.on_logits(student, teacher, targets, chunk)
    return head(student, teacher, targets)


def train_step(engine, teacher, method, micro_batches: list[Batch], groups: ParallelGroups, vocab: int, watch,
               chunk: int = 0, step: int = 0):
    """One optimizer step over this rank's micro-batches; returns (loss share, loss parts share, extras share).

    Each returned value is this rank's share of the global mean: summing it over ranks gives the
    loss of the whole global batch. `step` (0-based) keys every random draw of the step.
    """
    ctx = StepContext(engine, teacher, groups, vocab, step, watch, chunk)
    micro_batches = [method.responses(batch, ctx) for batch in micro_batches]  # dataset or rollouts
    ctx.metrics["tokens"] = float(sum(b.num_tokens for b in micro_batches))  # what the student trains on
    global_tokens = global_token_count([b.loss_mask for b in micro_batches], groups)
    scale = backward_scale(groups, len(micro_batches))
    head = fused_loss_head(engine.module)
    loss_sum, parts_sum = 0.0, {}
    for batch in micro_batches:
        with watch.time("student_s"):  # the student's forward once: SAR's router step reads it too
            student, student_NH = student_forward(engine, head, batch, vocab)
        method.before_student(batch, student_NH, ctx)  # e.g. SAR's router step
        scores = None
        if teacher is not None:
            with watch.time("teacher_s"), torch.no_grad():
                scores = teacher_scores(teacher, batch, vocab, head is not None, method.teacher_targets(step))
        with watch.time("student_s"):
            loss, parts = student_loss(head, method, batch, student, scores, chunk)
            loss = loss / global_tokens
            engine.backward(loss * scale)
            engine.step()
        loss_sum += loss.item()
        parts_sum = {k: parts_sum.get(k, 0.0) + v.item() / global_tokens for k, v in parts.items()}
    return loss_sum, parts_sum, ctx.metrics


def step_record(step, engine, groups, shares, watch, step_time) -> dict:
    """One metrics.jsonl line; losses and the method's extras are global (the per-rank shares summed)."""
    loss_sum, parts_sum, extras = shares
    named = {**parts_sum, **extras}
    totals = torch.tensor([loss_sum, *named.values()], dtype=torch.float64, device=engine.device)
    if groups.dp_group is not None:
        torch.distributed.all_reduce(totals, group=groups.dp_group)
    named = {k: totals[1 + i].item() for i, k in enumerate(named)}
    return {
        "step": step,
        "loss": totals[0].item(),
        **named,
        "lr": engine.get_lr()[0],
        "tokens": int(named["tokens"]),
        "tokens_per_s": named["tokens"] / step_time,
        "step_s": step_time,
        **{k: watch.totals.get(k, 0.0) for k in ("teacher_s", "student_s")},
        **{k: v for k, v in watch.totals.items() if k not in ("teacher_s", "student_s")},  # rollout_s, router_s
        "peak_memory_mb": peak_memory_mb(),
    }


def save_checkpoint(engine, method, ckpt_dir, step: int, guard: NumericsGuard, groups: ParallelGroups,
                    cfg: RunConfig) -> None:
    """Commit `ckpt_dir/step{step}` (ds_moekd/run/checkpoints.py), never with non-finite weights. The
    method's own state (SAR's routers) and the skipped-step count ride along."""
    watchdog.phase("checkpoint")
    check_finite_parameters(engine, groups.world_group, f"checkpoint step{step}")
    state = {"step": step, "method": method.state_dict(), "skipped_steps": guard.skipped}
    checkpoints.save(engine, ckpt_dir, step, state, groups, cfg)


def resume_from_checkpoint(engine, method, tag_dir, universal: bool = False) -> dict:
    """Load checkpoint `tag_dir` (None: start at step 0) into the engine (weights, optimizer,
    scheduler) and the method; return its client state."""
    if tag_dir is None:
        return {"step": 0}
    state = checkpoints.load(engine, tag_dir, universal)
    method.load_state_dict(state.get("method", {}))
    return state


def load_teacher(cfg: RunConfig, groups: ParallelGroups, device: torch.device, precision: str):
    """This rank's part of the teacher, read straight onto `device` in `teacher.dtype` (auto: `precision`)."""
    dtype = teacher_dtype(cfg.teacher.dtype, precision)
    return MoETeacher.from_pretrained(resolve_model(cfg.teacher.path), groups=groups, dtype=dtype, device=device)


def place_teacher_experts(cfg: RunConfig, teacher, routing, calibration: list[Batch]) -> None:
    """Spread the teacher's experts over the EP ranks by measured load (`teacher.expert_placement`,
    docs/parallelism.md "Expert placement"). Collective: every rank calls it with as many batches.
    Only the sparse exchange gains: on the dense path (all experts, KA's N-1) every rank already runs
    its experts on every token, so no calibration pass is spent there."""
    if takes_dense_path(experts_per_token(routing, teacher.num_experts, teacher.top_k), teacher.num_experts):
        return
    with phase("expert placement"):
        apply_expert_placement(teacher, cfg.teacher.expert_placement, cfg.teacher.redundant_experts,
                               calibration=[b.model_inputs() for b in calibration])


def fused_head(cfg: RunConfig, method, vocab: int):
    """What attaches the fused lm_head + loss head to the student before DeepSpeed wraps it (None:
    the loss runs on full logits)."""
    if not cfg.loss.fused_head:
        return None
    return lambda model: attach_fused_loss_head(
        model, vocab=vocab, terms=method.terms, chunk=cfg.loss.token_chunk, backend=cfg.loss.backend
    )


def training_examples(cfg: RunConfig, tokenizer) -> TokenizedDataset:
    """The tokenised training set (example i is the i-th kept record: every draw's and the teacher
    cache's key)."""
    with phase("data"):
        records = load_eval_data(str(resolve_path(cfg.data.train_file)), format=cfg.data.format,
                                 split=cfg.data.split).records
        used = install_template(tokenizer, conversations=any(r.messages for r in records), template=cfg.data.template)
        dataset = tokenize_records(records, tokenizer, max_prompt_tokens=cfg.data.max_prompt_tokens,
                                   max_response_tokens=cfg.data.max_response_tokens, template=cfg.data.template)
    log.info("%d training examples (%d prompts over the limit dropped), prompts in %s", len(dataset.examples),
             dataset.dropped_long_prompts, used)
    return dataset


def training_data(cfg: RunConfig, tokenizer, groups: ParallelGroups, device: torch.device):
    """The tokenised training set, this rank's endless stream of micro-batches on `device`, and the
    packed rows' example indices (None without `data.packing`)."""
    dataset = training_examples(cfg, tokenizer)
    packs = None
    if cfg.data.packing:
        packs = pack(dataset.examples, cfg.data.max_prompt_tokens + cfg.data.max_response_tokens)
        log.info("data.packing: %d examples in %d rows", len(dataset.examples), len(packs))
    batches = rank_batches(dataset, micro_batch_size=cfg.data.micro_batch_size, dp_rank=groups.dp_rank,
                           dp_size=groups.dp_size, seed=cfg.train.seed, pad_token_id=tokenizer.pad_token_id,
                           packs=packs, accumulation=cfg.train.gradient_accumulation_steps)
    return dataset, (batch.to(device) for batch in batches), packs


def with_run_length(cfg: RunConfig, rows: int, groups: ParallelGroups) -> RunConfig:
    """`cfg` with `train.steps` set from `train.epochs` when epochs are given."""
    per_epoch = micro_batches_per_epoch(rows, micro_batch_size=cfg.data.micro_batch_size, dp_size=groups.dp_size,
                                        accumulation=cfg.train.gradient_accumulation_steps)
    steps = total_steps(cfg.train.steps, cfg.train.epochs, per_epoch, cfg.train.gradient_accumulation_steps)
    if cfg.train.epochs:
        log.info("train.epochs=%d: %d optimizer steps (%d micro-batches per rank per epoch)", cfg.train.epochs,
                 steps, per_epoch)
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=steps))


def train_loop(cfg: RunConfig, engine, teacher, method, batches, groups: ParallelGroups, vocab: int, validator,
               state: dict, launchers: LauncherWatch, heartbeat: PeerHeartbeat | None) -> None:
    """Steps state["step"] + 1 .. train.steps, then the final checkpoint. All ranks stop together:
    after a stop signal or the loss of a launcher (Preempted, once the step's checkpoint is committed),
    on non-finite numerics (NumericsError, nothing written), or through the watchdog on a stalled rank;
    a rank whose peer is lost names it (PeerLost; docs/reliability.md)."""
    try:
        _steps(cfg, engine, teacher, method, batches, groups, vocab, validator, state, launchers, heartbeat)
    except Exception as exc:
        if heartbeat is None or not peer_failure(exc):
            raise
        raise lost_peer(heartbeat, exc, cfg.run_dir / "checkpoints") from exc


def _steps(cfg: RunConfig, engine, teacher, method, batches, groups: ParallelGroups, vocab: int, validator,
           state: dict, launchers: LauncherWatch, heartbeat: PeerHeartbeat | None) -> None:
    start_step, gas, ckpt_dir = state["step"], cfg.train.gradient_accumulation_steps, cfg.run_dir / "checkpoints"
    guard = NumericsGuard(cfg.train.nonfinite, cfg.train.max_skipped_steps, cfg.train.spike_factor,
                          skipped=state.get("skipped_steps", 0))
    metrics = MetricsWriter(cfg.run_dir / "metrics.jsonl", enabled=groups.rank == 0, keep_steps_upto=start_step)
    progress = tqdm(range(start_step, cfg.train.steps), initial=start_step, total=cfg.train.steps,
                    disable=groups.rank != 0, desc=cfg.method, dynamic_ncols=True)
    saved = start_step
    explain = (lambda: loss_report(heartbeat, ckpt_dir)) if heartbeat is not None else None
    with StopSignal(launchers) as stop, watchdog.Watchdog(cfg.train.watchdog_s, groups.rank, explain) as dog, metrics:
        for step in progress:
            step_start, watch = time.perf_counter(), Stopwatch()
            micro_batches = [next(batches) for _ in range(gas)]
            shares = train_step(engine, teacher, method, micro_batches, groups, vocab, watch, cfg.loss.token_chunk, step)
            record = step_record(step + 1, engine, groups, shares, watch, time.perf_counter() - step_start)
            guard.check(step + 1, record["loss"], *step_outcome(engine))  # the same verdict on every rank
            record["skipped_steps"] = guard.skipped
            if (step + 1) % cfg.train.log_every == 0 or step + 1 == cfg.train.steps:
                metrics.write(record)
                write_monitor_record(engine, record)  # DeepSpeed's monitors, when the run config enables them
            progress.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
            stopping = stop.agreed(groups.world_group)  # every rank stops after the same step
            periodic = cfg.train.save_every and (step + 1) % cfg.train.save_every == 0
            # a skipped step's checkpoint would only push an older one out of train.keep_checkpoints
            if stopping or (periodic and not guard.last_skipped):
                save_checkpoint(engine, method, ckpt_dir, step + 1, guard, groups, cfg)
                saved = step + 1
            if stopping:
                raise Preempted(f"stopped by {stop.name} after step {step + 1}; checkpoint {ckpt_dir}/step{step + 1} "
                                "is committed: resume with train.resume=true")
            if validator is not None and validator.due(step + 1):
                dog.progress(step + 1, "validation")
                validator.run(engine, step + 1)
            dog.progress(step + 1, "step")
        if saved != cfg.train.steps:
            with phase("DeepSpeed checkpoint"):
                save_checkpoint(engine, method, ckpt_dir, cfg.train.steps, guard, groups, cfg)
        dog.progress(cfg.train.steps, "export")
        check_finite_parameters(engine, groups.world_group, "the exported student")  # a bad export never replaces


def check_models(cfg: RunConfig, student_path, tokenizer) -> None:
    """Refuse pickle, truncated or mismatched model folders before anything loads their weights."""
    check_model_files(student_path, "student.path", allow_pickle=cfg.student.allow_pickle_weights)
    if method_class(cfg.method).needs_teacher and cfg.teacher.path:
        check_model_files(resolve_model(cfg.teacher.path), "teacher.path")
        check_teacher_vocabulary(resolve_model(cfg.teacher.path), tokenizer)


def train(cfg: RunConfig) -> dict:
    start_time = time.time()
    launchers = LauncherWatch.of_this_process()  # recorded first: ranks outlive a killed launcher
    check_paths_exist(cfg)
    set_collective_timeout(cfg.train.collective_timeout_s)
    threads = configure_process()
    with phase("distributed start"):
        info = init_distributed(cfg.train.dist_backend)
        setup_logging(info.rank)
        holds_teacher = method_class(cfg.method).needs_teacher and not cfg.teacher.cache
        groups = ParallelGroups.create(ep_size=cfg.teacher.ep_size if holds_teacher else 0)
    with hold_run_folder(cfg.run_dir, groups), PeerHeartbeat.running(groups) as heartbeat:
        check_run_folder(cfg)  # on every rank, before any rank writes
        log.info("watching for the loss of %s", launchers)
        return train_in_folder(cfg, info, groups, threads, start_time, launchers, heartbeat)


def train_in_folder(cfg: RunConfig, info, groups: ParallelGroups, threads: str, start_time: float,
                    launchers: LauncherWatch, heartbeat: PeerHeartbeat | None) -> dict:
    """The run, once this job holds its run folder (ds_moekd/run/lock.py)."""
    device = rank_device(info.local_rank)
    precision = resolve_precision(cfg.precision, device)
    log.info("world size %d (%s), teacher expert-parallel size %d, %s on %s (%s), %s", groups.world_size,
             info.source, groups.ep_size, precision, device,
             torch.distributed.get_backend() if groups.world_group else "1 process", threads)
    torch.manual_seed(cfg.train.seed)
    kernels.configure(expert_backend=cfg.teacher.expert_backend, loss_backend=cfg.loss.backend)
    is_main = groups.rank == 0
    run_dir = cfg.run_dir
    ckpt_dir = run_dir / "checkpoints"
    if cfg.train.resume:  # at another world size, keep the checkpoint's global batch (ds_moekd/run/elastic.py)
        cfg = keep_global_batch(cfg, ckpt_dir, groups.world_size)

    student_path = resolve_model(cfg.student.path)
    tokenizer = AutoTokenizer.from_pretrained(student_path)
    vocab = len(tokenizer)
    check_models(cfg, student_path, tokenizer)
    dataset, batches, packs = training_data(cfg, tokenizer, groups, device)
    cfg = with_run_length(cfg, len(packs if packs is not None else dataset.examples), groups)
    if is_main:
        clear_previous_run(cfg)
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    method = build_method(cfg, tokenizer)
    for name in ignored_sections(cfg):
        log.warning("the %s section is set but method %s does not read it", name, cfg.method)
    teacher = None
    if cfg.teacher.cache:  # targets read from the cache; no teacher in memory
        teacher = TeacherCache.open(cfg, tokenizer, dataset, packs)
    elif method.needs_teacher:
        with phase("teacher load"):
            teacher = load_teacher(cfg, groups, device, precision)
    resume_tag = checkpoints.resume_point(ckpt_dir, groups, cfg) if cfg.train.resume else None
    # a checkpoint of another world size resumes through a universal checkpoint (ds_moekd/run/reshard.py)
    reshard = universal_resume_config(ckpt_dir, groups.world_size, resume_tag.name) if resume_tag else {}
    with phase("student engine", "DeepSpeed compiles a C++ op on its first use, e.g. its CPU Adam: about a "
                                 "minute each, cached in TORCH_EXTENSIONS_DIR"):
        engine = build_student_engine(student_path, cfg, groups.world_size, prepare_model=fused_head(cfg, method, vocab),
                                      precision=precision, device=device,
                                      extra_config={**reshard, **monitor_sections(cfg)})
    state = resume_from_checkpoint(engine, method, resume_tag, universal=bool(reshard))
    for _ in range(state["step"] * cfg.train.gradient_accumulation_steps):  # the data stream continues
        next(batches)  # exactly where the checkpoint left it
    if isinstance(teacher, MoETeacher):  # calibrated on the next micro-batches, which then train as usual
        first = [next(batches) for _ in range(CALIBRATION_BATCHES)]
        place_teacher_experts(cfg, teacher, method.routing, first)
        batches = itertools.chain(first, batches)
    validator = Validator.create(cfg, tokenizer, groups, state["step"])  # None unless validation.every > 0
    train_loop(cfg, engine, teacher, method, batches, groups, vocab, validator, state, launchers, heartbeat)
    if isinstance(teacher, TeacherCache):
        teacher = None  # nothing to decode the held-out set with
    method.finish(StepContext(engine, teacher, groups, vocab, cfg.train.steps, Stopwatch()), run_dir)
    return finish_run(cfg, engine, teacher, tokenizer, groups, dataset, start_time)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ds-moekd train", description="Distil a MoE teacher into a student.")
    parser.add_argument("--config", required=True, help="run config (YAML or JSON)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=50 optim.lr=1e-4")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by `deepspeed`
    return parser.parse_args(argv)


def main(argv=None) -> None:
    """`python -m ds_moekd.train` and `ds-moekd train`: errors become a short message and an exit
    code (ds_moekd/run/errors.py); --debug or DS_MOEKD_DEBUG=1 adds the traceback."""
    run_command(_main, sys.argv[1:] if argv is None else list(argv), "ds-moekd train")


def _main(argv) -> None:
    args = parse_args(argv)
    try:
        train(load_config(args.config, args.overrides))
    finally:
        shutdown()


if __name__ == "__main__":
    main()
