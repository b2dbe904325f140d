import dataclasses
import re
from pathlib import Path

import pytest
from helpers import REPO

from ds_moekd.config import ConfigError, load_config

MINIMAL = """\
name: t
method: kd
data:
  train_file: train.jsonl
teacher:
  path: teacher_dir
student:
  path: student_dir
optim:
  lr: 0.001
"""


def write(tmp_path, text, name="run.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_loads_yaml_and_fills_defaults(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL))
    assert cfg.method == "kd" and cfg.optim.lr == 0.001
    assert cfg.kd.ce_weight == 0.5 and cfg.kd.kl_weight == 0.5  # the paper's word-level KD
    assert cfg.data.max_prompt_tokens == 256
    assert cfg.run_dir == Path("runs") / "t"


def test_overrides_apply_with_types(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL), ["train.steps=7", "optim.lr=2e-4", "teacher.ep_size=2"])
    assert cfg.train.steps == 7 and cfg.optim.lr == pytest.approx(2e-4) and cfg.teacher.ep_size == 2


def test_bad_value_names_field_value_and_line(tmp_path):
    path = write(tmp_path, MINIMAL.replace("lr: 0.001", "lr: -1"))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert "optim.lr=-1.0" in msg and f"{path}:10:" in msg


def test_wrong_type_names_field(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.steps='many'"):
        load_config(write(tmp_path, MINIMAL), ["train.steps=many"])


def test_override_error_says_it_came_from_the_command_line(tmp_path):
    with pytest.raises(ConfigError, match="command-line override"):
        load_config(write(tmp_path, MINIMAL), ["method=magic"])


def test_unknown_field_is_rejected_with_path(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config field 'optim\.learning_rate'"):
        load_config(write(tmp_path, MINIMAL + "  learning_rate: 3\n"))


def test_missing_required_field(tmp_path):
    with pytest.raises(ConfigError, match="student is required"):
        load_config(write(tmp_path, MINIMAL.replace("student:\n  path: student_dir\n", "")))


def test_kd_needs_a_teacher(tmp_path):
    with pytest.raises(ConfigError, match="teacher.path=None"):
        load_config(write(tmp_path, MINIMAL.replace("teacher:\n  path: teacher_dir\n", "")))


def test_json_configs_load_too(tmp_path):
    path = write(tmp_path, '{"name": "j", "method": "sft", "data": {"train_file": "x"}, "student": {"path": "s"}}',
                 "run.json")
    assert load_config(path).method == "sft"


def test_shipped_run_configs_are_valid():
    paths = sorted((REPO / "ds_configs").glob("*.yaml")) + sorted((REPO / "ds_configs/methods").glob("*.yaml"))
    assert {load_config(p).method for p in paths} >= {"sft", "kd", "gkd", "all", "ka", "sar"}


def test_quickstart_runs_the_papers_ka_with_the_shipped_method_settings():
    quickstart, ka = load_config(REPO / "ds_configs/quickstart.yaml"), load_config(REPO / "ds_configs/methods/ka.yaml")
    assert quickstart.method == "ka" and quickstart.teacher.ep_size == 2
    # the same method settings as the method's own config, so the quickstart is that method as shipped
    for section in ("ka", "gkd", "optim", "data", "teacher", "student"):
        assert getattr(quickstart, section) == getattr(ka, section), section
    assert load_config(REPO / "ds_configs/quickstart.yaml", ["method=kd"]).kd == load_config(
        REPO / "ds_configs/methods/kd.yaml").kd


@pytest.mark.parametrize("override,where", [
    ("gkd.divergence=tvd", "gkd.divergence='tvd'"),
    ("gkd.on_policy_fraction=1.5", "gkd.on_policy_fraction=1.5"),
    ("gkd.rollout=fast", "gkd.rollout='fast'"),
    ("ka.draws=0", "ka.draws=0"),
    ("ka.resample_prob=-0.1", "ka.resample_prob=-0.1"),
    ("sar.router_lr=0", "sar.router_lr=0.0"),
    ("sar.router_steps=-1", "sar.router_steps=-1"),
])
def test_method_sections_validate_their_fields(tmp_path, override, where):
    with pytest.raises(ConfigError, match=re.escape(f"config field {where} is invalid")):
        load_config(write(tmp_path, MINIMAL), [override])


def test_method_section_errors_point_at_the_file_line(tmp_path):
    bad = MINIMAL + "ka:\n  draws: 0\n"
    lines = bad.splitlines().index("  draws: 0") + 1
    with pytest.raises(ConfigError, match=rf"run.yaml:{lines}: config field ka.draws=0 is invalid"):
        load_config(write(tmp_path, bad))


def test_error_line_points_into_the_right_section(tmp_path):
    bad = MINIMAL.replace("teacher:\n  path: teacher_dir\n", "teacher:\n  path: teacher_dir\n  dtype: fp8\n")
    with pytest.raises(ConfigError, match=r"run.yaml:7: config field teacher.dtype='fp8'"):
        load_config(write(tmp_path, bad))


def test_missing_inputs_are_named_by_field(tmp_path):
    from ds_moekd.config import check_paths_exist

    (tmp_path / "train.jsonl").write_text("{}\n")
    cfg = load_config(write(tmp_path, MINIMAL), [f"data.train_file={tmp_path}/train.jsonl",
                                                  f"student.path={tmp_path}/nowhere"])
    with pytest.raises(ConfigError, match=r"student.path='.*nowhere': no such file"):
        check_paths_exist(cfg)


@pytest.mark.parametrize("overrides,where", [
    (["optim.schedule=step"], "optim.schedule='step'"),
    (["train.epochs=-1"], "train.epochs=-1"),
    (["data.template=llama"], "data.template='llama'"),
    (["method=gkd", "data.packing=true"], "data.packing=True"),
    (["method=ka", "student.lora.r=8"], "student.lora.r=8"),
    (["student.lora.dropout=1.0"], "student.lora.dropout=1.0"),
    (["data.valid_file=v.jsonl", "validation.every=5", "report.eval_file=v.jsonl"], "report.eval_file='v.jsonl'"),
])
def test_everyday_options_validate_their_fields(tmp_path, overrides, where):
    with pytest.raises(ConfigError, match=re.escape(f"config field {where} is invalid")):
        load_config(write(tmp_path, MINIMAL), overrides)


def test_everyday_options_load(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL), ["data.packing=true", "data.split=train", "train.epochs=2",
                                                 "optim.schedule=linear", "student.gradient_checkpointing=true",
                                                 "student.lora.r=8", "student.lora.target_modules=q_proj,v_proj",
                                                 "data.valid_file=v.jsonl", "validation.every=5",
                                                 "report.eval_file=t.jsonl"])
    assert cfg.data.packing and cfg.data.split == "train" and cfg.train.epochs == 2
    assert cfg.student.lora.r == 8 and cfg.student.lora.target_modules == "q_proj,v_proj"


@pytest.mark.parametrize("old,new", [("kd.temperature", "loss.temperature"), ("kd.token_chunk", "loss.token_chunk"),
                                     ("kd.loss_backend", "loss.backend"), ("kd.fused_head", "loss.fused_head")])
def test_loss_fields_in_the_kd_section_are_refused_naming_the_loss_field(tmp_path, old, new):
    section, name = old.split(".")
    bad = MINIMAL + f"{section}:\n  {name}: 1\n"
    line = bad.splitlines().index(f"  {name}: 1") + 1
    with pytest.raises(ConfigError, match=rf"run.yaml:{line}: config field '{old}' .* use {re.escape(new)}$"):
        load_config(write(tmp_path, bad))


@pytest.mark.parametrize("override,where", [
    ("loss.backend=cuda", "loss.backend='cuda'"),
    ("loss.token_chunk=-1", "loss.token_chunk=-1"),
    ("loss.temperature=0", "loss.temperature=0.0"),
])
def test_the_loss_section_validates_its_fields(tmp_path, override, where):
    with pytest.raises(ConfigError, match=re.escape(f"config field {where} is invalid")):
        load_config(write(tmp_path, MINIMAL), [override])


def test_the_loss_temperature_reaches_every_distilling_method(tmp_path):
    from ds_moekd.methods import METHODS

    cfg = load_config(write(tmp_path, MINIMAL), ["loss.temperature=2.0"])
    for name, cls in METHODS.items():
        terms = cls.loss_terms(dataclasses.replace(cfg, method=name))
        assert terms.divergence is None or terms.temperature == 2.0, name


def test_every_section_validates_itself_and_its_defaults_pass():
    """Each section's own fields are checked by its `checks()`; `RunConfig.checks()` holds only the rules
    that span sections (docs/configuration.md)."""
    from ds_moekd.config import MonitorConfig, RunConfig

    for f in dataclasses.fields(RunConfig):
        if f.default_factory is dataclasses.MISSING or f.default_factory is MonitorConfig:  # free-form
            continue
        section = f.default_factory()
        assert [name for name, ok, _ in section.checks() if not ok] == [], f.name
        assert {name for name, _, _ in section.checks()} <= {x.name for x in dataclasses.fields(section)}, f.name


def test_settings_of_a_section_the_method_does_not_read_are_named(tmp_path):
    from ds_moekd.config import ignored_sections

    assert ignored_sections(load_config(write(tmp_path, MINIMAL))) == []
    assert ignored_sections(load_config(write(tmp_path, MINIMAL), ["ka.draws=4", "gkd.top_k=5"])) == ["gkd", "ka"]
    assert ignored_sections(load_config(write(tmp_path, MINIMAL), ["kd.targets=ka", "ka.draws=4"])) == []
    assert ignored_sections(load_config(write(tmp_path, MINIMAL), ["method=ka", "ka.draws=4", "kd.ce_weight=1"])) \
        == ["kd"]
