"""Reliability pieces in one process (docs/reliability.md): the numerics policy, model-folder checks,
checkpoint manifests, run folders, and the top-level handler's messages from real commands."""

from __future__ import annotations

import json
import logging
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.rankprocs import REPO, run_env, tiny_overrides

from ds_moekd.config import load_config
from ds_moekd.modelfiles.checks import check_model_files, check_teacher_vocabulary
from ds_moekd.run import checkpoints
from ds_moekd.run.atomic import file_sha256
from ds_moekd.run.errors import EXIT_ENVIRONMENT, EXIT_USAGE, NumericsError, UserError
from ds_moekd.run.folder import check_run_folder
from ds_moekd.run.numerics import NumericsGuard
from ds_moekd.runtime.dist import ParallelGroups
from ds_moekd.runtime.telemetry import read_metrics
from ds_moekd.teacher.families import FAMILIES

NAN = float("nan")


# -- numerics ---------------------------------------------------------------------------------


def test_skip_policy_counts_skipped_steps_and_stops_past_the_limit():
    guard = NumericsGuard("skip", max_skipped=2, spike_factor=0)
    guard.check(1, NAN, float("inf"), applied=False)
    guard.check(2, 1.0, float("inf"), applied=False)
    assert guard.skipped == 2
    with pytest.raises(NumericsError, match=r"step 3: non-finite loss .*3 skipped steps > train.max_skipped_steps=2"):
        guard.check(3, NAN, NAN, applied=False)


def test_stop_policy_stops_at_once_and_an_applied_nonfinite_step_always_stops():
    with pytest.raises(NumericsError, match="train.nonfinite=stop"):
        NumericsGuard("stop", 10, 0).check(1, NAN, NAN, applied=False)
    with pytest.raises(NumericsError, match="the optimizer applied the update"):
        NumericsGuard("skip", 10, 0).check(1, 2.0, float("inf"), applied=True)


def test_loss_spikes_above_the_factor_of_the_running_mean_are_logged(caplog):
    guard = NumericsGuard("skip", 10, spike_factor=3.0)
    with caplog.at_level(logging.WARNING, logger="ds_moekd"):
        for step, loss in enumerate([1.0, 1.1, 0.9, 1.0, 2.5], start=1):
            guard.check(step, loss, 1.0, applied=True)
        assert not caplog.records
        guard.check(6, 10.0, 1.0, applied=True)
    assert "step 6: loss spike" in caplog.text and "train.spike_factor=3" in caplog.text


# -- metrics ----------------------------------------------------------------------------------


def test_a_half_written_last_metrics_line_is_dropped_but_a_bad_middle_line_is_an_error(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    assert [m["step"] for m in read_metrics(path)] == [1, 2]
    path.write_text('{"step": 1}\n{"st\n{"step": 3}\n')
    with pytest.raises(ValueError, match="metrics.jsonl:2"):
        read_metrics(path)


# -- model folders ----------------------------------------------------------------------------


def test_truncated_and_missing_shards_are_named(tiny_demo, tmp_path):
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_demo / "teacher", teacher)
    check_model_files(teacher, "teacher.path")
    weights = teacher / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(UserError, match=r"model.safetensors: \d+ bytes, but its header needs \d+: the file is truncated"):
        check_model_files(teacher, "teacher.path")
    (teacher / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-00002.safetensors"}}))
    with pytest.raises(UserError, match="model-00002.safetensors: missing shard"):
        check_model_files(teacher, "teacher.path")


def test_the_teacher_reader_refuses_a_truncated_shard(tiny_demo, tmp_path):
    from ds_moekd.teacher.loading import CheckpointReader

    shutil.copytree(tiny_demo / "teacher", tmp_path / "t")
    weights = tmp_path / "t" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(UserError, match="truncated"):
        CheckpointReader(str(tmp_path / "t"))


def _pickle_copy(src: Path, dst: Path):
    """`src` as an old-style checkpoint: the same files with pickle (`pytorch_model.bin`) weights."""
    import torch
    from safetensors.torch import load_file

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors"))
    weights = load_file(src / "model.safetensors")
    torch.save(weights, dst / "pytorch_model.bin")
    return weights


def test_pickle_weights_are_refused_unless_allowed(tiny_demo, tmp_path):
    _pickle_copy(tiny_demo / "student", tmp_path / "bin")
    with pytest.raises(UserError, match="pickle weights .*ds-moekd convert.*student.allow_pickle_weights=true"):
        check_model_files(tmp_path / "bin", "student.path")
    check_model_files(tmp_path / "bin", "student.path", allow_pickle=True)


@pytest.mark.slow
def test_convert_writes_safetensors_with_the_same_weights(tiny_demo, tmp_path):
    import torch
    from safetensors.torch import load_file

    weights = _pickle_copy(tiny_demo / "student", tmp_path / "bin")
    done = subprocess.run([sys.executable, "-m", "ds_moekd.cli", "convert", str(tmp_path / "bin"), str(tmp_path / "st")],
                          env=run_env(), cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    check_model_files(tmp_path / "st", "student.path")
    assert (tmp_path / "st" / "tokenizer.json").is_file()
    converted = load_file(tmp_path / "st" / "model.safetensors")
    for name, tensor in weights.items():
        assert torch.equal(converted[name], tensor), name


def test_no_code_loads_remote_code():
    sources = [p for p in (REPO / "ds_moekd").rglob("*.py")]
    assert not [p for p in sources if "trust_remote_code=True" in p.read_text()]


def test_a_smaller_or_different_teacher_vocabulary_is_refused(tiny_demo, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_demo / "student")
    check_teacher_vocabulary(tiny_demo / "teacher", tokenizer)  # the shared tokenizer
    small = tmp_path / "small"
    shutil.copytree(tiny_demo / "teacher", small)
    config = json.loads((small / "config.json").read_text())
    config["vocab_size"] = len(tokenizer) - 5
    (small / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=rf"vocab_size {len(tokenizer) - 5}, smaller than the student tokenizer's "
                                        rf"{len(tokenizer)} tokens"):
        check_teacher_vocabulary(small, tokenizer)
    padded = tmp_path / "padded"  # extra lm_head rows are fine
    shutil.copytree(tiny_demo / "teacher", padded)
    config["vocab_size"] = len(tokenizer) + 64
    (padded / "config.json").write_text(json.dumps(config))
    check_teacher_vocabulary(padded, tokenizer)
    other = tmp_path / "other"
    shutil.copytree(tiny_demo / "teacher", other)
    spec = json.loads((other / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    a, b = [tok for tok in vocab if tok.isalpha()][:2]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (other / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(UserError, match=r"teacher's tokenizer .* differs from the student's .* 2 student tokens"):
        check_teacher_vocabulary(other, tokenizer)


@pytest.mark.parametrize("key, value", [("score_scale_factor", [1.0, 2.0]), ("multiply_gate_scores", False),
                                        ("add_weight_norm", True)])
def test_unsupported_llama_moe_features_are_refused(key, value):
    raw = {"model_type": "llama_moe", "hidden_size": 8, "num_experts": 2, "num_selects": 1, key: value}
    with pytest.raises(ValueError, match=f"llama_moe config.json: {key}=.* is not supported"):
        FAMILIES["llama_moe"].make_config(raw)


# -- checkpoints and run folders --------------------------------------------------------------


def _fake_checkpoint(ckpt_dir: Path, step: int, cfg, commit: bool = True) -> Path:
    tag = ckpt_dir / f"step{step}"
    tag.mkdir(parents=True)
    (tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(bytes(range(200)) * step)
    if commit:
        name = "zero_pp_rank_0_mp_rank_00_optim_states.pt"
        files = {name: {"bytes": (tag / name).stat().st_size, "sha256": file_sha256(tag / name)}}
        settings = checkpoints.frozen_settings(cfg, 1)
        (tag / "manifest.json").write_text(json.dumps({"step": step, "files": files, "settings": settings}))
    return tag


def _cfg(tiny_demo, out, **extra):
    return load_config(REPO / "ds_configs/methods/kd.yaml", tiny_overrides(tiny_demo, out, **extra))


def test_choose_takes_the_newest_verified_checkpoint_and_prune_keeps_k(tiny_demo, tmp_path, caplog):
    cfg = _cfg(tiny_demo, tmp_path)
    ckpt = tmp_path / "ckpt"
    for step in (1, 2, 3, 4):
        _fake_checkpoint(ckpt, step, cfg)
    _fake_checkpoint(ckpt, 5, cfg, commit=False)
    (ckpt / "step4" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"short")
    with caplog.at_level(logging.WARNING, logger="ds_moekd"):
        assert checkpoints.choose(ckpt, ParallelGroups.single()) == ckpt / "step3"
    assert "step5: not committed" in caplog.text and "step4" in caplog.text and "the manifest says" in caplog.text
    checkpoints.prune(ckpt, keep=2)
    assert sorted(p.name for p in ckpt.iterdir()) == ["step3", "step4", "step5"]  # newest 2 committed + newer


def test_resume_refuses_when_checkpoints_exist_but_none_is_complete(tiny_demo, tmp_path):
    cfg = _cfg(tiny_demo, tmp_path)
    ckpt = tmp_path / "ckpt"
    _fake_checkpoint(ckpt, 1, cfg, commit=False)
    with pytest.raises(UserError, match="no checkpoint in .* is complete"):
        checkpoints.resume_point(ckpt, ParallelGroups.single(), cfg)
    assert checkpoints.resume_point(tmp_path / "empty", ParallelGroups.single(), cfg) is None  # nothing yet: step 0


def test_a_resume_with_changed_settings_is_refused_unless_allowed(tiny_demo, tmp_path):
    tag = _fake_checkpoint(tmp_path / "ckpt", 2, _cfg(tiny_demo, tmp_path))
    with pytest.raises(UserError, match=r"train.seed: 1234 in the checkpoint, 7 now.*allow_config_change"):
        checkpoints.check_settings(tag, _cfg(tiny_demo, tmp_path, **{"train.seed": 7}), 1)
    with pytest.raises(UserError, match=r"global_batch: (\d+) in the checkpoint, (\d+) now"):
        checkpoints.check_settings(tag, _cfg(tiny_demo, tmp_path), 2)  # twice the ranks, same micro-batch
    micro = _cfg(tiny_demo, tmp_path).data.micro_batch_size
    if micro % 2 == 0:  # another world size with the same global batch resumes (through a universal checkpoint)
        checkpoints.check_settings(tag, _cfg(tiny_demo, tmp_path, **{"data.micro_batch_size": micro // 2}), 2)
    checkpoints.check_settings(tag, _cfg(tiny_demo, tmp_path, **{"train.seed": 7, "train.allow_config_change": True}), 1)


def test_run_folder_rules(tiny_demo, tmp_path):
    check_run_folder(_cfg(tiny_demo, tmp_path))  # empty: fine
    run = tmp_path / "rel"
    run.mkdir()
    (run / "config.yaml").write_text("name: rel\n")
    check_run_folder(_cfg(tiny_demo, tmp_path))  # a run that failed at start-up: nothing to lose
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(UserError, match="already holds an unfinished run; continue it with train.resume=true"):
        check_run_folder(_cfg(tiny_demo, tmp_path))
    (run / "run.json").write_text("{}")
    with pytest.raises(UserError, match="already holds a finished run"):
        check_run_folder(_cfg(tiny_demo, tmp_path))
    check_run_folder(_cfg(tiny_demo, tmp_path, **{"train.overwrite": True}))
    check_run_folder(_cfg(tiny_demo, tmp_path, **{"train.resume": True}))
    with pytest.raises(UserError, match="choose one"):
        check_run_folder(_cfg(tiny_demo, tmp_path, **{"train.resume": True, "train.overwrite": True}))


# -- the top-level handler, through real commands ---------------------------------------------


def _train(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ds_moekd.train", "--config", str(REPO / "ds_configs/methods/kd.yaml"),
                           "teacher.ep_size=0", *args], env=run_env(env), cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_a_bad_override_is_named_as_an_override_without_a_traceback():
    done = _train(["train.steps=0"])
    assert done.returncode == EXIT_USAGE
    assert "config field train.steps=0 is invalid" in done.stderr and "from a command-line override" in done.stderr
    assert "Traceback" not in done.stderr
    debug = _train(["train.steps=0", "--debug"])
    assert debug.returncode == EXIT_USAGE and "Traceback" in debug.stderr


@pytest.mark.slow
def test_malformed_data_is_named_by_file_and_line(tiny_demo, tmp_path):
    data = tmp_path / "train.jsonl"
    lines = (tiny_demo / "data" / "train.jsonl").read_text().splitlines()
    data.write_text("\n".join(lines[:3] + ['{"instruction": "x", "output": '] + lines[3:]) + "\n")
    done = _train(tiny_overrides(tiny_demo, tmp_path / "out", **{"data.train_file": data}))
    assert done.returncode == EXIT_USAGE and f"{data}:4: not valid JSON" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.slow
def test_a_port_in_use_is_named(tiny_demo, tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = _train(tiny_overrides(tiny_demo, tmp_path / "out"),
                      env={"MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
    assert done.returncode == EXIT_ENVIRONMENT, done.stderr
    assert f"port {port} on 127.0.0.1 is in use" in done.stderr and "MASTER_PORT" in done.stderr


@pytest.mark.slow
def test_eval_of_a_missing_model_folder_never_looks_up_a_hub(tmp_path):
    done = subprocess.run([sys.executable, "-m", "ds_moekd.cli", "eval", "--model", "no/such-model", "--data",
                           "demo:data/test.jsonl", "--out", str(tmp_path / "r.json")],
                          env=run_env({"HF_HUB_OFFLINE": "1"}), cwd=REPO, capture_output=True, text=True)
    assert done.returncode == EXIT_USAGE
    assert "--model no/such-model: no such model folder" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("override, field", [("train.stepz=3", "'train.stepz'"), ("trainx.steps=3", "'trainx'")])
def test_an_unknown_field_from_an_override_is_not_blamed_on_a_line_of_the_file(override, field):
    from ds_moekd.config import ConfigError

    with pytest.raises(ConfigError) as err:
        load_config(REPO / "ds_configs/methods/kd.yaml", [override])
    assert str(err.value).startswith(f"unknown config field {field}") and "(from a command-line override)" in str(err.value)
