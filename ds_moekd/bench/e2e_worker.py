"""One rank of `ds-moekd bench e2e` (ds_moekd/bench/e2e.py starts it under torchrun): whole
distillation steps of one system on the same models and batches, timed with the ranks in step.

- `ours`: ds-moekd's own step (ds_moekd.train.train_step): EP teacher, ZeRO-3 student through
  DeepSpeed, fused-head loss, global token mean, the method's own phases (rollouts, KA's batched
  draws, SAR's router step).
- `baseline`: the authors' style on the same models and batches: the transformers teacher whole
  on every rank, full fp32 logits, a plain DDP student with torch AdamW, the loss averaged per
  rank. Each method's facts (ds_moekd/methods/registry.py) decide the step: on-policy methods
  sample rollouts, the loss terms are the method's own, the teacher's routing and draws are its
  `teacher_targets`, and a method that trains the teacher's routers gets their step. For the
  shipped methods:
  - kd: the teacher's native top-k, CE + forward KL on the dataset responses.
  - gkd: student rollouts (the same sampler and keys as ours, so the same tokens) from the plain
    student, then the teacher's native top-k and the method's divergence.
  - all: the same with the transformers teacher's `top_k` set to N (every expert, original router
    weights).
  - ka: M sequential teacher forwards, each with N-1 experts per token (KA's policy: the top N-1,
    or with probability `ka.resample_prob` N-1 drawn from the router, i.e. one expert dropped),
    keyed like ours so the draws are the same; loss = mean over draws of D(p_m, q).
  - sar: the replicated teacher with top_k = N and its routers trainable: before the student
    step a router step (teacher in train mode, KL(p||q) with the student frozen plus
    `sar.balance_weight` x sum over layers of cv^2(importance), router gradients all-reduced over
    the ranks, clipped, torch AdamW on the routers only); then the student step as for `all`.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import resource
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ds_moekd.bench.timing import _proc_status_bytes
from ds_moekd.teacher.routing import AllExperts


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="ds_moekd.bench.e2e_worker")
    p.add_argument("--system", choices=("ours", "baseline", "both"), required=True,
                   help="both: the two systems in the same ranks, alternating step by step (speed only: "
                        "their peak memory is measured in runs of their own)")
    p.add_argument("--config", required=True, help="run config (method, models, data, batch)")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--out", required=True, help="JSON file per rank: OUT.rank<r>.json")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--memory-limit-gib", type=float, default=None,
                   help="address-space limit of this rank: an allocation past it fails (out of memory) instead of "
                        "the machine swapping or its OOM killer picking a process")
    p.add_argument("overrides", nargs="*")
    return p.parse_args(argv)


class _Steps:
    """Per-step records: wall time (barrier to barrier), global tokens, global loss, phase times."""

    def __init__(self):
        self.step_s, self.tokens, self.losses, self.phases = [], [], [], []

    def add(self, seconds: float, tokens: float, loss_share: float, phases: dict[str, float]) -> None:
        self.step_s.append(seconds)
        totals = torch.tensor([tokens, loss_share], dtype=torch.float64)
        dist.all_reduce(totals)
        self.tokens.append(int(totals[0]))
        self.losses.append(float(totals[1]))
        self.phases.append({k: round(v, 6) for k, v in phases.items()})

    def as_dict(self, system: str, rank: int) -> dict:
        return {"system": system, "rank": rank, "step_s": self.step_s, "tokens": self.tokens, "loss": self.losses,
                "phases": self.phases, "peak_rss_bytes": _proc_status_bytes("VmHWM")}


def _run(steppers: dict, args, rank: int) -> None:
    """Time each system's steps, barrier to barrier; with two systems they alternate step by step,
    the order swapping every step, so both see the same load on a shared machine."""
    records = {name: _Steps() for name in steppers}
    names = list(steppers)
    for step in range(args.steps):
        for name in names if step % 2 == 0 else names[::-1]:
            enter, step_fn, leave = steppers[name]
            enter()
            watch_totals: dict[str, float] = {}
            dist.barrier()
            start = time.perf_counter()
            tokens, loss_share = step_fn(step, watch_totals)
            dist.barrier()
            records[name].add(time.perf_counter() - start, tokens, loss_share, watch_totals)
            leave()
    for name, record in records.items():
        out = args.out if len(records) == 1 else f"{args.out}-{name}"
        Path(f"{out}.rank{rank}.json").write_text(json.dumps(record.as_dict(name, rank)))


def _nothing() -> None:
    pass


def setup_ours(cfg):
    """(rank, (enter, step, leave)) of ds-moekd's own training step."""
    from transformers import AutoTokenizer

    from ds_moekd import kernels
    from ds_moekd.methods import build_method
    from ds_moekd.modelfiles.assets import resolve_path
    from ds_moekd.runtime.device import rank_device, resolve_precision
    from ds_moekd.runtime.dist import ParallelGroups, init_distributed
    from ds_moekd.runtime.telemetry import Stopwatch
    from ds_moekd.student.engine import build_student_engine
    from ds_moekd.teacher.calibration import CALIBRATION_BATCHES
    from ds_moekd.train import fused_head, load_teacher, place_teacher_experts, train_step, training_data

    info = init_distributed(cfg.train.dist_backend)
    groups = ParallelGroups.create(ep_size=cfg.teacher.ep_size)
    device = rank_device(info.local_rank)
    precision = resolve_precision(cfg.precision, device)
    torch.manual_seed(cfg.train.seed)
    kernels.configure(expert_backend=cfg.teacher.expert_backend, loss_backend=cfg.loss.backend)
    tokenizer = AutoTokenizer.from_pretrained(resolve_path(cfg.student.path))
    vocab = len(tokenizer)
    _, batches, _ = training_data(cfg, tokenizer, groups, device)
    method = build_method(cfg, tokenizer)
    teacher = load_teacher(cfg, groups, device, precision) if method.needs_teacher else None
    if teacher is not None:  # as `train` does: the same placement, on the first micro-batches
        first = [next(batches) for _ in range(CALIBRATION_BATCHES)]
        place_teacher_experts(cfg, teacher, method.routing, first)
        batches = itertools.chain(first, batches)
    engine = build_student_engine(resolve_path(cfg.student.path), cfg, groups.world_size,
                                  prepare_model=fused_head(cfg, method, vocab), precision=precision, device=device)

    def step_fn(step: int, phases: dict) -> tuple[float, float]:
        micro = [next(batches) for _ in range(cfg.train.gradient_accumulation_steps)]
        watch = Stopwatch()
        watch.totals = phases
        loss, _, extras = train_step(engine, teacher, method, micro, groups, vocab, watch, cfg.loss.token_chunk, step)
        return extras["tokens"], loss

    return groups.rank, (_nothing, step_fn, _nothing)


# ---------------------------------------------------------------- the authors'-style baseline


def _divergence(kind: str, s_logp: torch.Tensor, t_logp: torch.Tensor, beta: float) -> torch.Tensor:
    """Mean over rows of D between teacher p and student q, from full fp32 log-probabilities."""
    if kind == "forward_kl":  # KL(p||q)
        return (t_logp.exp() * (t_logp - s_logp)).sum(-1).mean()
    if kind == "reverse_kl":  # KL(q||p)
        return (s_logp.exp() * (s_logp - t_logp)).sum(-1).mean()
    if kind == "jsd":  # generalized JSD(beta): beta KL(p||m) + (1-beta) KL(q||m), m = beta p + (1-beta) q
        m_logp = torch.logsumexp(torch.stack([t_logp + torch.log(torch.tensor(beta)),
                                              s_logp + torch.log(torch.tensor(1 - beta))]), dim=0)
        return (beta * (t_logp.exp() * (t_logp - m_logp)).sum(-1)
                + (1 - beta) * (s_logp.exp() * (s_logp - m_logp)).sum(-1)).mean()
    raise ValueError(f"divergence {kind!r}")


class _BaselineRouting:
    """Routing of the transformers teacher's MoE blocks for one forward: its native top-k (None),
    every expert (top_k = N), or a ds-moekd policy (KA's draws) patched into each router, keyed
    like ds-moekd's teacher (example id, real-token position, draw) so both draw the same experts."""

    def __init__(self, teacher, source: str):
        from ds_moekd.teacher.families import get_family

        self.spec = get_family(teacher.config, source).router_spec(teacher.config)
        self.routers = [(i, layer.mlp.gate) for i, layer in enumerate(teacher.model.layers)
                        if hasattr(getattr(layer, "mlp", None), "gate") and hasattr(layer.mlp.gate, "top_k")]
        if not self.routers:
            raise SystemExit("bench e2e: the baseline teacher has no transformers top-k routers to route")
        self.native_k = self.routers[0][1].top_k
        self.policy = None
        self.context = None
        self.kept: list[torch.Tensor] | None = None  # router logits of a forward, when collecting
        for index, router in self.routers:
            router.forward = self._patched(index, router, router.forward)
            router.register_forward_hook(self._keep)

    def _keep(self, module, inputs, output) -> None:
        if self.kept is not None:
            self.kept.append(output[0])

    def _patched(self, layer_index, router, native_forward):
        from ds_moekd.teacher.routing import RoutingContext

        def forward(hidden_states):
            if self.policy is None:
                return native_forward(hidden_states)
            hidden_states = hidden_states.reshape(-1, router.weight.shape[1])
            logits_TN = F.linear(hidden_states, router.weight)
            sequence_T, position_T, draw_T = self.context
            ids_TK, weights_TK = self.policy.route(logits_TN, self.spec,
                                                   RoutingContext(layer_index, sequence_T, position_T, draw_T))
            return logits_TN, weights_TK.to(hidden_states.dtype), ids_TK
        return forward

    def set_targets(self, targets, batch, draw: int) -> None:
        """Route like `targets` (a method's TeacherTargets): native, every expert the transformers
        way (top_k = N), or the policy patched in for draw `draw`."""
        if targets.routing is None:
            self.set("native")
        elif isinstance(targets.routing, AllExperts):
            self.set("all")
        else:
            self.set("policy", targets.routing, batch, draw)

    def set(self, mode: str, policy=None, batch=None, draw: int = 0) -> None:
        """mode: native | all | policy."""
        k = self.spec.num_experts if mode == "all" else self.native_k
        for _, router in self.routers:
            router.top_k = k
        self.policy = policy if mode == "policy" else None
        if self.policy is not None:
            rows, seq = batch.input_ids.shape
            positions = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
            self.context = (batch.example_ids[:, None].expand(rows, seq).reshape(-1), positions.reshape(-1),
                            torch.full((rows * seq,), draw, dtype=torch.long))


def _teacher_logp(teacher, batch, vocab: int) -> torch.Tensor:
    logits = teacher(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[..., :vocab].float()
    return torch.log_softmax(batch.response_rows(logits), dim=-1)


def _router_step(teacher, routing, student, batch, cfg, vocab, router_params, router_opt, world) -> float:
    """SAR's router step, authors' style: the replicated teacher in train mode with every expert,
    KL(p||q) on full fp32 logits with the student frozen, plus balance_weight x sum_layers cv^2 of this
    rank's router importance; router gradients averaged over ranks (as DDP would), clipped, AdamW."""
    with torch.no_grad():
        s_logits = student(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[..., :vocab].float()
        s_logp = torch.log_softmax(batch.response_rows(s_logits), dim=-1)
    routing.set("all")
    routing.kept = []
    teacher.train()
    try:
        out = teacher(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    finally:
        teacher.eval()
        router_logits, routing.kept = routing.kept, None
    t_logp = torch.log_softmax(batch.response_rows(out.logits[..., :vocab].float()), dim=-1)
    kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1).mean()
    mask_T1 = batch.attention_mask.reshape(-1, 1).float()
    balance = 0.0
    for logits_TN in router_logits:
        importance_N = (torch.softmax(logits_TN.float(), -1) * mask_T1).sum(0)
        balance = balance + importance_N.var(unbiased=True) / (importance_N.mean() ** 2 + 1e-10)
    loss = kl + cfg.sar.balance_weight * balance
    loss.backward()
    flat = torch.cat([p.grad.flatten() for p in router_params])
    dist.all_reduce(flat)
    flat /= world
    for p, g in zip(router_params, flat.split([p.numel() for p in router_params]), strict=True):
        p.grad = g.view_as(p)
    if cfg.sar.router_grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(router_params, cfg.sar.router_grad_clip)
    router_opt.step()
    router_opt.zero_grad(set_to_none=True)
    return float(loss)


def setup_baseline(cfg):
    """(rank, (enter, step, leave)) of the authors'-style step. Built before ds-moekd's engine in
    `both` mode: transformers would load the models under ZeRO-3's Init once an engine exists."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ds_moekd.methods import StepContext, build_method
    from ds_moekd.modelfiles.assets import resolve_path
    from ds_moekd.runtime.dist import ParallelGroups, init_distributed
    from ds_moekd.runtime.telemetry import Stopwatch
    from ds_moekd.student.schedule import lr_factor
    from ds_moekd.train import training_data

    init_distributed("gloo")
    groups = ParallelGroups.create(ep_size=1)  # data parallel only: the teacher is whole on every rank
    torch.manual_seed(cfg.train.seed)
    tokenizer = AutoTokenizer.from_pretrained(resolve_path(cfg.student.path))
    vocab = len(tokenizer)
    _, batches, _ = training_data(cfg, tokenizer, groups, torch.device("cpu"))
    method = build_method(cfg, tokenizer)
    teacher_path = resolve_path(cfg.teacher.path)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_path, dtype=torch.float32).eval()
    student = AutoModelForCausalLM.from_pretrained(resolve_path(cfg.student.path), dtype=torch.float32)
    student.config.use_cache = teacher.config.use_cache = False
    teacher.requires_grad_(False)
    routing = _BaselineRouting(teacher, str(teacher_path))
    ddp = torch.nn.parallel.DistributedDataParallel(student)
    optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg.optim, cfg.train.steps))  # as ours
    router_params, router_opt = [], None
    if method.trains_teacher_routers:
        router_params = [router.weight for _, router in routing.routers]
        for p in router_params:
            p.requires_grad_(True)
        router_opt = torch.optim.AdamW(router_params, lr=cfg.sar.router_lr, weight_decay=cfg.sar.router_weight_decay)
        if cfg.sar.activation_checkpointing:  # the same setting as ours: recompute layers in the router backward
            teacher.gradient_checkpointing_enable({"use_reentrant": False})
    terms = method.terms
    linear = {"ours": None}

    def enter() -> None:
        # ZeRO-3 replaces torch's F.linear process-wide with its own autograd function when it builds the
        # student (DeepSpeed: "this will persist"); the baseline runs with torch's own, as it would alone.
        from deepspeed.runtime.zero.partition_parameters import InsertPostInitMethodToModuleSubClasses as Init

        original = getattr(Init, "linear_bk", None)
        if original is not None and F.linear is not original:
            linear["ours"] = F.linear
            F.linear = original

    def leave() -> None:
        if linear["ours"] is not None:
            F.linear, linear["ours"] = linear["ours"], None

    def step_fn(step: int, phases: dict) -> tuple[float, float]:
        batch = next(batches)
        watch = Stopwatch()
        watch.totals = phases
        if method.on_policy:  # the plain student's rollouts (DDP's module), the same sampler and keys as ours
            batch = method.responses(batch, StepContext(ddp, teacher, groups, vocab, step, watch))
        for _ in range(cfg.sar.router_steps if method.trains_teacher_routers else 0):
            with watch.time("router_s"):
                _router_step(teacher, routing, student, batch, cfg, vocab, router_params, router_opt,
                             groups.world_size)
        with watch.time("teacher_s"), torch.no_grad():
            targets = method.teacher_targets(step)
            t_logps = []
            for draw in range(targets.draws):  # M sequential forwards
                routing.set_targets(targets, batch, draw)
                t_logps.append(_teacher_logp(teacher, batch, vocab))
        with watch.time("student_s"):
            logits = ddp(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[..., :vocab].float()
            s_logp = torch.log_softmax(batch.response_rows(logits), dim=-1)
            div = sum(_divergence(terms.divergence, s_logp, t, terms.beta) for t in t_logps) / len(t_logps)
            loss = terms.div_weight * div
            if terms.ce_weight:
                loss = loss + terms.ce_weight * F.nll_loss(s_logp, batch.targets[batch.loss_mask.bool()])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.optim.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            schedule.step()
        return float(batch.num_tokens), loss.item() / groups.world_size

    return groups.rank, (enter, step_fn, leave)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_limit_gib:
        limit = int(args.memory_limit_gib * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    from ds_moekd.config import load_config
    from ds_moekd.methods import method_class
    from ds_moekd.runtime.dist import shutdown

    cfg = load_config(args.config, args.overrides)
    if not method_class(cfg.method).needs_teacher:
        raise SystemExit(f"bench e2e: method {cfg.method!r} has no authors'-style baseline: it has no teacher")
    try:
        steppers = {}
        if args.system in ("baseline", "both"):
            rank, steppers["baseline"] = setup_baseline(cfg)
        if args.system in ("ours", "both"):
            rank, steppers["ours"] = setup_ours(cfg)
        if args.system == "both":
            steppers = {"ours": steppers["ours"], "baseline": steppers["baseline"]}
        _run(steppers, args, rank)
        # The baseline's DDP reducer holds the process group. Freed at interpreter exit, it tears the
        # group down while holding the GIL, and a gloo thread releasing a tensor waits for the GIL:
        # a deadlock seen on this machine. Free it here, with every rank past the same barrier.
        dist.barrier()
        steppers.clear()
        gc.collect()
    finally:
        shutdown()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
