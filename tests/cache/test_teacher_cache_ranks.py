"""A teacher cache built by 2 real rank processes, killed and resumed, read back against the live
teacher, and a kd run trained from it on 2 ranks against the same run with the live EP teacher."""

import json
import time

import pytest
import torch
from helpers import REPO
from helpers.rankprocs import run_once, start_ranks, stop, tiny_overrides, wait_all
from transformers import AutoTokenizer

from ds_moekd.cache.build import top_k_targets
from ds_moekd.cache.shards import ShardReader, shard_path, verified_shards
from ds_moekd.config import load_config
from ds_moekd.data.batching import collate
from ds_moekd.methods.kd import targets_of
from ds_moekd.runtime.dist import ParallelGroups
from ds_moekd.teacher import MoETeacher
from ds_moekd.train import teacher_scores, training_examples

pytestmark = pytest.mark.slow

SHARD_EXAMPLES = 16
BUILD_ARGS = ("--routing", "native,ka", "--top-k", "0", "--shard-examples", str(SHARD_EXAMPLES), "--batch-size", "1")


def _sidecars(cache):
    return sorted((cache / "shards").glob("*.json"))


def _dense(logprobs_nk, ids_nk, vocab):
    return torch.full((len(ids_nk), vocab), float("-inf")).scatter(1, ids_nk.long(), logprobs_nk.float())


@pytest.fixture(scope="module")
def built_cache(tiny_demo, tmp_path_factory):
    """The whole-vocabulary cache (native and KA targets) of the tiny demo's training split, built on
    2 ranks: killed once at least 3 shards were written, one written shard damaged, then resumed."""
    tmp = tmp_path_factory.mktemp("cache_build")
    cache = tmp / "cache"
    overrides = tiny_overrides(tiny_demo, tmp / "out", **{"kd.targets": "ka", "teacher.ep_size": 2})
    args = ("--out", str(cache), *BUILD_ARGS)
    procs = start_ranks(overrides, log_dir=tmp, module="ds_moekd.cache.build", args=args)
    deadline = time.monotonic() + 300
    while len(_sidecars(cache)) < 3 and time.monotonic() < deadline and all(p.poll() is None for p in procs):
        time.sleep(0.02)
    stop(procs)
    count = json.loads((cache / "manifest.json").read_text())["shards"]["count"]
    kept, _ = verified_shards(cache, count)
    assert 3 <= len(kept) < count, f"the kill came at {len(kept)} of {count} shards"
    damaged = shard_path(cache, kept[0], ".safetensors")
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    untouched = {i: shard_path(cache, i, ".safetensors").stat().st_mtime_ns for i in kept[1:]}
    procs = start_ranks(overrides, log_dir=tmp, module="ds_moekd.cache.build", args=args)
    codes = wait_all(procs)
    logs = "\n".join((tmp / f"rank{r}.log").read_text() for r in range(2))
    assert codes == [0, 0], logs
    assert f"{len(kept) - 1} of {count} shards verified and kept" in logs
    good, problems = verified_shards(cache, count)
    assert len(good) == count and not problems
    assert {i: shard_path(cache, i, ".safetensors").stat().st_mtime_ns for i in kept[1:]} == untouched
    return cache, overrides, count


def test_cached_targets_equal_the_live_teachers(built_cache, tiny_demo):
    cache, overrides, count = built_cache
    cfg = load_config(REPO / "ds_configs/methods/kd.yaml", overrides)
    tokenizer = AutoTokenizer.from_pretrained(cfg.student.path)
    dataset = training_examples(cfg, tokenizer)
    vocab = len(tokenizer)
    teacher = MoETeacher.from_pretrained(cfg.teacher.path, groups=ParallelGroups.single(), dtype=torch.float32,
                                         device=torch.device("cpu"))
    reader = ShardReader(cache, count, SHARD_EXAMPLES)
    examples = [0, 17, 150, len(dataset.examples) - 1]
    batch = collate([dataset.examples[i] for i in examples], tokenizer.pad_token_id, example_ids=examples)
    for name in ("native", "ka"):
        with torch.no_grad():
            hidden, head = teacher_scores(teacher, batch, vocab, True, targets_of(cfg, name))
        live = top_k_targets(hidden, head, vocab, cfg.loss.temperature)[:2]
        cached = [torch.cat([reader.rows(e, f"{name}.{part}") for e in examples]) for part in ("logprobs", "ids")]
        draws = live[0].shape[1]
        assert cached[0].shape[1] == draws == (cfg.ka.draws if name == "ka" else 1)
        for m in range(draws):
            torch.testing.assert_close(_dense(cached[0][:, m], cached[1][:, m], vocab),
                                       _dense(live[0][:, m], live[1][:, m], vocab), atol=2e-5, rtol=1e-5)
    targets = torch.cat([reader.rows(e, "targets") for e in examples])
    assert torch.equal(targets.long(), batch.targets[batch.loss_mask.bool()])


def test_kd_from_the_cache_trains_like_the_live_teacher_with_no_teacher_loaded(built_cache, tmp_path):
    cache, overrides, _ = built_cache
    runs = {}
    for source, extra in {"live": [], "cache": [f"teacher.cache={cache}", "teacher.path=null"]}.items():
        out = tmp_path / source
        changed = [o for o in overrides if not o.startswith("output_dir=")] + [f"output_dir={out}", *extra]
        log_dir = tmp_path / f"logs_{source}"
        log_dir.mkdir()
        codes, logs = run_once(changed, log_dir)
        assert codes == [0, 0], logs
        runs[source] = (out / "rel", logs)
    metrics = {k: [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
               for k, (run, _) in runs.items()}
    assert [m["step"] for m in metrics["cache"]] == [m["step"] for m in metrics["live"]] == list(range(1, 7))
    for live, cached in zip(metrics["live"], metrics["cache"], strict=True):
        for key in ("loss", "ce", "kl"):
            assert cached[key] == pytest.approx(live[key], rel=1e-4, abs=1e-5), (key, live["step"])
    cache_logs = runs["cache"][1]
    assert "teacher load" not in cache_logs and "teacher cache" in cache_logs
    record = json.loads((runs["cache"][0] / "run.json").read_text())
    assert all(rank["teacher"] is None for rank in record["per_rank"])
