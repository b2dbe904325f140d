"""Router-only export (SAR): the output equals the source checkpoint except the replaced tensors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from helpers.tiny_moe_checkpoints import NUM_EXPERTS, save_mixtral
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import ds_moekd.teacher.export as export_module
from ds_moekd.teacher.export import export_with_replaced_tensors

INDEX = "model.safetensors.index.json"


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory) -> Path:
    return Path(save_mixtral(str(tmp_path_factory.mktemp("mixtral"))))


@pytest.fixture(scope="module")
def mixtral_sharded(mixtral, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("mixtral_sharded")
    AutoModelForCausalLM.from_pretrained(mixtral).save_pretrained(path, max_shard_size="50KB")
    (path / "tokenizer.json").write_text('{"fake": "tokenizer"}')
    (path / "extra").mkdir()
    (path / "extra" / "notes.txt").write_text("copied too")
    return path


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            out.update({name: f.get_tensor(name) for name in f.keys()})
    return out


def _router_names(path: Path) -> list[str]:
    # transformers 5 writes Mixtral's routers under the released names (`block_sparse_moe.`),
    # though the in-memory module is `mlp.gate`.
    return sorted(name for name in _tensors(path) if name.endswith(".gate.weight") and ".experts." not in name)


def _random_like(names: list[str], source: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    tensors = _tensors(source)
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(tensors[name].shape, generator=g, dtype=torch.float32) for name in names}


def _files(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_single_file_mixtral_routers_replaced_and_loadable(mixtral, tmp_path):
    names = _router_names(mixtral)
    assert names == [f"model.layers.{i}.block_sparse_moe.gate.weight" for i in range(2)]
    new = _random_like(names, mixtral)
    out = tmp_path / "tuned"

    assert export_with_replaced_tensors(mixtral, out, new) == ["model.safetensors"]

    assert sorted(os.listdir(out)) == sorted(os.listdir(mixtral))
    assert (out / "config.json").read_bytes() == (mixtral / "config.json").read_bytes()
    assert (out / "generation_config.json").read_bytes() == (mixtral / "generation_config.json").read_bytes()
    with safe_open(out / "model.safetensors", framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
    source_state = AutoModelForCausalLM.from_pretrained(mixtral).state_dict()
    tuned_state = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert tuned_state.keys() == source_state.keys()
    routers = {
        f"model.layers.{i}.mlp.gate.weight": new[f"model.layers.{i}.block_sparse_moe.gate.weight"] for i in (0, 1)
    }
    for name, tensor in tuned_state.items():
        if name in routers:
            assert tensor.shape == (NUM_EXPERTS, 32)
            assert torch.equal(tensor, routers[name].to(torch.float32)), name
            assert not torch.equal(tensor, source_state[name]), name
        else:
            assert torch.equal(tensor, source_state[name]), name


def test_sharded_rewrites_only_shards_with_replaced_tensors(mixtral_sharded, tmp_path):
    with open(mixtral_sharded / INDEX) as f:
        weight_map = json.load(f)["weight_map"]
    assert len(set(weight_map.values())) > 3
    names = ["model.layers.1.block_sparse_moe.gate.weight", "model.layers.0.self_attn.q_proj.weight"]
    expected_shards = sorted({weight_map[n] for n in names})
    assert len(expected_shards) == 2
    new = _random_like(names, mixtral_sharded, seed=1)
    out = tmp_path / "tuned"

    assert export_with_replaced_tensors(mixtral_sharded, out, new) == expected_shards

    source_files, out_files = _files(mixtral_sharded), _files(out)
    assert out_files.keys() == source_files.keys()
    for rel, data in source_files.items():
        if rel in expected_shards:
            assert out_files[rel] != data, rel
        else:
            assert out_files[rel] == data, rel
            assert os.path.samefile(out / rel, mixtral_sharded / rel), rel  # hard-linked, not copied
    assert out_files[INDEX] == source_files[INDEX]
    source_tensors, out_tensors = _tensors(mixtral_sharded), _tensors(out)
    assert out_tensors.keys() == source_tensors.keys() == weight_map.keys()
    for name, tensor in out_tensors.items():
        assert tensor.dtype == source_tensors[name].dtype
        assert torch.equal(tensor, new[name] if name in new else source_tensors[name]), name
    for shard in expected_shards:
        with safe_open(out / shard, framework="pt") as f:
            assert f.metadata() == {"format": "pt"}


def test_copies_where_hard_links_fail(mixtral, tmp_path, monkeypatch):
    def no_link(src, dst):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(export_module.os, "link", no_link)
    out = tmp_path / "tuned"
    export_with_replaced_tensors(mixtral, out, {})
    assert _files(out) == _files(mixtral)
    assert not os.path.samefile(out / "model.safetensors", mixtral / "model.safetensors")


def test_bf16_source_stays_bf16(mixtral, tmp_path):
    source = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(mixtral, dtype=torch.bfloat16).save_pretrained(source)
    names = _router_names(source)
    new = _random_like(names, source, seed=2)
    assert all(v.dtype == torch.float32 for v in new.values())
    out = tmp_path / "tuned"

    export_with_replaced_tensors(source, out, new)

    source_tensors, out_tensors = _tensors(source), _tensors(out)
    assert out_tensors.keys() == source_tensors.keys()
    for name, tensor in out_tensors.items():
        assert tensor.dtype == torch.bfloat16, name
        assert torch.equal(tensor, new[name].to(torch.bfloat16) if name in new else source_tensors[name]), name


def test_unknown_name_is_reported_with_the_names_there(mixtral, tmp_path):
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.gate\.weight") as err:
        export_with_replaced_tensors(mixtral, tmp_path / "out", {"model.layers.0.mlp.gate.weight": torch.zeros(8, 32)})
    assert "model.layers.0.block_sparse_moe.gate.weight" in str(err.value)  # a similar name that is there
    assert not (tmp_path / "out").exists()


def test_wrong_shape_is_reported_with_both_shapes(mixtral, tmp_path):
    name = "model.layers.1.block_sparse_moe.gate.weight"
    with pytest.raises(ValueError, match=rf"{name}.*\[8, 32\].*\[4, 32\]"):
        export_with_replaced_tensors(mixtral, tmp_path / "out", {name: torch.zeros(4, 32)})


def test_missing_config_or_weights(mixtral, tmp_path):
    no_config = tmp_path / "no_config"
    no_config.mkdir()
    (no_config / "model.safetensors").write_bytes((mixtral / "model.safetensors").read_bytes())
    with pytest.raises(FileNotFoundError, match="config.json"):
        export_with_replaced_tensors(no_config, tmp_path / "out", {})
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_bytes((mixtral / "config.json").read_bytes())
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        export_with_replaced_tensors(no_weights, tmp_path / "out", {})


def test_failed_export_leaves_existing_out_dir_intact(mixtral, tmp_path, monkeypatch):
    out = tmp_path / "tuned"
    out.mkdir()
    (out / "previous.txt").write_text("previous export")
    name = "model.layers.0.block_sparse_moe.gate.weight"

    with pytest.raises(ValueError, match="nope"):
        export_with_replaced_tensors(mixtral, out, {"nope": torch.zeros(1)})
    with pytest.raises(ValueError, match=name):
        export_with_replaced_tensors(mixtral, out, {name: torch.zeros(3)})

    def failing_save_file(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a shard")
        raise RuntimeError("disk full")

    monkeypatch.setattr(export_module, "save_file", failing_save_file)
    with pytest.raises(RuntimeError, match="disk full"):
        export_with_replaced_tensors(mixtral, out, {name: torch.zeros(NUM_EXPERTS, 32)})
    assert _files(out) == {"previous.txt": b"previous export"}
    assert sorted(os.listdir(tmp_path)) == ["tuned"]  # no temporary directory left behind


def test_out_dir_inside_source_is_refused(mixtral):
    with pytest.raises(ValueError, match="inside"):
        export_with_replaced_tensors(mixtral, mixtral / "tuned", {})
    with pytest.raises(ValueError, match="must not be the source"):
        export_with_replaced_tensors(mixtral, mixtral, {})


def test_hub_cache_snapshot_with_relative_symlinks(mixtral, tmp_path):
    """A hub cache snapshot holds relative symlinks into ../../blobs: the export holds the files themselves."""
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshots" / "abc123"
    blobs.mkdir()
    snapshot.mkdir(parents=True)
    for file in os.listdir(mixtral):
        (blobs / file).write_bytes((mixtral / file).read_bytes())
        (snapshot / file).symlink_to(Path("..", "..", "blobs", file))
    name = "model.layers.0.block_sparse_moe.gate.weight"
    out = tmp_path / "tuned"

    export_with_replaced_tensors(snapshot, out, {name: torch.ones(NUM_EXPERTS, 32)})

    for file in os.listdir(out):
        assert not (out / file).is_symlink(), file
    assert (out / "config.json").read_bytes() == (mixtral / "config.json").read_bytes()
    assert torch.equal(_tensors(out)[name], torch.ones(NUM_EXPERTS, 32))
