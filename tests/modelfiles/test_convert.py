"""`ds-moekd convert` in this process: pickle weights in, the same weights as safetensors out (the
command-line run is in test_reliability.py)."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

from ds_moekd.modelfiles.checks import check_model_files
from ds_moekd.modelfiles.convert import convert
from ds_moekd.run.errors import UserError


def test_pickle_weights_become_safetensors_with_the_same_values(tiny_demo, tmp_path):
    src = tmp_path / "bin"
    shutil.copytree(tiny_demo / "student", src, ignore=shutil.ignore_patterns("*.safetensors"))
    weights = load_file(tiny_demo / "student" / "model.safetensors")
    torch.save(weights, src / "pytorch_model.bin")
    convert(src, tmp_path / "st")
    check_model_files(tmp_path / "st", "student.path")
    converted = load_file(tmp_path / "st" / "model.safetensors")
    assert converted.keys() == weights.keys()
    assert all(torch.equal(converted[n], t) for n, t in weights.items())
    assert (tmp_path / "st" / "tokenizer.json").is_file()
    with pytest.raises(UserError, match="exists and is not empty"):
        convert(src, tmp_path / "st")
