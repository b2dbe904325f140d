"""Run configuration: frozen dataclasses loaded from YAML/JSON plus dotted CLI overrides.

Each section validates itself (`checks()`: its fields alone); `RunConfig.checks()` holds the rules
that span sections, asking the method registry (ds_moekd/methods/registry.py) for the method's
facts. Every validation error names the field path (`optim.lr`), the bad value and, when the value
came from a file, the file and line it came from.
"""

from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ds_moekd.methods.registry import METHODS, method_class
from ds_moekd.run.errors import ConfigError

DTYPES = ("auto", "float32", "bfloat16", "float16")  # auto: follow `precision`
PRECISIONS = ("auto", "bf16", "fp16", "fp32")  # ds_moekd/runtime/device.py
DIST_BACKENDS = ("auto", "nccl", "gloo")
LR_SCHEDULES = ("cosine", "linear", "constant")  # ds_moekd/student/schedule.py
DATA_FORMATS = ("auto", "minillm", "dolly", "self-instruct", "sni", "chat")  # ds_moekd.data.formats
# ds_moekd.kernels' backends (spelled out here so loading a config does not import the kernels)
EXPERT_BACKENDS = ("auto", "torch", "triton", "torch_grouped_mm", "megablocks")
LOSS_BACKENDS = ("auto", "torch", "triton")
DIVERGENCES = ("reverse_kl", "forward_kl", "jsd")
ROLLOUT_MODES = ("gather", "layerwise")
KD_TARGETS = ("native", "all", "ka")  # the teacher routing of word-level KD (ds_moekd/methods/kd.py)
VALIDATION_METRICS = ("rouge_l", "exact_match", "exact_match_strict")
# fields that left their section: a config naming the old place is refused with the new one
MOVED_FIELDS = {
    "kd.temperature": "loss.temperature",
    "kd.token_chunk": "loss.token_chunk",
    "kd.loss_backend": "loss.backend",
    "kd.fused_head": "loss.fused_head",
}

Check = tuple[str, Any, str]  # (field name in its section, passes, what is expected)


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    train_file: str  # instruction data: a file, a saved dataset dir or a dataset name (ds_moekd.data.formats)
    valid_file: str | None = None
    format: str = "auto"  # auto, minillm, dolly, self-instruct, sni, chat (of train_file, valid_file, report.eval_file)
    split: str | None = None  # train_file's split when it is a 🤗 dataset name or saved DatasetDict
    valid_split: str | None = None  # the same for valid_file (and validation.file)
    template: str = "alpaca"  # instruction records' prompt: alpaca, or chat (the student's chat template);
    # `messages` data always uses the chat template (docs/data.md)
    max_prompt_tokens: int = 256  # longer prompts are dropped and counted
    max_response_tokens: int = 256  # longer responses are truncated
    micro_batch_size: int = 8  # sequences (packed rows with `packing`) per rank per micro-step
    packing: bool = False  # pack examples into rows of max_prompt_tokens + max_response_tokens (sft, kd)

    def checks(self) -> list[Check]:
        return [
            ("format", self.format in DATA_FORMATS, f"one of {DATA_FORMATS}"),
            ("template", self.template in ("alpaca", "chat"), "alpaca or chat"),
            ("micro_batch_size", self.micro_batch_size >= 1, "at least 1"),
            ("max_prompt_tokens", self.max_prompt_tokens >= 1, "at least 1"),
            ("max_response_tokens", self.max_response_tokens >= 1, "at least 1"),
        ]


@dataclass(frozen=True, kw_only=True)
class TeacherConfig:
    path: str | None = None  # HF-format MoE checkpoint; `demo:teacher` is the embedded default
    ep_size: int = 0  # expert-parallel size; 0 = the whole world
    dtype: str = "auto"  # auto: the run's precision (bf16 on GPUs, fp32 on CPU); or float32, bfloat16, float16
    expert_backend: str = "auto"  # expert FFN kernels (ds_moekd.kernels): auto, torch, triton, torch_grouped_mm, megablocks
    # which EP rank holds which experts (docs/parallelism.md, "Expert placement"): balanced (packed by
    # per-expert loads of a calibration pass over the first micro-batches; bit-identical logits, the
    # default by its measured speed); contiguous (expert e on rank e // (N/E)); or a loads JSON file
    # (`ds-moekd bench placement --save-loads`) to pack by
    expert_placement: str = "balanced"
    redundant_experts: int = 0  # with balanced placement: extra slots per EP rank for replicas of hot experts
    # an offline teacher cache (`ds-moekd teacher-cache`): off-policy methods read their targets from
    # it and load no teacher; `path` is then optional (compared with the cache's teacher when set)
    cache: str | None = None

    def checks(self) -> list[Check]:
        return [
            ("ep_size", self.ep_size >= 0, "0 (whole world) or a positive divisor of the world size"),
            ("dtype", self.dtype in DTYPES, f"one of {DTYPES}"),
            ("expert_backend", self.expert_backend in EXPERT_BACKENDS, f"one of {EXPERT_BACKENDS}"),
            ("expert_placement", self.expert_placement in ("contiguous", "balanced")
             or self.expert_placement.endswith(".json"), "contiguous, balanced or a loads file (.json)"),
            ("redundant_experts", self.redundant_experts == 0 or (self.redundant_experts > 0
             and self.expert_placement != "contiguous"), "0, or more with a balanced placement (or a loads file)"),
        ]


@dataclass(frozen=True, kw_only=True)
class LoRAConfig:
    """A LoRA student through peft (ds_moekd/student/lora.py); r=0 trains every weight."""

    r: int = 0  # adapter rank; 0 = off
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: str = "all-linear"  # or comma-separated module names, e.g. q_proj,v_proj
    merge: bool = False  # export the merged full model instead of the adapters

    def checks(self) -> list[Check]:
        return [
            ("r", self.r >= 0, "0 (off) or a positive rank"),
            ("dropout", 0 <= self.dropout < 1, "in [0, 1)"),
        ]


@dataclass(frozen=True, kw_only=True)
class StudentConfig:
    path: str  # HF-format causal LM folder or cached Hugging Face id; `demo:student` is the embedded default
    # auto: ds_configs/zero3_gpu.json on GPUs, ds_configs/zero3_cpu.json on CPU; its bf16/fp16
    # sections follow `precision` (ds_moekd/student/engine.py)
    deepspeed_config: str = "auto"
    gradient_checkpointing: bool = False  # recompute each layer's activations in the backward
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    allow_pickle_weights: bool = False  # load pytorch_model.bin (pickle) weights; safetensors only otherwise


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    lr: float = 5e-4
    weight_decay: float = 0.0
    warmup_steps: int = 10
    schedule: str = "cosine"  # after warmup: cosine or linear decay to min_lr_ratio, or constant
    min_lr_ratio: float = 0.1  # decay floor, as a fraction of lr
    grad_clip: float = 1.0

    def checks(self) -> list[Check]:
        return [
            ("lr", self.lr > 0, "positive"),
            ("warmup_steps", self.warmup_steps >= 0, "0 or more"),
            ("schedule", self.schedule in LR_SCHEDULES, f"one of {LR_SCHEDULES}"),
            ("min_lr_ratio", 0 <= self.min_lr_ratio <= 1, "between 0 and 1"),
        ]


@dataclass(frozen=True, kw_only=True)
class LossConfig:
    """What every method's loss shares (losses/, docs/methods.md); each method's own weights stay in
    its section (kd.ce_weight, gkd.divergence, ...)."""

    backend: str = "auto"  # divergence kernels (ds_moekd.kernels): auto, torch, triton
    fused_head: bool = True  # student (and teacher) logits formed chunk by chunk inside the loss, never whole
    token_chunk: int = 0  # tokens per loss chunk (fp32 working set chunk x vocab); 0: auto in the fused head
    # (chunk x vocab ~ tokens x hidden, ds_moekd.kernels.divergence.auto_token_chunk), all at once on full logits
    temperature: float = 1.0  # the divergence's temperature: D(softmax(p/T) || softmax(q/T))

    def checks(self) -> list[Check]:
        return [
            ("backend", self.backend in LOSS_BACKENDS, f"one of {LOSS_BACKENDS}"),
            ("token_chunk", self.token_chunk >= 0, "0 or more"),
            ("temperature", self.temperature > 0, "positive"),
        ]


@dataclass(frozen=True, kw_only=True)
class KDConfig:
    ce_weight: float = 0.5  # word-level KD: 0.5 CE + 0.5 KL(p||q) (paper's setting)
    kl_weight: float = 0.5
    # the teacher's routing: native top-k, all experts, or KA's ka.draws N-1-expert draws per example
    # (fixed per example, so an offline cache holds exactly what a live run uses)
    targets: str = "native"

    def checks(self) -> list[Check]:
        return [
            ("ce_weight", self.ce_weight >= 0, "0 or more"),
            ("kl_weight", self.kl_weight >= 0, "0 or more"),
            ("targets", self.targets in KD_TARGETS, f"one of {KD_TARGETS}"),
        ]


@dataclass(frozen=True, kw_only=True)
class GKDConfig:
    """On-policy distillation (`gkd`, and the rollouts and loss of `all`, `ka`, `sar`); defaults are the
    authors' settings (docs/methods/gkd.md)."""

    on_policy_fraction: float = 1.0  # share of examples whose response is a student rollout
    seq_kd: bool = False  # the other examples get a teacher-generated response instead of the dataset's
    divergence: str = "reverse_kl"  # reverse_kl KL(q||p) | forward_kl | jsd (generalized JSD, beta)
    beta: float = 0.5  # jsd's mixture weight
    ce_weight: float = 0.0  # CE on the (possibly self-generated) responses; the authors use none
    max_new_tokens: int = 256  # rollout length (authors: max length 512 = prompt 256 + 256)
    temperature: float = 1.0  # rollout sampling (the loss's temperature is loss.temperature)
    top_k: int = 0  # 0: no cut
    top_p: float = 1.0
    rollout: str = "gather"  # gather: whole student once per rollout; layerwise: ZeRO-3 gathers per layer

    def checks(self):
        return [
            ("on_policy_fraction", 0.0 <= self.on_policy_fraction <= 1.0, "between 0 and 1"),
            ("divergence", self.divergence in DIVERGENCES, f"one of {DIVERGENCES}"),
            ("beta", 0.0 < self.beta < 1.0, "strictly between 0 and 1"),
            ("ce_weight", self.ce_weight >= 0, "0 or more"),
            ("max_new_tokens", self.max_new_tokens >= 1, "at least 1"),
            ("temperature", self.temperature > 0, "positive"),
            ("top_k", self.top_k >= 0, "0 (off) or more"),
            ("top_p", 0.0 < self.top_p <= 1.0, "in (0, 1]"),
            ("rollout", self.rollout in ROLLOUT_MODES, f"one of {ROLLOUT_MODES}"),
        ]


@dataclass(frozen=True, kw_only=True)
class KAConfig:
    """Knowledge Augmentation's teacher draws (docs/methods/ka.md)."""

    resample_prob: float = 0.05  # per token and layer: chance of sampling the experts instead of the top-K
    num_selected: int = 0  # K experts per token; 0: N-1
    draws: int = 2  # M teacher draws per micro-batch, one batched forward; loss = mean over draws

    def checks(self):
        return [
            ("resample_prob", 0.0 <= self.resample_prob <= 1.0, "between 0 and 1"),
            ("num_selected", self.num_selected >= 0, "0 (N-1) or a number of experts"),
            ("draws", self.draws >= 1, "at least 1"),
        ]


@dataclass(frozen=True, kw_only=True)
class SARConfig:
    """The Student-Aware Router's router step (docs/methods/sar.md)."""

    router_lr: float = 1e-6  # the authors' scripts (their paper's text says 1e-5)
    router_weight_decay: float = 1e-2
    router_grad_clip: float = 1.0  # 0: no clipping
    balance_weight: float = 0.01  # x sum over layers of cv^2(importance)
    router_steps: int = 1  # router updates before each student micro-batch (0: routers stay frozen)
    activation_checkpointing: bool = True  # recompute teacher layers in the router backward
    export_teacher: bool = True  # write the SAR-tuned teacher to <run>/sar_teacher_hf at the end

    def checks(self):
        return [
            ("router_lr", self.router_lr > 0, "positive"),
            ("router_weight_decay", self.router_weight_decay >= 0, "0 or more"),
            ("router_grad_clip", self.router_grad_clip >= 0, "0 (off) or more"),
            ("balance_weight", self.balance_weight >= 0, "0 or more"),
            ("router_steps", self.router_steps >= 0, "0 or more"),
        ]


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    steps: int = 100
    epochs: int = 0  # > 0: train this many passes over the data instead of `steps`
    gradient_accumulation_steps: int = 1
    log_every: int = 1
    save_every: int = 0  # 0 = only at the end
    resume: bool = False  # continue from the newest verified checkpoint in <run_dir>/checkpoints
    seed: int = 1234
    dist_backend: str = "auto"  # auto: nccl between GPUs, gloo between CPU processes
    # Reliability (docs/reliability.md)
    overwrite: bool = False  # replace a run already in <run_dir> (otherwise refused unless resuming)
    allow_config_change: bool = False  # resume although seed, batch sizes, lr, method or models changed
    keep_checkpoints: int = 3  # newest verified checkpoints kept (0 = all)
    nonfinite: str = "skip"  # non-finite loss/gradient norm: skip the update (counted) or stop
    max_skipped_steps: int = 10  # skip: stop once more steps than this were skipped
    spike_factor: float = 3.0  # log a loss above this factor x the running mean (0 = off)
    watchdog_s: float = 300.0  # exit when a rank makes no progress for this long (0 = off)
    collective_timeout_s: float = 600.0  # torch.distributed timeout of every collective

    def checks(self) -> list[Check]:
        return [
            ("steps", self.steps >= 1, "at least 1"),
            ("epochs", self.epochs >= 0, "0 (use train.steps) or more"),
            ("gradient_accumulation_steps", self.gradient_accumulation_steps >= 1, "at least 1"),
            ("log_every", self.log_every >= 1, "at least 1"),
            ("save_every", self.save_every >= 0, "0 or more"),
            ("dist_backend", self.dist_backend in DIST_BACKENDS, f"one of {DIST_BACKENDS}"),
            ("keep_checkpoints", self.keep_checkpoints >= 0, "0 (keep all) or more"),
            ("nonfinite", self.nonfinite in ("skip", "stop"), "skip or stop"),
            ("max_skipped_steps", self.max_skipped_steps >= 0, "0 or more"),
            ("spike_factor", self.spike_factor == 0 or self.spike_factor > 1, "0 (off) or above 1"),
            ("watchdog_s", self.watchdog_s >= 0, "0 (off) or more seconds"),
            ("collective_timeout_s", self.collective_timeout_s > 0, "positive seconds"),
        ]


@dataclass(frozen=True, kw_only=True)
class ReportConfig:
    eval_file: str | None = None  # held-out set: teacher, student before/after (default: data.valid_file
    # unless validation chooses the best checkpoint on it; ds_moekd/reporting/heldout.py)
    eval_split: str | None = None  # eval_file's split when it is a 🤗 dataset name or saved DatasetDict
    eval_examples: int = 256  # how many of its records (0 = skip)
    max_new_tokens: int = 32

    def checks(self) -> list[Check]:
        return [("eval_examples", self.eval_examples >= 0, "0 or more")]


@dataclass(frozen=True, kw_only=True)
class ValidationConfig:
    every: int = 0  # score the student every N optimizer steps (0 = never); see ds_moekd/eval/validation.py
    file: str | None = None  # default: data.valid_file
    format: str = "auto"  # auto, minillm, dolly, self-instruct, sni, chat
    examples: int = 0  # the first N records (0 = all)
    max_new_tokens: int = 64
    greedy: bool = True  # False: sample (temperature 1) with `seed`
    seed: int = 10
    batch_size: int = 16
    metric: str = "rouge_l"  # decides the best checkpoint (the paper reports best-ROUGE-L checkpoints)
    keep_best: bool = True  # write the best student to <run>/best_student_hf (atomically)
    generation: str = "gather"  # gather: full student copy per rank (fast); synced: the ZeRO-3 student decodes layer by layer in lockstep

    def checks(self) -> list[Check]:
        return [
            ("every", self.every >= 0, "0 (off) or more"),
            ("format", self.format in DATA_FORMATS, f"one of {DATA_FORMATS}"),
            ("examples", self.examples >= 0, "0 (all) or more"),
            ("max_new_tokens", self.max_new_tokens >= 1, "at least 1"),
            ("batch_size", self.batch_size >= 1, "at least 1"),
            ("metric", self.metric in VALIDATION_METRICS, f"one of {VALIDATION_METRICS}"),
            ("generation", self.generation in ("gather", "synced"), "gather or synced"),
        ]


@dataclass(frozen=True, kw_only=True)
class MonitorConfig:
    """DeepSpeed's own monitors, written beside metrics.jsonl (ds_moekd/runtime/monitoring.py); all off by default."""

    csv: bool = False  # DeepSpeed's csv_monitor: one CSV per metric
    tensorboard: bool = False  # needs the tensorboard package
    wandb: bool = False  # needs wandb and a login (or WANDB_MODE=offline)
    output_path: str | None = None  # CSV and TensorBoard files; default <run_dir>/monitor
    wandb_project: str = "ds-moekd"
    wandb_team: str | None = None
    wandb_group: str | None = None


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    name: str
    method: str = "kd"
    output_dir: str = "runs"
    precision: str = "auto"  # auto: bf16 on GPUs that have it, else fp32; sets the student's and the teacher's

    data: DataConfig
    student: StudentConfig
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    kd: KDConfig = field(default_factory=KDConfig)
    gkd: GKDConfig = field(default_factory=GKDConfig)
    ka: KAConfig = field(default_factory=KAConfig)
    sar: SARConfig = field(default_factory=SARConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    def checks(self) -> list[Check]:
        """The rules that span sections; the method's facts come from its class (methods/registry.py)."""
        if self.method not in METHODS:
            return [("method", False, f"one of {tuple(METHODS)} (ds_moekd/methods/registry.py)")]
        method = method_class(self.method)
        validated_on = self.validation.file or self.data.valid_file
        return [
            ("precision", self.precision in PRECISIONS, f"one of {PRECISIONS}"),
            ("teacher.path", not method.needs_teacher or self.teacher.path or self.teacher.cache,
             f"required for method {self.method!r} (or a teacher.cache)"),
            ("teacher.cache", not self.teacher.cache or method.reads_teacher_cache,
             f"unset for method {self.method!r}: " + (
                 "it reads no teacher" if not method.needs_teacher else
                 "it scores the student's own rollouts, sampled while it trains, which no cache made before "
                 "training holds" if method.on_policy else "its teacher targets change while it trains")),
            ("data.packing", not self.data.packing or method.supports_packing,
             f"false for method {self.method!r}: packing applies to dataset responses, not rollouts"),
            ("student.lora.r", not self.student.lora.r or method.supports_lora,
             f"0 for method {self.method!r}: its rollouts need the plain student (LoRA trains with off-policy methods)"),
            ("report.eval_file", not (self.validation.every and self.validation.keep_best and self.report.eval_file
                                      and self.report.eval_file == validated_on),
             "a held-out set other than the one validation chooses the best checkpoint on"),
            ("validation.file", not self.validation.every or validated_on,
             "a validation file (or set data.valid_file)"),
        ]


def ignored_sections(cfg: RunConfig) -> list[str]:
    """Method sections set away from their defaults that the run's method does not read (a warning:
    one config often serves several methods through `method=` overrides)."""
    reads = method_class(cfg.method).sections_read(cfg)
    owned = {name for cls in METHODS.values() for name in cls.sections}
    return [name for name in sorted(owned - set(reads))
            if getattr(cfg, name) != type(getattr(cfg, name))()]


def _validate(section: Any, prefix: str = "") -> None:
    """Run the checks of every section nested in `section` (depth first), then its own: a field's own
    rule speaks before a rule spanning sections."""
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if dataclasses.is_dataclass(value):
            _validate(value, f"{prefix}{f.name}.")
    for name, ok, expected in section.checks() if hasattr(section, "checks") else []:
        if not ok:
            path = f"{prefix}{name}"
            raise ConfigError(f"config field {path}={_get_path(section, name)!r} is invalid: expected {expected}")


def _get_path(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


# --- building dataclasses from nested dicts, with field paths in every error ----------------


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check/convert one value against its annotated type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, path)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0])
    if _is_dataclass_type(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config field {path} must be a mapping, got {value!r}")
        return _build(tp, value, path)
    if tp is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads `1e-4` (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is bool and isinstance(value, bool):
        return value
    if tp is str and isinstance(value, str):
        return value
    raise ConfigError(f"config field {path}={value!r} has the wrong type: expected {tp.__name__}")


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        where = f"{prefix}.{key}" if prefix else key
        if where in MOVED_FIELDS:
            raise ConfigError(f"config field {where!r} is set in the wrong section: what every method's loss "
                              f"shares is in the loss section; use {MOVED_FIELDS[where]}")
        if key not in known:
            raise ConfigError(f"unknown config field {where!r}; known fields here: {sorted(known)}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        path = f"{prefix}.{f.name}" if prefix else f.name
        if f.name in values:
            kwargs[f.name] = _coerce(values[f.name], hints[f.name], path)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"config field {path} is required")
    return cls(**kwargs)


# --- loading -----------------------------------------------------------------------------


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.field=value")
    key, raw = item.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw) if raw != "" else ""


def _line_of(text: str, dotted: str) -> int | None:
    """Line number (1-based) of a dotted key in a YAML/JSON document, for error messages."""
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return None
    line = None
    for part in dotted.split("."):
        if not isinstance(node, yaml.MappingNode):
            break
        match = next(((k, v) for k, v in node.value if k.value == part), None)
        if match is None:
            break
        line, node = match[0].start_mark.line + 1, match[1]
    return line


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Load a YAML or JSON run config and apply `a.b=c` overrides."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text()
    try:
        raw = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {exc}") from exc
    raw = raw or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    overridden = set()
    for item in overrides:
        keys, value = _parse_override(item)
        node = raw
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {k} is not a section")
        node[keys[-1]] = value
        overridden.add(".".join(keys))
    try:
        cfg = _build(RunConfig, raw)
        _validate(cfg)
    except ConfigError as exc:
        msg = str(exc)
        match = re.search(r"config field '?([\w.]+)", msg)
        field_path = match.group(1) if match else ""
        # an override is blamed for its own field, and for an unknown section it introduced
        if any(o == field_path or o.startswith(field_path + ".") for o in overridden):
            raise ConfigError(f"{msg} (from a command-line override)") from None
        line = _line_of(text, field_path)
        raise ConfigError(f"{path}:{line}: {msg}" if line else f"{path}: {msg}") from None
    return cfg


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def check_paths_exist(cfg: RunConfig) -> None:
    """Fail early, naming the field, when an input the run reads is missing."""
    from ds_moekd.modelfiles.assets import resolve_path
    from ds_moekd.modelfiles.locate import resolve_model

    fields = {
        "data.train_file": cfg.data.train_file,
        "data.valid_file": cfg.data.valid_file,
        "report.eval_file": cfg.report.eval_file,
        "student.path": cfg.student.path,
        "student.deepspeed_config": None if cfg.student.deepspeed_config == "auto" else cfg.student.deepspeed_config,
        "teacher.path": cfg.teacher.path if method_class(cfg.method).needs_teacher else None,
        "teacher.cache": cfg.teacher.cache,
    }
    for field_path, value in fields.items():
        if value is None or (field_path.split(".")[1].endswith("_file") and _is_dataset_name(value)):
            continue
        try:  # a model may be a Hugging Face id in the local cache (ds_moekd/modelfiles/locate.py)
            exists = (resolve_model if field_path.endswith(".path") else resolve_path)(value).exists()
        except FileNotFoundError as exc:
            raise ConfigError(f"config field {field_path}={value!r}: {exc}") from None
        if not exists:
            raise ConfigError(f"config field {field_path}={value!r}: no such file or directory")


def _is_dataset_name(value: str) -> bool:
    """`org/name`-style 🤗 dataset names are not local paths (ds_moekd.data.formats draws the same line)."""
    return not value.startswith(("demo:", "/", ".")) and not value.endswith((".json", ".jsonl")) \
        and not Path(value).exists()
