"""The teacher cache's one-process parts: top-k targets against a plain torch reference, shard
verification, and a run refused with the field that differs from the cache (docs/teacher-cache.md)."""

import json

import pytest
import torch
from helpers import REPO
from helpers.rankprocs import tiny_overrides
from transformers import AutoTokenizer

from ds_moekd.cache.build import top_k_targets
from ds_moekd.cache.manifest import build_manifest, check_run, first_difference
from ds_moekd.cache.shards import discard, verified_shards, write_shard
from ds_moekd.config import load_config
from ds_moekd.run.errors import ConfigError
from ds_moekd.train import training_examples


def test_top_k_targets_match_a_plain_softmax():
    torch.manual_seed(0)
    hidden, head = torch.randn(2, 300, 8), torch.randn(50, 8)
    logprobs, ids, tail = top_k_targets(hidden, head, 6, temperature=2.0)
    assert logprobs.shape == (300, 2, 6) and tail.shape == (300, 2)
    for m in range(2):
        log_p = torch.log_softmax(hidden[m] @ head.t() / 2.0, dim=-1)
        want, want_ids = log_p.topk(6, dim=-1)
        torch.testing.assert_close(logprobs[:, m], want)
        assert torch.equal(ids[:, m], want_ids)
        rest = 1 - want.exp().sum(-1)
        torch.testing.assert_close(tail[:, m].exp(), rest, atol=1e-6, rtol=1e-5)
    _, _, full_tail = top_k_targets(hidden[0], head, 50, temperature=1.0)
    assert torch.isneginf(full_tail).all()  # nothing left outside the whole vocabulary


def test_a_shard_counts_only_when_its_bytes_match_its_sidecar(tmp_path):
    (tmp_path / "shards").mkdir()
    for index in range(3):
        write_shard(tmp_path, index, {"offsets": torch.tensor([0, 2]), "targets": torch.tensor([5, 6])}, (index, index + 1))
    good, problems = verified_shards(tmp_path, 4)
    assert good == [0, 1, 2] and problems == ["shard-00003.safetensors: not written"]
    path = tmp_path / "shards" / "shard-00001.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # same size, other bytes
    path.write_bytes(bytes(data))
    good, problems = verified_shards(tmp_path, 3)
    assert good == [0, 2] and "checksum" in problems[0]
    discard(tmp_path, 1)
    assert not path.exists() and not (tmp_path / "shards" / "shard-00001.json").exists()


def test_first_difference_names_the_key_and_ignores_paths():
    old = {"teacher": {"digest": "a", "source": "/x"}, "targets": {"top_k": 64}}
    assert first_difference(old, {"teacher": {"digest": "a", "source": "/y"}, "targets": {"top_k": 64}}) is None
    assert first_difference(old, {"teacher": {"digest": "a"}, "targets": {"top_k": 16}}) == ("targets.top_k", 64, 16)


@pytest.fixture(scope="module")
def cached_run(tiny_demo, tmp_path_factory):
    """A manifest built for the tiny demo's kd run (ka routing too), and how to load variants of that run."""
    out = tmp_path_factory.mktemp("cache")

    def config(*extra):
        return load_config(REPO / "ds_configs/methods/kd.yaml", [*tiny_overrides(tiny_demo, out), *extra])

    cfg = config()
    tokenizer = AutoTokenizer.from_pretrained(cfg.student.path)
    manifest = build_manifest(cfg, tokenizer, training_examples(cfg, tokenizer), routings=["native", "ka"],
                              top_k=8, dtype="float32", shard_examples=64, teacher_dtype="float32")
    return out, manifest, config, tokenizer


@pytest.mark.parametrize("override, field", [
    ("data.max_response_tokens=7", "data.max_response_tokens"),
    ("loss.temperature=2.0", "loss.temperature"),
    ("kd.targets=all", "kd.targets"),
    ("kd.targets=ka ka.resample_prob=0.5", "ka.resample_prob"),
    ("kd.targets=ka train.seed=7", "train.seed"),
    ("kd.targets=ka ka.draws=3", "ka.draws"),
])
def test_a_run_the_cache_was_not_built_for_is_refused_with_its_field(cached_run, override, field):
    out, manifest, config, tokenizer = cached_run
    cfg = config(*override.split())
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        check_run(out, manifest, cfg, tokenizer, training_examples(cfg, tokenizer))


def test_the_matching_run_and_fewer_ka_draws_are_accepted(cached_run):
    out, manifest, config, tokenizer = cached_run
    for cfg in (config(), config("kd.targets=ka", "ka.draws=1")):
        check_run(out, manifest, cfg, tokenizer, training_examples(cfg, tokenizer))


def test_other_data_tokenizer_or_teacher_is_refused(cached_run, tiny_demo, tmp_path):
    out, manifest, config, tokenizer = cached_run
    lines = (tiny_demo / "data/train.jsonl").read_text().splitlines()
    (tmp_path / "train.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    cfg = config(f"data.train_file={tmp_path}/train.jsonl")
    with pytest.raises(ConfigError, match=r"data\.train_file"):
        check_run(out, manifest, cfg, tokenizer, training_examples(cfg, tokenizer))
    other = json.loads(json.dumps(manifest))
    other["teacher"]["digest"] = "0" * 64
    with pytest.raises(ConfigError, match=r"teacher\.path"):
        check_run(out, other, config(), tokenizer, training_examples(config(), tokenizer))
    other["tokenizer"]["digest"] = "0" * 64
    with pytest.raises(ConfigError, match="tokenizer"):
        check_run(out, other, config(), tokenizer, training_examples(config(), tokenizer))


@pytest.mark.parametrize("method", ["gkd", "all", "ka", "sar", "sft"])
def test_methods_that_cannot_read_a_cache_refuse_it_with_the_reason(tiny_demo, tmp_path, method):
    with pytest.raises(ConfigError, match=r"teacher\.cache.*(rollouts|reads no teacher)"):
        load_config(REPO / "ds_configs/methods/kd.yaml",
                    [*tiny_overrides(tiny_demo, tmp_path), f"method={method}", f"teacher.cache={tmp_path}"])


def test_plan_counts_no_teacher_for_a_run_that_reads_a_cache(tiny_demo, tmp_path):
    from ds_moekd.planning.plan import plan

    overrides = tiny_overrides(tiny_demo, tmp_path)
    live = plan(load_config(REPO / "ds_configs/methods/kd.yaml", overrides), 2, "cpu")
    cached = plan(load_config(REPO / "ds_configs/methods/kd.yaml", [*overrides, f"teacher.cache={tmp_path}"]), 2, "cpu")
    assert live["teacher"] is not None and cached["teacher"] is None
    assert cached["device_total_bytes"] < live["device_total_bytes"]
