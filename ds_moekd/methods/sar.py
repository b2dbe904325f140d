"""`sar`: the Student-Aware Router, teacher routers trained for the student (docs/methods/sar.md).

Before each student micro-step, on the same on-policy micro-batch (1:1 by default,
`sar.router_steps`): the router step. Teacher in train mode (gate noise on where the family has
it), all N experts weighted by its routers, loss KL(p‖q) with the student frozen plus
`sar.balance_weight`·Σ_layers cv²(importance); only the router weights learn, through their own
fp32 AdamW (teacher/router_training.py). Then the student step: teacher in eval mode, all N
experts with the updated routers, reverse KL into the student. The routers and their optimizer
state are part of every checkpoint; at the end the tuned teacher is exported as a Hugging Face
checkpoint whose only changed tensors are the routers.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ds_moekd.data.batching import Batch
from ds_moekd.losses import global_token_count
from ds_moekd.methods.base import StepContext
from ds_moekd.methods.gkd import OnPolicyDistillation
from ds_moekd.modelfiles.assets import resolve_path
from ds_moekd.student.zero3 import gathered_head_weight
from ds_moekd.teacher.router_training import RouterTrainer, balance_loss, teacher_side_kl
from ds_moekd.teacher.routing import AllExperts

EXPORT_DIR = "sar_teacher_hf"


class StudentAwareRouter(OnPolicyDistillation):
    name = "sar"
    trains_teacher_routers = True
    sections = ("gkd", "sar")

    def __init__(self, cfg, tokenizer):
        super().__init__(cfg, tokenizer)
        self.sar = cfg.sar
        self.teacher_path = cfg.teacher.path
        self.trainer: RouterTrainer | None = None  # built on first use: it needs the loaded teacher
        self._resumed_state: dict | None = None  # router state from a checkpoint, applied when built

    @classmethod
    def teacher_routing(cls, cfg) -> AllExperts:
        return AllExperts()

    def _trainer(self, teacher, groups) -> RouterTrainer:
        if self.trainer is None:
            self.trainer = RouterTrainer(teacher.router_parameters(), lr=self.sar.router_lr,
                                         weight_decay=self.sar.router_weight_decay,
                                         grad_clip=self.sar.router_grad_clip, dp_group=groups.dp_group)
            if self._resumed_state is not None:
                self.trainer.load_state_dict(self._resumed_state)
        return self.trainer

    def before_student(self, batch: Batch, student_NH: torch.Tensor, ctx: StepContext) -> None:
        for _ in range(self.sar.router_steps):
            with ctx.watch.time("router_s"):
                self.router_step(batch, student_NH, ctx)

    def router_step(self, batch: Batch, student_NH: torch.Tensor, ctx: StepContext) -> None:
        """`student_NH`: the student step's own forward (the student is fixed in this step)."""
        teacher, engine, groups = ctx.teacher, ctx.engine, ctx.groups
        trainer = self._trainer(teacher, groups)
        tokens = global_token_count([batch.loss_mask], groups)
        with torch.no_grad():
            student_head_VH = gathered_head_weight(engine.module, ctx.vocab)
        with teacher.router_training(self.sar.activation_checkpointing):
            out = teacher(batch.input_ids, attention_mask=batch.attention_mask, routing=AllExperts(),
                          sequence_index=batch.example_ids, output_hidden_states=True,
                          logits_to_keep=batch.no_logits(), return_router_importance=True,
                          noise_key=(self.seed, ctx.step))
            teacher_NH = batch.response_rows(out.hidden_states[-1])
            teacher_head_VH = teacher.get_output_embeddings().weight[: ctx.vocab]
            kl = teacher_side_kl(teacher_NH, teacher_head_VH, student_NH.to(teacher_NH.dtype),
                                 student_head_VH.to(teacher_NH.dtype), ctx.chunk) / tokens
            balance = balance_loss(out.router_importance, groups.dp_group)
            (kl + self.sar.balance_weight * balance).backward()
        grad_norm = trainer.step()
        # shares of the global values: summed over ranks by the step's metrics record
        for key, value in (("router_kl", kl.item()), ("router_balance", balance.item() / groups.dp_size),
                           ("router_grad_norm", grad_norm / groups.dp_size)):
            ctx.metrics[key] = ctx.metrics.get(key, 0.0) + value

    def state_dict(self) -> dict:
        return {} if self.trainer is None else {"router": self.trainer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if "router" in state:
            self._resumed_state = state["router"]
            if self.trainer is not None:
                self.trainer.load_state_dict(state["router"])

    def finish(self, ctx: StepContext, run_dir: Path) -> None:
        if not self.sar.export_teacher or ctx.groups.rank != 0:
            return
        from ds_moekd.teacher.export import export_with_replaced_tensors

        # the fp32 masters: a bf16 teacher's routers would round what the file may hold in fp32
        routers = self.trainer.masters if self.trainer is not None else ctx.teacher.router_parameters()
        export_with_replaced_tensors(resolve_path(self.teacher_path), run_dir / EXPORT_DIR, routers)
