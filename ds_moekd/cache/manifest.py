"""A teacher cache's manifest: what it was built from and what it holds (docs/teacher-cache.md).

`build_manifest` describes a cache from a run config; `check_run` refuses a run whose tokenizer,
data, teacher, routing or temperature differ from the cache's, naming the config field that
differs. Paths are recorded for people to read but never compared: the point of a cache is
training on another machine, where the same files live elsewhere.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from ds_moekd.cache.identity import data_digest, examples_digest, teacher_digest, tokenizer_digest
from ds_moekd.data.batching import TokenizedDataset
from ds_moekd.modelfiles.assets import resolve_path
from ds_moekd.modelfiles.locate import resolve_model
from ds_moekd.run.atomic import write_text
from ds_moekd.run.errors import ConfigError

if TYPE_CHECKING:
    from ds_moekd.config import RunConfig

FORMAT = 1
MANIFEST = "manifest.json"


def routing_facts(cfg: RunConfig, name: str) -> dict:
    """What decides a routing's targets besides the teacher: KA's draw count and the keys of its draws."""
    if name != "ka":
        return {"draws": 1}
    return {"draws": cfg.ka.draws, "resample_prob": cfg.ka.resample_prob, "num_selected": cfg.ka.num_selected,
            "seed": cfg.train.seed}


def build_manifest(cfg: RunConfig, tokenizer, dataset: TokenizedDataset, *, routings: list[str], top_k: int,
                   dtype: str, shard_examples: int, teacher_dtype: str) -> dict:
    data = cfg.data
    tokens = sum(len(ex.response_ids) for ex in dataset.examples)
    return {
        "format": FORMAT,
        "teacher": {"digest": teacher_digest(resolve_model(cfg.teacher.path)), "source": cfg.teacher.path,
                    "dtype": teacher_dtype},
        "tokenizer": {"digest": tokenizer_digest(tokenizer), "vocab": len(tokenizer)},
        "data": {"digest": data_digest(resolve_path(data.train_file)), "source": data.train_file, "split": data.split,
                 "template": data.template, "max_prompt_tokens": data.max_prompt_tokens,
                 "max_response_tokens": data.max_response_tokens, "examples_digest": examples_digest(dataset),
                 "examples": len(dataset.examples), "response_tokens": tokens},
        "targets": {"top_k": top_k, "temperature": cfg.loss.temperature, "dtype": dtype,
                    "routings": {name: routing_facts(cfg, name) for name in routings}},
        "shards": {"examples_per_shard": shard_examples,
                   "count": -(-len(dataset.examples) // shard_examples)},
    }


def first_difference(old, new, prefix: str = "") -> tuple[str, object, object] | None:
    """The first key path (dotted) where two manifests differ, ignoring recorded paths ("source")."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            if key == "source":
                continue
            found = first_difference(old.get(key), new.get(key), f"{prefix}{key}.")
            if found:
                return found
        return None
    return None if old == new else (prefix.rstrip("."), old, new)


def write_manifest(folder: Path, manifest: dict) -> None:
    write_text(folder / MANIFEST, json.dumps(manifest, indent=1) + "\n")


def read_manifest(folder: Path, field: str = "teacher.cache") -> dict:
    path = folder / MANIFEST
    if not path.is_file():
        raise ConfigError(f"config field {field}={str(folder)!r}: no teacher cache there (no {MANIFEST}); "
                          "build one with `ds-moekd teacher-cache --config RUN.yaml`")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise ConfigError(f"config field {field}={str(folder)!r}: cache format {manifest.get('format')} is not "
                          f"this version's {FORMAT}; rebuild it with `ds-moekd teacher-cache`")
    return manifest


def _refuse(folder: Path, what: str, field: str, cached, wanted) -> ConfigError:
    return ConfigError(f"config field teacher.cache={str(folder)!r} was built for another {what}: {field} is "
                       f"{cached!r} in the cache and {wanted!r} in this run; rebuild the cache for this run "
                       "(`ds-moekd teacher-cache --config RUN.yaml`) or point teacher.cache at a matching one")


def check_run(folder: Path, manifest: dict, cfg: RunConfig, tokenizer, dataset: TokenizedDataset) -> None:
    """Refuse a run the cache was not built for, naming the first field that differs."""
    data, targets = manifest["data"], manifest["targets"]
    if tokenizer_digest(tokenizer) != manifest["tokenizer"]["digest"]:
        raise _refuse(folder, "tokenizer", "student.path's tokenizer (vocabulary, special tokens, template)",
                      "digest " + manifest["tokenizer"]["digest"][:12], "digest " + tokenizer_digest(tokenizer)[:12])
    digest = data_digest(resolve_path(cfg.data.train_file))
    if digest != data["digest"]:
        raise _refuse(folder, "data file", "data.train_file", f"{data['source']} (sha256 {data['digest'][:12]})",
                      f"{cfg.data.train_file} (sha256 {digest[:12]})")
    for key in ("split", "template", "max_prompt_tokens", "max_response_tokens"):
        if data[key] != getattr(cfg.data, key):
            raise _refuse(folder, "data setting", f"data.{key}", data[key], getattr(cfg.data, key))
    if examples_digest(dataset) != data["examples_digest"]:
        raise _refuse(folder, "tokenisation", "the tokenised training examples", data["examples_digest"][:12],
                      examples_digest(dataset)[:12])
    if cfg.teacher.path:  # optional when training from a cache: the teacher may live on another machine
        digest = teacher_digest(resolve_model(cfg.teacher.path))
        if digest != manifest["teacher"]["digest"]:
            raise _refuse(folder, "teacher", "teacher.path", f"{manifest['teacher']['source']} "
                          f"(digest {manifest['teacher']['digest'][:12]})", f"{cfg.teacher.path} (digest {digest[:12]})")
    if targets["temperature"] != cfg.loss.temperature:
        raise _refuse(folder, "temperature", "loss.temperature", targets["temperature"], cfg.loss.temperature)
    name = cfg.kd.targets
    if name not in targets["routings"]:
        raise _refuse(folder, "routing", "kd.targets", sorted(targets["routings"]), name)
    cached, wanted = targets["routings"][name], routing_facts(cfg, name)
    fields = {"resample_prob": "ka.resample_prob", "num_selected": "ka.num_selected", "seed": "train.seed"}
    for key, field in fields.items():
        if key in wanted and cached[key] != wanted[key]:
            raise _refuse(folder, "KA draw", field, cached[key], wanted[key])
    if cached["draws"] < wanted["draws"]:
        raise _refuse(folder, "number of KA draws", "ka.draws", cached["draws"], wanted["draws"])
