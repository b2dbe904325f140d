"""The project's one scorer: a model on instruction data, sharded decoding per seed, scores (MiniLLM protocol).

`evaluate` serves `ds-moekd eval`, validation, the run report's held-out rows, the demo build and
method comparisons (demo/evaluate.py summarises its per-record scores per task family). Prompts
longer than the limit are dropped and counted. The kept prompts are sharded over ranks round-robin
by global index and decoded by the one decoder (ds_moekd/decoding.py), each keyed by its global
index; every rank gets every prediction back and scores them (cheap), so the results do not depend
on the number of ranks. Scores are means over prompts per seed, then mean ± std over seeds
(population std, ddof=0).
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch.distributed as dist
import yaml
from tqdm import tqdm

from ds_moekd.data.chat import prompt_text
from ds_moekd.data.formats import EvalData
from ds_moekd.data.instructions import InstructionRecord
from ds_moekd.decoding import Decoding, Forward, decode
from ds_moekd.eval.metrics import exact_match, rouge_l
from ds_moekd.runtime.rng import Sampling

TEMPLATES = ("alpaca", "chat")
METRICS = ("rouge_l", "exact_match", "exact_match_strict")


@dataclass(frozen=True, kw_only=True)
class EvalSettings:
    """Decoding and prompt settings; the defaults are the paper's (MiniLLM's) evaluation protocol."""

    seeds: tuple[int, ...] = (10, 20, 30, 40, 50)
    greedy: bool = False  # greedy decoding instead of sampling (one run; seeds unused)
    temperature: float = 1.0
    max_new_tokens: int = 256  # MiniLLM: max length 512 = 256 prompt + 256 new tokens
    max_prompt_tokens: int | None = 256  # None: no prompt is dropped
    batch_size: int = 16
    template: str = "alpaca"

    def __post_init__(self):
        checks = [
            ("seeds", self.greedy or len(self.seeds) >= 1, "at least one seed (or greedy)"),
            ("temperature", self.temperature > 0, "positive"),
            ("max_new_tokens", self.max_new_tokens >= 1, "at least 1"),
            ("max_prompt_tokens", self.max_prompt_tokens is None or self.max_prompt_tokens >= 1, "at least 1"),
            ("batch_size", self.batch_size >= 1, "at least 1"),
            ("template", self.template in TEMPLATES, f"one of {TEMPLATES}"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(f"evaluation setting {name}={getattr(self, name)!r} is invalid: expected {expected}")

    @property
    def runs(self) -> tuple[int | None, ...]:
        """One decoding run per seed; greedy is a single run (None)."""
        return (None,) if self.greedy else self.seeds


def load_settings(path: str | Path, **overrides) -> EvalSettings:
    """Settings from a YAML file (e.g. ds_configs/eval/minillm.yaml); non-None overrides win."""
    raw = (yaml.safe_load(Path(path).read_text()) or {}) if path else {}
    known = {f.name for f in fields(EvalSettings)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"{path}: unknown evaluation settings {unknown}; known: {sorted(known)}")
    values = {**raw, **{k: v for k, v in overrides.items() if v is not None}}
    if "seeds" in values:
        values["seeds"] = tuple(int(s) for s in values["seeds"])
    return EvalSettings(**values)


def prompt_ids(record: InstructionRecord, tokenizer, template: str) -> list[int]:
    """The prompt's token ids; the same text and tokenisation (no added specials) as training."""
    return tokenizer(prompt_text(record, tokenizer, template), add_special_tokens=False)["input_ids"]


def _mean_std(values: list[float]) -> dict:
    return {"mean": round(statistics.fmean(values), 4), "std": round(statistics.pstdev(values), 4)}


def record_scores(records: list[InstructionRecord], predictions: list[str]) -> dict[str, list[float]]:
    """Each metric of METRICS for each prediction, against its record's references."""
    return {
        "rouge_l": [rouge_l(p, r.references) for p, r in zip(predictions, records)],
        "exact_match": [exact_match(p, r.references) for p, r in zip(predictions, records)],
        "exact_match_strict": [exact_match(p, r.references, strict=True) for p, r in zip(predictions, records)],
    }


def summarize(records: list[InstructionRecord], runs: tuple[int | None, ...],
              predictions_by_run: list[list[str]]) -> dict:
    """Per-seed means, mean ± std over seeds, and the same per category where the data has one."""
    per_run = [record_scores(records, preds) for preds in predictions_by_run]
    per_seed = [{"seed": seed, **{m: round(statistics.fmean(s[m]), 4) for m in METRICS}}
                for seed, s in zip(runs, per_run)]
    out = {"per_seed": per_seed, **{m: _mean_std([row[m] for row in per_seed]) for m in METRICS}}
    by_category: dict[str, list[int]] = defaultdict(list)
    for i, record in enumerate(records):
        if "category" in record.meta:
            by_category[str(record.meta["category"])].append(i)
    if by_category:
        out["per_category"] = {
            cat: {"count": len(idx), **{m: _mean_std([statistics.fmean(s[m][i] for i in idx) for s in per_run])
                                        for m in METRICS}}
            for cat, idx in sorted(by_category.items())
        }
    return out


@dataclass(frozen=True)
class Predictions:
    records: list[InstructionRecord]  # the evaluated ones, in the data's order
    counts: dict
    by_run: list[list[str]]  # per run of EvalSettings.runs, one text per record


def predict(forward: Forward, tokenizer, data: EvalData, settings: EvalSettings, *, rank: int = 0,
            world_size: int = 1, world_group=None, progress: bool = True) -> Predictions:
    """Every run's prediction for every kept prompt; every rank of `world_group` calls this and gets
    them all. The ranks of `forward.lockstep_group` decode in lockstep (ds_moekd/decoding.py)."""
    if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer needs pad and eos tokens for batched generation")
    encoded = [prompt_ids(r, tokenizer, settings.template) for r in data.records]
    limit = settings.max_prompt_tokens
    kept = [i for i, ids in enumerate(encoded) if limit is None or len(ids) <= limit]
    total = len(data.records) + data.unreferenced
    counts = {
        "records": total,
        "evaluated": len(kept),
        "dropped_long_prompt": len(data.records) - len(kept),
        "dropped_no_reference": data.unreferenced,
        "evaluated_fraction": round(len(kept) / total, 4),
    }
    if not kept:
        raise ValueError(f"{data.source}: every prompt is longer than max_prompt_tokens={limit}")
    mine = kept[rank::world_size]  # round-robin shard of the kept prompts, by global index
    bar = tqdm(total=len(settings.runs) * -(-len(mine) // settings.batch_size), disable=not progress or rank != 0,
               desc=f"eval {Path(data.source).name}", unit="batch", dynamic_ncols=True)
    greedy = Decoding(max_new_tokens=settings.max_new_tokens, sampling=None, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id, vocab_limit=len(tokenizer), batch_size=settings.batch_size)
    by_run = []
    for seed in settings.runs:
        decoding = greedy if seed is None else replace(greedy, sampling=Sampling(temperature=settings.temperature),
                                                       seed=seed)
        responses = decode(forward, [encoded[i] for i in mine], mine, decoding, on_batch=bar.update)
        texts = [tokenizer.decode(_without_eos(ids, tokenizer.eos_token_id), skip_special_tokens=True)
                 for ids in responses]
        shards = [dict(zip(mine, texts))]
        if world_group is not None:
            shards = [None] * world_size
            dist.all_gather_object(shards, dict(zip(mine, texts)), group=world_group)
        merged = {i: t for shard in shards for i, t in shard.items()}
        by_run.append([merged[i] for i in kept])
    bar.close()
    return Predictions([data.records[i] for i in kept], counts, by_run)


def _without_eos(ids: list[int], eos_token_id: int) -> list[int]:
    return ids[:-1] if ids and ids[-1] == eos_token_id else ids


def evaluate(forward: Forward, tokenizer, data: EvalData, settings: EvalSettings, *, rank: int = 0,
             world_size: int = 1, world_group=None, progress: bool = True) -> dict:
    """Scores of the model behind `forward` (ds_moekd/decoding.py: `HFForward(model)`, or
    `teacher.decoding_forward(routing)`) on `data`; every rank of `world_group` calls this and gets
    the same result."""
    predictions = predict(forward, tokenizer, data, settings, rank=rank, world_size=world_size,
                          world_group=world_group, progress=progress)
    records = predictions.records
    return {
        "counts": predictions.counts,
        **summarize(records, settings.runs, predictions.by_run),
        "settings": {**asdict(settings), "decoding": "greedy" if settings.greedy else
                     f"sampling, temperature {settings.temperature}, no top-k/top-p, counter-based per prompt",
                     "std": "population std over seeds (ddof=0)", "world_size": world_size},
        "examples": [{"instruction": r.instruction, "input": r.input, "reference": r.references[0],
                      "prediction": predictions.by_run[0][j]} for j, r in enumerate(records[:5])],
    }
