"""`ds-moekd plan`: per-rank memory and FLOPs of a run, from config.json files and the run config
only (docs/plan.md gives every formula and what it leaves out).

    ds-moekd plan --config RUN.yaml --world-size 16 --gpu-memory 80 [--device gpu] [a.b=c ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass

from ds_moekd.config import RunConfig, load_config
from ds_moekd.methods import method_class
from ds_moekd.modelfiles.assets import DS_CONFIGS
from ds_moekd.planning.shapes import StudentShape, TeacherShape, student_shape, teacher_shape
from ds_moekd.teacher.routing import experts_per_token as routed_experts

GIB = 2**30
MIB = 2**20
# Per-process memory that no model size explains. GPU: CUDA context, NCCL buffers and the caching
# allocator's slack (a commonly seen ~1 GiB). CPU: the resident set of torch + DeepSpeed +
# transformers with a ZeRO-3 engine on a 30k-parameter student, measured with torch 2.13 (CPU
# build) on Linux (docs/plan.md); it varies with library versions.
RUNTIME_OVERHEAD = {"gpu": 1.0 * GIB, "cpu": 540 * MIB}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "bf16": 2, "fp16": 2, "fp32": 4}


@dataclass(frozen=True)
class Layout:
    world_size: int
    ep_size: int
    device: str  # gpu | cpu
    precision: str  # bf16 | fp16 | fp32
    teacher_bytes: int  # per teacher weight
    offload_optimizer: bool
    offload_params: bool
    zero_stage: int
    persistence_threshold: float = 1e5  # ZeRO-3 keeps tensors up to this size whole on every rank
    model_persistence_threshold: float = float("inf")  # ... up to this many elements in all


def resolve_layout(cfg: RunConfig, world_size: int, device: str, ep_size: int | None = None) -> Layout:
    precision = cfg.precision if cfg.precision != "auto" else ("bf16" if device == "gpu" else "fp32")
    teacher_dtype = precision if cfg.teacher.dtype == "auto" else cfg.teacher.dtype
    ds = _deepspeed_json(cfg, device)
    zero = ds.get("zero_optimization", {})
    ep = ep_size if ep_size is not None else (cfg.teacher.ep_size or world_size)
    if world_size % ep:
        raise ValueError(f"plan: teacher.ep_size={ep} must divide the world size {world_size}")
    return Layout(
        world_size=world_size, ep_size=ep, device=device, precision=precision,
        teacher_bytes=DTYPE_BYTES[teacher_dtype],
        offload_optimizer=zero.get("offload_optimizer", {}).get("device", "none") == "cpu",
        offload_params=zero.get("offload_param", {}).get("device", "none") == "cpu",
        zero_stage=int(zero.get("stage", 0)),
        persistence_threshold=float(zero.get("stage3_param_persistence_threshold", 1e5)),
        model_persistence_threshold=float(zero.get("stage3_model_persistence_threshold", float("inf"))),
    )


def _deepspeed_json(cfg: RunConfig, device: str) -> dict:
    from ds_moekd.modelfiles.assets import resolve_path

    if cfg.student.deepspeed_config == "auto":
        path = DS_CONFIGS / f"zero3_{device}.json"
    else:
        path = resolve_path(cfg.student.deepspeed_config)
    if not path.is_file():
        raise FileNotFoundError(f"plan: student.deepspeed_config {path} does not exist")
    return json.loads(path.read_text())


def experts_per_token(cfg: RunConfig, teacher: TeacherShape) -> int:
    """Experts each teacher token runs under the method's routing (docs/methods.md)."""
    return routed_experts(method_class(cfg.method).teacher_routing(cfg), teacher.num_experts, teacher.top_k)


def teacher_draws(cfg: RunConfig) -> int:
    return method_class(cfg.method).teacher_draws(cfg)


def memory_parts(cfg: RunConfig, teacher: TeacherShape | None, student: StudentShape, layout: Layout) -> dict:
    """{part: bytes on one rank's device}, and under "host:" the parts ZeRO offload moves to CPU memory."""
    W, sb = layout.world_size, DTYPE_BYTES[layout.precision]
    mixed = layout.precision != "fp32"
    on_policy = method_class(cfg.method).on_policy
    response = cfg.gkd.max_new_tokens if on_policy else cfg.data.max_response_tokens
    seq = cfg.data.max_prompt_tokens + response
    batch = cfg.data.micro_batch_size
    tokens, resp_tokens = batch * seq, batch * response
    P = student.params
    shard = W if layout.zero_stage == 3 else 1
    parts: dict[str, float] = {}
    # student under ZeRO: fp16/bf16 params and grads, fp32 master + Adam m, v (ZeRO paper's 2+2+12 bytes)
    parts["student params (ZeRO-3 partition)"] = 0 if layout.offload_params else P * sb / shard
    parts["student grads (partition)"] = P * sb / shard
    optimizer = P * (12 if mixed else 8) / shard
    parts["student optimizer states (partition)"] = 0 if layout.offload_optimizer else optimizer
    if layout.zero_stage == 3:
        parts["student gathered layers (ZeRO-3 working set)"] = 2 * student.largest_layer_params * sb
        parts["student persistent small params (whole on every rank)"] = persistent_elements(student, layout) * sb
    else:  # torch DDP: its gradient buckets are a second copy of the gradients
        parts["student DDP gradient buckets"] = P * sb
    per_layer = 6 * student.hidden + student.kv_width + 4 * student.intermediate  # values kept per token
    parts["student activations"] = tokens * per_layer * student.layers * sb
    parts["student activations, checkpointed (not in total)"] = tokens * student.hidden * student.layers * sb \
        + tokens * per_layer * sb
    if cfg.loss.fused_head:
        from ds_moekd.kernels.divergence import auto_token_chunk

        chunk = cfg.loss.token_chunk or auto_token_chunk(resp_tokens, student.vocab, student.hidden)
        parts["fused-head loss buffers"] = 4 * min(chunk, resp_tokens) * student.vocab * 4
    else:
        parts["full logits + loss buffers"] = resp_tokens * student.vocab * (sb + 4 * 4)
    if teacher is not None:
        tb, M = layout.teacher_bytes, teacher_draws(cfg)
        k = experts_per_token(cfg, teacher)
        inter = teacher.params_per_expert // (3 * teacher.hidden)
        parts["teacher replicated weights"] = teacher.replicated_params * tb
        parts["teacher expert shard"] = teacher.expert_params / layout.ep_size * tb
        if layout.device == "cpu":  # the device is the host: the block being read counts too (the loader
            # unmaps each MoE block's checkpoint pages once it is read: ds_moekd/teacher/loading.py)
            parts[LOAD_PART] = parts["teacher expert shard"] / max(1, teacher.moe_layers)
        one_draw = tokens * (8 * teacher.hidden + 3 * k * inter) * tb + resp_tokens * teacher.hidden * tb
        parts["teacher activations (one layer at a time)"] = one_draw
        if M > 1:
            parts[f"KA's {M} draws (the {M - 1} beyond the first)"] = (M - 1) * one_draw
    if on_policy:
        cache = batch * seq * student.layers * student.kv_width * sb
        parts["rollout KV cache"] = cache
        if cfg.gkd.rollout == "gather":
            parts["rollout: whole student gathered"] = P * sb
    parts["per-process runtime overhead"] = RUNTIME_OVERHEAD[layout.device]
    if layout.offload_optimizer:
        parts["host: student optimizer states"] = optimizer
    if layout.offload_params:
        parts["host: student params"] = P * sb / shard
    return parts


# Parts alive only while the teacher loads, and only while a step runs: the peak is the larger.
LOAD_PART = "teacher: one MoE block in flight while loading (CPU only)"
STEP_PARTS = ("student activations", "fused-head loss buffers", "full logits + loss buffers", "teacher activations",
              "KA's", "rollout")


def persistent_elements(student: StudentShape, layout: Layout) -> int:
    """Elements ZeRO-3 keeps whole on every rank: tensors up to the threshold, in module order,
    until the model-wide cap (DeepSpeed's mark_persistent_parameters)."""
    total = 0
    for numel in student.param_numels:
        if numel <= layout.persistence_threshold and total + numel <= layout.model_persistence_threshold:
            total += numel
    return total


def device_total(parts: dict) -> float:
    """Peak bytes on the device: what stays resident plus the larger of the load and step transients."""
    counted = {k: v for k, v in parts.items() if not k.startswith("host:") and "not in total" not in k}
    step = sum(v for k, v in counted.items() if k.startswith(STEP_PARTS))
    load = counted.get(LOAD_PART, 0.0)
    return sum(counted.values()) - step - load + max(step, load)


def flops_per_token(cfg: RunConfig, teacher: TeacherShape | None, student: StudentShape) -> dict:
    """Forward FLOPs per token of the teacher under each routing (2 per multiply-add), and the
    student's forward + backward (6 per parameter)."""
    out = {"student (fwd + bwd)": 6 * student.params}
    if teacher is None:
        return out
    per_expert = 2 * teacher.params_per_expert * teacher.moe_layers
    base = 2 * teacher.active_nonexpert_matmul_params
    for name, k, draws in (("native top-k", teacher.top_k, 1), ("all experts", teacher.num_experts, 1),
                           ("KA N-1", teacher.num_experts - 1, 1),
                           (f"this run, {teacher_draws(cfg)} draw(s)", experts_per_token(cfg, teacher), teacher_draws(cfg))):
        out[f"teacher {name} ({k} of {teacher.num_experts})"] = draws * (base + k * per_expert)
    return out


def smallest_ep(cfg, teacher, student, layout: Layout, gpu_bytes: float) -> int | None:
    """The smallest EP size (dividing the experts and the world) whose total fits `gpu_bytes`."""
    if teacher is None:
        return None
    for ep in range(1, layout.world_size + 1):
        if teacher.num_experts % ep or layout.world_size % ep:
            continue
        trial = Layout(**{**layout.__dict__, "ep_size": ep})
        if device_total(memory_parts(cfg, teacher, student, trial)) <= gpu_bytes:
            return ep
    return None


def baseline_layout(layout: Layout) -> Layout:
    """The authors'-style layout `ds-moekd bench e2e` compares against: the whole teacher on every
    rank, a torch DDP student (every parameter, gradient and AdamW state on every rank), full logits."""
    return Layout(**{**layout.__dict__, "ep_size": 1, "zero_stage": 0, "offload_optimizer": False,
                     "offload_params": False})


def plan(cfg: RunConfig, world_size: int, device: str = "gpu", gpu_memory_gib: float | None = None,
         ep_size: int | None = None, baseline: bool = False) -> dict:
    """The plan of the run, or with `baseline` of the authors'-style run of the same models and batches."""
    from ds_moekd.modelfiles.assets import resolve_path

    holds_teacher = method_class(cfg.method).needs_teacher and not cfg.teacher.cache  # a cache: no teacher loaded
    teacher = teacher_shape(resolve_path(cfg.teacher.path)) if holds_teacher else None
    student = student_shape(resolve_path(cfg.student.path))
    layout = resolve_layout(cfg, world_size, device, ep_size)
    if baseline:
        layout = baseline_layout(layout)
        cfg = dataclasses.replace(cfg, loss=dataclasses.replace(cfg.loss, fused_head=False))
    parts = memory_parts(cfg, teacher, student, layout)
    result = {"system": "baseline" if baseline else "ds-moekd", "layout": layout.__dict__, "teacher": teacher.__dict__ if teacher else None,
              "student": student.__dict__, "memory_bytes": parts, "device_total_bytes": device_total(parts),
              "flops_per_token": flops_per_token(cfg, teacher, student)}
    if gpu_memory_gib:
        result["gpu_memory_bytes"] = gpu_memory_gib * GIB
        result["fits"] = result["device_total_bytes"] <= gpu_memory_gib * GIB
        result["smallest_fitting_ep"] = smallest_ep(cfg, teacher, student, layout, gpu_memory_gib * GIB)
    if teacher is not None:
        result["suggested_ka_num_selected"] = suggest_k(teacher)
    return result


def suggest_k(teacher: TeacherShape) -> int | None:
    """On fine-grained MoEs (all experts >= 8x native), a K-of-N draw with K = 2·top-k keeps KA's
    cost at about twice native; None where all experts are cheap enough (docs/plan.md)."""
    if teacher.num_experts < 8 * teacher.top_k:
        return None
    return 2 * teacher.top_k


def render(result: dict) -> str:
    lay = result["layout"]
    lines = [f"{result['system']}: world size {lay['world_size']}, teacher EP {lay['ep_size']}, {lay['device']}, "
             f"{lay['precision']}, "
             f"ZeRO stage {lay['zero_stage']}"
             + (", optimizer offloaded" if lay["offload_optimizer"] else "")
             + (", params offloaded" if lay["offload_params"] else ""), "", "memory per rank:"]
    for part, value in result["memory_bytes"].items():
        lines.append(f"  {part:<56} {value / GIB:10.3f} GiB")
    lines.append(f"  {'peak on the device (load and step transients apart)':<56} "
                 f"{result['device_total_bytes'] / GIB:10.3f} GiB")
    if "fits" in result:
        verdict = "fits" if result["fits"] else "does NOT fit"
        line = f"  {verdict} in {result['gpu_memory_bytes'] / GIB:.0f} GiB"
        if result["teacher"] is not None:
            line += f"; smallest EP size that fits: {result['smallest_fitting_ep'] or 'none up to the world size'}"
        lines.append(line)
    lines += ["", "FLOPs per token (forward; the student forward + backward):"]
    flops = result["flops_per_token"]
    native = next((v for k, v in flops.items() if k.startswith("teacher native")), None)
    for name, value in flops.items():
        ratio = f"  ({value / native:.1f}x native)" if native and name.startswith("teacher") else ""
        lines.append(f"  {name:<56} {value / 1e9:10.3f} GFLOP{ratio}")
    k = result.get("suggested_ka_num_selected")
    if k:
        t = result["teacher"]
        lines.append(f"  fine-grained MoE: all-expert routing runs {t['num_experts'] // t['top_k']}x native's expert "
                     f"FLOPs; suggest KA's K-of-N draws with ka.num_selected={k}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="ds-moekd plan", description="Per-rank memory and FLOPs of a run, "
                                     "from config.json files and the run config only.")
    parser.add_argument("--config", required=True, help="run config (YAML or JSON)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. teacher.ep_size=8")
    parser.add_argument("--world-size", type=int, required=True, help="ranks (GPUs) in the job")
    parser.add_argument("--gpu-memory", type=float, default=None, help="GiB per device, to check the fit")
    parser.add_argument("--device", choices=("gpu", "cpu"), default="gpu")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.add_argument("--baseline", action="store_true", help="plan the authors'-style run instead: whole "
                        "teacher per rank, DDP student, full logits (what `ds-moekd bench e2e` compares against)")
    args = parser.parse_args(argv)
    result = plan(load_config(args.config, args.overrides), args.world_size, args.device, args.gpu_memory,
                  baseline=args.baseline)
    print(json.dumps(result, indent=1) if args.json else render(result))
