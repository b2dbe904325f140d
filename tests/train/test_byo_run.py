"""A new user's run, as the README's "Bring your own models and data" describes it, in one process:
chat-formatted data, the teacher by Hugging Face id from a local cache (offline), a LoRA student
with gradient checkpointing, packing, epochs, a linear schedule, a held-out report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import REPO
from helpers.hf_cache import add_to_cache
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

from ds_moekd.data.batching import tokenize_records
from ds_moekd.data.chat import install_template
from ds_moekd.data.formats import load_eval_data
from ds_moekd.data.packing import pack
from ds_moekd.data.stream import micro_batches_per_epoch
from ds_moekd.data.template import alpaca_prompt

pytest.importorskip("peft")


def as_chat(src: Path, dst: Path) -> Path:
    rows = [json.loads(line) for line in src.read_text().splitlines()]
    dst.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"{r['instruction']}\n\n{r['input']}"},
        {"role": "assistant", "content": r["output"]}]}) + "\n" for r in rows))
    return dst


@pytest.mark.slow
def test_chat_data_cached_teacher_id_and_lora_student(tiny_demo, tmp_path):
    data = {split: as_chat(tiny_demo / "data" / f"{split}.jsonl", tmp_path / f"chat_{split}.jsonl")
            for split in ("train", "valid", "test")}
    add_to_cache(tmp_path / "hub", "acme/tiny-moe-teacher", tiny_demo / "teacher")
    config = {
        "name": "byo", "method": "kd", "output_dir": str(tmp_path / "runs"),
        "data": {"train_file": str(data["train"]), "valid_file": str(data["valid"]), "micro_batch_size": 4,
                 "packing": True, "max_prompt_tokens": 128, "max_response_tokens": 32},
        "teacher": {"path": "acme/tiny-moe-teacher"},
        "student": {"path": str(tiny_demo / "student"), "deepspeed_config": str(REPO / "ds_configs/zero3_cpu.json"),
                    "gradient_checkpointing": True, "lora": {"r": 4, "alpha": 8}},
        "optim": {"lr": 1e-2, "schedule": "linear", "warmup_steps": 1},
        "train": {"epochs": 1},
        "report": {"eval_file": str(data["test"]), "eval_examples": 4, "max_new_tokens": 4},
        "validation": {"every": 2, "examples": 4, "max_new_tokens": 4},
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-m", "ds_moekd.cli", "train", "--config", str(tmp_path / "run.yaml")],
                            env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "models--acme--tiny-moe-teacher" in result.stderr and "prompts in the Alpaca template" in result.stderr

    # One epoch of packed rows, reckoned here from the same data.
    tokenizer = AutoTokenizer.from_pretrained(tiny_demo / "student")
    records = load_eval_data(str(data["train"])).records
    install_template(tokenizer, conversations=True, template="alpaca")
    examples = tokenize_records(records, tokenizer, max_prompt_tokens=128, max_response_tokens=32).examples
    steps = micro_batches_per_epoch(len(pack(examples, 160)), micro_batch_size=4, dp_size=1)
    run = tmp_path / "runs" / "byo"
    record = json.loads((run / "run.json").read_text())
    assert record["steps"] == steps == len((run / "metrics.jsonl").read_text().splitlines())
    assert {"adapter_config.json", "adapter_model.safetensors", "chat_template.jinja"} <= \
        {p.name for p in (run / "student_hf").iterdir()}
    assert record["eval"]["teacher"]["examples"] == 4 and record["eval"]["after_student"].startswith(
        "best by validation")

    # The adapters answer chat messages through pipeline() as the README shows (the tokenizer, with
    # its chat template, comes from the export: transformers would take the base model's).
    export = run / "student_hf"
    chat = pipeline("text-generation", model=str(export), tokenizer=str(export), device="cpu")
    content = f"{records[0].instruction}"
    reply = chat([{"role": "user", "content": content}], max_new_tokens=6, do_sample=False)[0]["generated_text"][-1]
    model = AutoModelForCausalLM.from_pretrained(export)  # base + adapters (transformers' PEFT integration)
    ids = tokenizer(alpaca_prompt(content), return_tensors="pt", add_special_tokens=False).input_ids
    expected = tokenizer.decode(model.generate(ids, max_new_tokens=6, do_sample=False)[0, ids.shape[1]:],
                                skip_special_tokens=True)
    assert reply == {"role": "assistant", "content": expected}
