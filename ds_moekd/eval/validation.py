"""Validation during training: score the student every N steps and keep the best checkpoint.

The student is partitioned by ZeRO-3, so generation needs every rank. Two ways (`validation.generation`):
  gather  (default) every rank gathers the full weights once (student/zero3.py) into a plain
          replica of the model and decodes its share of the prompts on its own: no collective
          per token, so it is far faster; costs one full copy of the student per rank.
  synced  decode with the partitioned engine module itself: every new token gathers the
          parameters layer by layer and all ranks step in lockstep (ds_moekd/decoding.py); for
          students too large to hold whole.
Prompts are sharded round-robin and decoding is counter-based (eval/runner.py), so a score does
not depend on the number of ranks. Rank 0 appends each score to `validation.jsonl`; when the
chosen metric improves, the student is written as a Hugging Face model to `best_student_hf/`
with `best.json` inside, atomically (ds_moekd.run.atomic.replace_dir): a crash never leaves a
half-written best checkpoint, and the old one stays until the new one is complete.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

from ds_moekd.data.formats import EvalData, load_eval_data
from ds_moekd.decoding import HFForward
from ds_moekd.eval.runner import EvalSettings, evaluate
from ds_moekd.modelfiles.assets import resolve_path
from ds_moekd.run.atomic import replace_dir
from ds_moekd.runtime.dist import ParallelGroups
from ds_moekd.student.lora import is_lora, merged_model
from ds_moekd.student.zero3 import gathered_parameters

BEST_DIR = "best_student_hf"


class Validator:
    def __init__(self, cfg, tokenizer, groups: ParallelGroups, start_step: int = 0):
        self.cfg = cfg.validation
        self.run_dir: Path = cfg.run_dir
        self.tokenizer = tokenizer
        self.groups = groups
        data = load_eval_data(str(resolve_path(self.cfg.file or cfg.data.valid_file)), format=self.cfg.format,
                              split=cfg.data.valid_split)
        records = data.records[: self.cfg.examples] if self.cfg.examples else data.records
        self.data = EvalData(records, data.format, data.source)
        self.settings = EvalSettings(seeds=(self.cfg.seed,), greedy=self.cfg.greedy, max_new_tokens=self.cfg.max_new_tokens,
                                     max_prompt_tokens=cfg.data.max_prompt_tokens, batch_size=self.cfg.batch_size,
                                     template=cfg.data.template)
        self._replica = None
        # A fresh run starts a new curve; a resumed one keeps the scores up to its checkpoint
        # (and the best so far, so a worse later score never replaces the kept best student).
        log_path = self.run_dir / "validation.jsonl"
        kept = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()] \
            if start_step and log_path.exists() else []
        kept = [r for r in kept if r["step"] <= start_step]
        self.best: float | None = max((r[self.cfg.metric] for r in kept), default=None)
        if groups.world_group is not None:  # every rank has read before rank 0 rewrites: all agree on the best
            dist.barrier(group=groups.world_group)
        if groups.rank == 0:
            log_path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    @classmethod
    def create(cls, cfg, tokenizer, groups: ParallelGroups, start_step: int = 0) -> Validator | None:
        return cls(cfg, tokenizer, groups, start_step) if cfg.validation.every else None

    def due(self, step: int) -> bool:
        return step % self.cfg.every == 0

    def run(self, engine, step: int) -> dict:
        """Score the student now (every rank calls this); returns the record logged to validation.jsonl."""
        start = time.perf_counter()
        if self.cfg.generation == "gather":
            model = self._gathered_replica(engine)
            forward = HFForward(model)
        else:
            model = engine.module
            forward = HFForward(model, lockstep_group=self.groups.world_group)
        was_training = model.training
        model.eval()
        result = evaluate(forward, self.tokenizer, self.data, self.settings, rank=self.groups.rank,
                          world_size=self.groups.world_size, world_group=self.groups.world_group, progress=False)
        model.train(was_training)
        score = result[self.cfg.metric]["mean"]
        improved = self.best is None or score > self.best
        record = {"step": step, **{m: result[m]["mean"] for m in ("rouge_l", "exact_match", "exact_match_strict")},
                  "metric": self.cfg.metric, "evaluated": result["counts"]["evaluated"],
                  "dropped_long_prompt": result["counts"]["dropped_long_prompt"],
                  "decoding": result["settings"]["decoding"], "best": improved and self.cfg.keep_best,
                  "seconds": round(time.perf_counter() - start, 3)}
        if improved:
            self.best = score
            if self.cfg.keep_best:
                self._save_best(engine, record)
        if self.groups.rank == 0:
            with (self.run_dir / "validation.jsonl").open("a") as f:
                f.write(json.dumps(record) + "\n")
        return record

    def _gathered_replica(self, engine):
        """A plain copy of the student with the current full weights (all ranks call: the gather is collective)."""
        device = next(engine.module.parameters()).device
        if is_lora(engine.module):  # a plain model with the adapters merged in (student/lora.py)
            with gathered_parameters(engine.module):
                state = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
            self._replica = merged_model(engine.module, state, self._dtype(engine)).to(device)
            return self._replica
        if self._replica is None:
            with torch.device(device):  # on the student's device, no CPU copy first
                self._replica = AutoModelForCausalLM.from_config(engine.module.config, dtype=self._dtype(engine))
        with gathered_parameters(engine.module):
            self._replica.load_state_dict(engine.module.state_dict())
        return self._replica

    @staticmethod
    def _dtype(engine):
        return next(engine.module.parameters()).dtype

    def _save_best(self, engine, record: dict) -> None:
        if self.cfg.generation == "gather":
            model = self._replica  # already holds the full weights just scored
        else:
            model = self._gathered_replica(engine)
            self._replica = None  # synced mode keeps no copy between validations
        if self.groups.rank == 0:
            model.config.use_cache = True
            with replace_dir(self.run_dir / BEST_DIR) as tmp:
                model.save_pretrained(tmp)
                self.tokenizer.save_pretrained(tmp)
                (tmp / "best.json").write_text(json.dumps(record, indent=2) + "\n")
        if dist.is_initialized():
            dist.barrier()
