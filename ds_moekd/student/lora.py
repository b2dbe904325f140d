"""A LoRA student through `peft` (`student.lora`): only the adapters train; the base stays frozen.

The engine's module is then a `PeftModel`. Exports write its adapters (`adapter_config.json`,
`adapter_model.safetensors`, loadable by `peft` and by transformers' PEFT integration, which loads
the recorded base model and applies them), or with `student.lora.merge` the full model with the
adapters merged into its weights. Validation scores the merged weights (docs/models.md).
"""

from __future__ import annotations

import warnings

import torch
from transformers import AutoModelForCausalLM


def _peft():
    try:
        import peft
    except ImportError:
        raise ImportError("student.lora needs `peft`: pip install 'ds-moekd[lora]'") from None
    return peft


def apply_lora(model, lora):
    """Wrap `model` with fresh LoRA adapters per `lora` (a LoRAConfig section)."""
    peft = _peft()
    targets = lora.target_modules if lora.target_modules == "all-linear" else \
        [name.strip() for name in lora.target_modules.split(",")]
    settings = peft.LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                               target_modules=targets, task_type="CAUSAL_LM")
    return _wrap(model, settings)


def _wrap(model, settings):
    with warnings.catch_warnings():  # peft reads transformers' deprecated `is_gradient_checkpointing`
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        return _peft().get_peft_model(model, settings)


def is_lora(model) -> bool:
    return hasattr(model, "peft_config")


def merged_model(peft_module, state: dict, dtype: torch.dtype):
    """A plain model (on the CPU) with `state`'s adapters merged into its weights; `state` is the full
    state dict of `peft_module` (gathered when ZeRO-3 partitions it)."""
    base = AutoModelForCausalLM.from_config(peft_module.get_base_model().config, dtype=dtype)
    copy = _wrap(base, peft_module.peft_config["default"])
    copy.load_state_dict(state)
    return copy.merge_and_unload()


def save_lora_student(peft_module, state: dict, out_dir, merge: bool) -> None:
    """Write the adapters of `peft_module` (weights from `state`) to `out_dir`, or the merged model."""
    if merge:
        model = merged_model(peft_module, state, next(iter(state.values())).dtype)
        model.config.use_cache = True
        model.save_pretrained(out_dir)
    else:
        peft_module.save_pretrained(out_dir, state_dict=state)
