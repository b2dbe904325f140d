"""Hugging Face model ids resolve through the local cache only (offline), with errors naming id, cache and field."""

from __future__ import annotations

import pytest
from helpers.hf_cache import add_to_cache
from transformers import AutoModelForCausalLM

from ds_moekd.config import ConfigError, DataConfig, RunConfig, StudentConfig, TeacherConfig, check_paths_exist
from ds_moekd.modelfiles.assets import resolve_path
from ds_moekd.modelfiles.locate import resolve_model


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    add_to_cache(cache, "acme/tiny-student", resolve_path("demo:student"))
    return cache


def test_a_cached_model_id_resolves_to_its_snapshot(hub_cache):
    folder = resolve_model("acme/tiny-student")
    assert folder.parent.parent.name == "models--acme--tiny-student" and (folder / "config.json").is_file()
    assert resolve_model("acme/tiny-student@main") == folder
    AutoModelForCausalLM.from_pretrained(folder)  # a loadable model
    assert resolve_model(str(resolve_path("demo:student"))) == resolve_path("demo:student")  # folders stay folders


def test_a_missing_model_id_names_the_id_and_the_cache(hub_cache):
    with pytest.raises(FileNotFoundError, match=rf"'acme/absent' is neither a folder nor .* cache {hub_cache}"):
        resolve_model("acme/absent")


def test_config_check_accepts_cached_ids_and_names_the_field_otherwise(hub_cache, tmp_path):
    def config(teacher):
        return RunConfig(name="x", data=DataConfig(train_file=str(resolve_path("demo:data/train.jsonl"))),
                         student=StudentConfig(path="acme/tiny-student",
                                               deepspeed_config=str(resolve_path("demo:student/config.json"))),
                         teacher=TeacherConfig(path=teacher))

    check_paths_exist(config(str(resolve_path("demo:teacher"))))
    with pytest.raises(ConfigError, match=r"config field teacher.path='acme/teacher': .*hf download acme/teacher"):
        check_paths_exist(config("acme/teacher"))
