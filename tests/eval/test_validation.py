"""Validation during training: a ZeRO-3 student on 2 real ranks scores like the plain model, best checkpoint kept atomically."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers.eval_models import write_eval_models
from transformers import AutoModelForCausalLM, AutoTokenizer

from ds_moekd.config import ConfigError, DataConfig, RunConfig, StudentConfig, ValidationConfig, load_config
from ds_moekd.data.formats import EvalData, load_eval_data
from ds_moekd.decoding import HFForward
from ds_moekd.eval.runner import EvalSettings, evaluate
from ds_moekd.eval.validation import BEST_DIR, Validator
from ds_moekd.runtime.dist import ParallelGroups, init_distributed


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return write_eval_models(tmp_path_factory.mktemp("validation_models"))


def run_config(paths: dict, root: Path, name: str, valid_file: str | None = None, **validation) -> RunConfig:
    options = {"every": 2, "examples": 5, "max_new_tokens": 5, "batch_size": 2, "greedy": False, "seed": 10,
               **validation}
    return RunConfig(name=name, method="sft", output_dir=str(root),
                     data=DataConfig(train_file="unused", valid_file=valid_file or paths["test"]),
                     student=StudentConfig(path=paths["student"]), validation=ValidationConfig(**options))


def _validate_zero3(paths: dict, root: str, valid_file: str) -> dict:
    import deepspeed
    import torch.distributed as dist

    groups = ParallelGroups.create(ep_size=1)
    tokenizer = AutoTokenizer.from_pretrained(paths["student"])
    ds_config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3,
                 "stage3_param_persistence_threshold": 0}, "zero_allow_untested_optimizer": True,
                 "steps_per_print": 10**9}
    model = AutoModelForCausalLM.from_pretrained(paths["student"])
    init_distributed()  # DeepSpeed's comm layer, without its CPU inference-op build
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                      config=ds_config)
    out = {}
    for generation in ("gather", "synced"):
        cfg = run_config(paths, Path(root), generation, valid_file, generation=generation)
        if groups.rank == 0:
            cfg.run_dir.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        validator = Validator(cfg, tokenizer, groups)
        first = validator.run(engine, 2)
        validator.best += 1.0  # the next score cannot beat this: the best checkpoint must stay
        second = validator.run(engine, 4)
        out[generation] = (first, second)
    return out


def test_zero3_validation_on_two_ranks(rank_pool2, paths, tmp_path):
    # References = the plain model's own samples (seed 10): a correct sharded, gathered validation
    # scores exactly 100, a wrong weight, key or shard cannot.
    tokenizer = AutoTokenizer.from_pretrained(paths["student"])
    data = load_eval_data(paths["test"])
    model = AutoModelForCausalLM.from_pretrained(paths["student"]).eval()
    single = evaluate(HFForward(model), tokenizer, EvalData(data.records[:5], data.format, data.source),
                      EvalSettings(seeds=(10,), max_new_tokens=5, batch_size=2), progress=False)
    valid_file = tmp_path / "own_samples.jsonl"
    valid_file.write_text("".join(json.dumps({"instruction": e["instruction"], "input": e["input"],
                                              "output": e["prediction"]}) + "\n" for e in single["examples"]))
    assert len({e["prediction"] for e in single["examples"]}) > 2
    results = rank_pool2.run(_validate_zero3, paths, str(tmp_path), str(valid_file))
    for generation in ("gather", "synced"):
        first, second = results[0][generation]
        assert {k: v for k, v in results[1][generation][0].items() if k != "seconds"} == \
            {k: v for k, v in first.items() if k != "seconds"}
        assert first["exact_match_strict"] == 100.0 and first["evaluated"] == 5
        assert first["best"] and not second["best"]
        run_dir = tmp_path / generation
        logged = [json.loads(line) for line in (run_dir / "validation.jsonl").read_text().splitlines()]
        assert [r["step"] for r in logged] == [2, 4]
        best = run_dir / BEST_DIR
        assert json.loads((best / "best.json").read_text())["step"] == 2
        saved = AutoModelForCausalLM.from_pretrained(best).state_dict()
        assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())  # gathered, whole weights


def test_a_failed_best_save_keeps_the_previous_best(paths, tmp_path, monkeypatch):
    cfg = run_config(paths, tmp_path, "crash", examples=2)
    cfg.run_dir.mkdir(parents=True)
    tokenizer = AutoTokenizer.from_pretrained(paths["student"])
    engine = SimpleNamespace(module=AutoModelForCausalLM.from_pretrained(paths["student"]))  # ZeRO off
    validator = Validator(cfg, tokenizer, ParallelGroups.single())
    validator.run(engine, 2)
    validator.best = -1.0  # force an "improvement" whose save then fails half-way

    def fail(*_args, **_kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(tokenizer, "save_pretrained", fail)
    with pytest.raises(OSError, match="disk full"):
        validator.run(engine, 4)
    best = cfg.run_dir / BEST_DIR
    assert json.loads((best / "best.json").read_text())["step"] == 2
    assert (best / "model.safetensors").is_file() and not (cfg.run_dir / f"{BEST_DIR}.tmp").exists()


@pytest.mark.parametrize("override, field", [("validation.metric=bleu", "validation.metric"),
                                              ("validation.generation=stream", "validation.generation"),
                                              ("validation.every=-1", "validation.every")])
def test_validation_config_errors_name_the_field(tmp_path, override, field):
    path = tmp_path / "run.yaml"
    path.write_text("name: r\nmethod: sft\ndata:\n  train_file: t.jsonl\n  valid_file: v.jsonl\n"
                    "student:\n  path: s\n")
    assert load_config(path).validation.every == 0  # off by default
    with pytest.raises(ConfigError, match=f"config field {field}="):
        load_config(path, [override])
    path.write_text("name: r\nmethod: sft\ndata:\n  train_file: t.jsonl\nstudent:\n  path: s\n")
    with pytest.raises(ConfigError, match="validation.file"):
        load_config(path, ["validation.every=10"])
