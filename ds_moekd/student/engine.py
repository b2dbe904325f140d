"""The student: a Hugging Face causal LM trained inside a DeepSpeed ZeRO-3 engine."""

from __future__ import annotations

import json
from pathlib import Path

import deepspeed
import torch
from transformers import AutoModelForCausalLM
from transformers.integrations import HfDeepSpeedConfig

from ds_moekd.config import RunConfig
from ds_moekd.modelfiles.assets import CHECKOUT
from ds_moekd.runtime.device import PRECISION_DTYPES, default_deepspeed_config
from ds_moekd.runtime.dist import init_distributed
from ds_moekd.runtime.telemetry import log
from ds_moekd.student.lora import apply_lora
from ds_moekd.student.schedule import lr_factor
from ds_moekd.student.zero3 import coalesce_persistent_gather, fetch_whole_layers

# Values of the DeepSpeed JSON that the run config owns; "auto" in the JSON means "fill in".
_AUTO_FIELDS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping")


def deepspeed_config_path(requested: str, device: torch.device) -> Path:
    """`student.deepspeed_config`; auto picks the shipped ZeRO-3 JSON for the device kind."""
    if requested != "auto":
        return Path(requested)
    return CHECKOUT / default_deepspeed_config(device)


def load_deepspeed_config(path: str | Path, cfg: RunConfig, world_size: int, precision: str = "fp32") -> dict:
    """Read the DeepSpeed JSON and fill the batch/optimizer values and the precision sections
    (`bf16`, `fp16`) from the run config (`precision` resolved by ds_moekd/runtime/device.py)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"student.deepspeed_config: {path} does not exist")
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    filled = {
        "train_micro_batch_size_per_gpu": cfg.data.micro_batch_size,
        "gradient_accumulation_steps": cfg.train.gradient_accumulation_steps,
        "gradient_clipping": cfg.optim.grad_clip,
    }
    for key in _AUTO_FIELDS:
        if ds.get(key, "auto") not in ("auto", filled[key]):
            raise ValueError(
                f"{path}: {key}={ds[key]!r} conflicts with the run config ({filled[key]!r}); set it to \"auto\""
            )
        ds[key] = filled[key]
    for section, enabled in (("bf16", precision == "bf16"), ("fp16", precision == "fp16")):
        current = ds.get(section, {}).get("enabled", "auto")
        if current not in ("auto", enabled):
            raise ValueError(
                f"{path}: {section}.enabled={current!r} conflicts with precision={precision!r}; "
                "set it to \"auto\" and choose with the run config's `precision`"
            )
        ds.setdefault(section, {})["enabled"] = enabled
    ds["train_batch_size"] = cfg.data.micro_batch_size * cfg.train.gradient_accumulation_steps * world_size
    params = ds.get("optimizer", {}).get("params", {})
    for key, value in (("lr", cfg.optim.lr), ("weight_decay", cfg.optim.weight_decay)):
        if params.get(key) == "auto":
            params[key] = value
    return ds


def build_student_engine(model_path: Path, cfg: RunConfig, world_size: int, prepare_model=None,
                         precision: str = "fp32", device: torch.device | None = None, extra_config: dict | None = None):
    """Load the student and wrap it in a DeepSpeed engine (ZeRO stage from the JSON) that trains in
    `precision` on `device`; `prepare_model` (model -> None) runs in between, e.g. to attach the
    fused loss head (losses/fused.py). `extra_config`: top-level DeepSpeed JSON sections the run
    adds (universal-checkpoint loading, monitors); a section the JSON already has is merged into."""
    init_distributed(cfg.train.dist_backend)  # idempotent; DeepSpeed needs its comm layer before initialize
    device = torch.device("cpu") if device is None else device
    ds_path = deepspeed_config_path(cfg.student.deepspeed_config, device)
    ds_config = load_deepspeed_config(ds_path, cfg, world_size, precision)
    for section, values in (extra_config or {}).items():
        ds_config[section] = {**ds_config.get(section, {}), **values}
    log.info("student: DeepSpeed config %s, precision %s, on %s", ds_path, precision, device)
    model = _load_student(model_path, ds_config, PRECISION_DTYPES[precision])
    model.config.use_cache = False  # training forward; generation turns it back on
    if cfg.student.gradient_checkpointing:  # non-reentrant: works with frozen inputs (LoRA) and ZeRO-3
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if prepare_model is not None:
        prepare_model(model)
    if cfg.student.lora.r:
        model = apply_lora(model, cfg.student.lora)
    if ds_config.get("zero_optimization", {}).get("stage") == 3:
        fetch_whole_layers(model)
    has_ds_optimizer = "optimizer" in ds_config
    trainable = [p for p in model.parameters() if p.requires_grad]  # LoRA: the adapters only
    optimizer = None
    if not has_ds_optimizer:
        optimizer = torch.optim.AdamW(trainable, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    schedule = lr_factor(cfg.optim, cfg.train.steps)
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        model_parameters=trainable if has_ds_optimizer else None,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
        config=ds_config,
    )
    coalesce_persistent_gather(engine.optimizer)  # one exchange per step for the small parameters
    return engine


def _load_student(model_path: Path, ds_config: dict, dtype: torch.dtype):
    """With ZeRO-3 the model is built under `deepspeed.zero.Init` (transformers does so while an
    HfDeepSpeedConfig is alive): each rank materialises only its partition, so a student larger
    than one device still loads. The config object is dropped right after, so later
    `from_pretrained` calls (validation replicas, reports) load whole models again."""
    if ds_config.get("zero_optimization", {}).get("stage") != 3:
        return AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
    zero3_loading = HfDeepSpeedConfig(ds_config)  # noqa: F841 - transformers holds a weak reference
    return AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
