"""Student options on 2 real ZeRO-3 ranks: gradient checkpointing changes no step; a LoRA student
trains only its adapters and exports them (or the merged model), checked against the adapter math."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from helpers import REPO
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from ds_moekd.config import DataConfig, LoRAConfig, OptimConfig, RunConfig, StudentConfig, TrainConfig
from ds_moekd.data.batching import tokenize_records
from ds_moekd.data.formats import load_eval_data
from ds_moekd.data.stream import rank_batches
from ds_moekd.methods import build_method
from ds_moekd.runtime.dist import ParallelGroups
from ds_moekd.runtime.telemetry import Stopwatch

pytest.importorskip("peft")


def _config(student: str, **student_options) -> RunConfig:
    return RunConfig(name="opt", method="sft", data=DataConfig(train_file="unused", micro_batch_size=2),
                     student=StudentConfig(path=student, deepspeed_config=str(REPO / "ds_configs/zero3_cpu.json"),
                                           **student_options),
                     optim=OptimConfig(lr=1e-2, warmup_steps=0, schedule="constant"), train=TrainConfig(steps=2))


def _steps_on_rank(student: str, data_file: str, out: str | None, steps: int, **student_options):
    import deepspeed

    from ds_moekd.student.engine import build_student_engine
    from ds_moekd.student.export import export_hf
    from ds_moekd.train import train_step

    groups = ParallelGroups.create(ep_size=1)
    cfg = _config(student, **student_options)
    tokenizer = AutoTokenizer.from_pretrained(student)
    data = tokenize_records(load_eval_data(data_file).records[:16], tokenizer, max_prompt_tokens=256,
                            max_response_tokens=32)
    batches = rank_batches(data, micro_batch_size=2, dp_rank=groups.dp_rank, dp_size=2, seed=0,
                           pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    engine = build_student_engine(Path(student), cfg, world_size=2)
    losses = [train_step(engine, None, build_method(cfg, tokenizer), [next(batches)], groups, len(tokenizer),
                         Stopwatch())[0] for _ in range(steps)]
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params):
        state = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
    if out is not None:
        for merge in (False, True):
            export_hf(engine, tokenizer, Path(out) / ("merged" if merge else "adapters"), groups, merge_lora=merge)
    total = torch.tensor(losses, dtype=torch.float64)
    dist.all_reduce(total)
    checkpointing = engine.module.is_activation_checkpointing if hasattr(engine.module, "is_activation_checkpointing") \
        else None
    return {"losses": total.tolist(), "state": state, "checkpointing": checkpointing}


def test_gradient_checkpointing_changes_no_step(rank_pool2, tiny_demo):
    args = (str(tiny_demo / "student"), str(tiny_demo / "data/valid.jsonl"), None, 2)
    plain = rank_pool2.run(_steps_on_rank, *args, timeout_s=300)[0]
    ckpt = rank_pool2.run(_steps_on_rank, *args, gradient_checkpointing=True, timeout_s=300)[0]
    assert ckpt["checkpointing"] and not plain["checkpointing"]
    assert ckpt["losses"] == pytest.approx(plain["losses"], rel=1e-6)
    for name, value in plain["state"].items():
        torch.testing.assert_close(ckpt["state"][name], value, rtol=1e-5, atol=1e-6)


def test_lora_student_trains_adapters_and_exports_them(rank_pool2, tiny_demo, tmp_path):
    student = tiny_demo / "student"
    lora = LoRAConfig(r=4, alpha=8.0, target_modules="q_proj,v_proj")
    out = rank_pool2.run(_steps_on_rank, str(student), str(tiny_demo / "data/valid.jsonl"), str(tmp_path), 2,
                         lora=lora, gradient_checkpointing=True, timeout_s=300)[0]
    base = AutoModelForCausalLM.from_pretrained(student).state_dict()
    trained = out["state"]
    # The base weights stay frozen; the adapters moved (B starts at zero).
    for name, value in base.items():
        key = next(k for k in trained if k.endswith(name.replace(".weight", ".base_layer.weight"))
                   or k.endswith("model." + name) and "lora" not in k)
        assert torch.equal(trained[key], value), name
    adapters = load_file(tmp_path / "adapters" / "adapter_model.safetensors")
    config = json.loads((tmp_path / "adapters" / "adapter_config.json").read_text())
    assert config["r"] == 4 and sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    assert all(("lora_A" in k or "lora_B" in k) for k in adapters) and len(adapters) == 4 * len(
        [k for k in base if k.endswith("q_proj.weight")])
    assert any(v.abs().sum() > 0 for k, v in adapters.items() if "lora_B" in k)
    # Merged export: W + (alpha / r) B A, formed here by hand from the exported adapters.
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    merged_state = merged.state_dict()
    for key, weight in base.items():
        prefix = key.removesuffix(".weight")
        a = [v for k, v in adapters.items() if k.endswith(f"{prefix}.lora_A.weight")]
        b = [v for k, v in adapters.items() if k.endswith(f"{prefix}.lora_B.weight")]
        expected = weight + (8.0 / 4) * b[0] @ a[0] if a else weight
        torch.testing.assert_close(merged_state[key], expected, rtol=1e-5, atol=1e-6)
    # The adapter folder loads as a model (transformers' PEFT integration) equal to the merged one.
    ids = torch.tensor([[5, 9, 13, 2, 7]])
    with_adapters = AutoModelForCausalLM.from_pretrained(tmp_path / "adapters").eval()
    with torch.no_grad():
        torch.testing.assert_close(with_adapters(ids).logits, merged(ids).logits, rtol=1e-4, atol=1e-5)
