"""Training the teacher's routers and nothing else (SAR's router step, docs/methods/sar.md).

`RouterTrainer` owns fp32 master copies of the router weights and their AdamW: an Adam step of
1e-6 vanishes in bf16 weights, so the model's (possibly bf16) routers are overwritten from the
masters after every step. Router gradients are summed over the data-parallel ranks (each rank's
loss is already its share of the global mean), clipped on the global norm, and every rank applies
the same update, so the replicated routers stay identical. Every other teacher weight keeps
`requires_grad=False` and is never touched.

`router_loss` is KL(p‖q) with the gradient on the teacher's side (q is the frozen student) plus
β·Σ_layers cv²(importance), where importance is each expert's router probability summed over the
global batch's tokens.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ds_moekd.kernels import lm_head_divergence
from ds_moekd.runtime.dist import all_reduce_sum


class RouterTrainer:
    def __init__(self, params: dict[str, torch.nn.Parameter], *, lr: float, weight_decay: float, grad_clip: float,
                 dp_group: dist.ProcessGroup | None):
        if not params:
            raise ValueError("the teacher has no router parameters to train")
        self.params = params
        for p in params.values():
            p.requires_grad_(True)
        self.masters = {name: p.detach().float().clone() for name, p in params.items()}
        self.optimizer = torch.optim.AdamW(list(self.masters.values()), lr=lr, weight_decay=weight_decay)
        self.grad_clip = grad_clip
        self.dp_group = dp_group

    def step(self) -> float:
        """Apply the accumulated router gradients (summed over ranks); returns the global gradient norm."""
        grads = [p.grad.float().flatten() if p.grad is not None else torch.zeros(p.numel(), device=p.device)
                 for p in self.params.values()]
        flat = all_reduce_sum(torch.cat(grads), self.dp_group)
        for master, grad in zip(self.masters.values(), flat.split([g.numel() for g in grads]), strict=True):
            master.grad = grad.view_as(master)
        masters = list(self.masters.values())
        if self.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(masters, self.grad_clip)
        else:
            norm = torch.linalg.vector_norm(flat)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._copy_masters_to_model()
        return float(norm)

    def _copy_masters_to_model(self) -> None:
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(self.masters[name])
                p.grad = None

    def state_dict(self) -> dict:
        return {"masters": {n: m.clone() for n, m in self.masters.items()}, "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if set(state["masters"]) != set(self.masters):
            raise ValueError(
                "checkpoint's SAR router state names other router tensors than this teacher has "
                f"({sorted(set(state['masters']) ^ set(self.masters))[:4]}...); resume with the same teacher"
            )
        with torch.no_grad():
            for name, master in self.masters.items():
                master.copy_(state["masters"][name])
        self.optimizer.load_state_dict(state["optimizer"])
        self._copy_masters_to_model()


def teacher_side_kl(teacher_NH, teacher_head_VH, student_NH, student_head_VH, chunk: int = 0) -> torch.Tensor:
    """Σ_tokens KL(p‖q), p the teacher's and q the fixed student's distribution, differentiable in the
    teacher's hidden states only: the project's chunked fused lm_head divergence (kernels/divergence.py)
    with the teacher on its differentiable side, where reverse_kl KL(softmax(own)‖other) is KL(p‖q).
    No `[N, V]` logits are kept; the teacher's lm_head, frozen, gets no gradient."""
    return lm_head_divergence(teacher_NH, teacher_head_VH, (student_NH, student_head_VH), kind="reverse_kl",
                              chunk=chunk)


class _SumOverRanks(torch.autograd.Function):
    """All-reduce SUM whose backward passes the gradient through unchanged: every rank computes the
    same loss of the global sum, so each rank's share of the gradient is just dL/d(sum)."""

    @staticmethod
    def forward(ctx, x, group):
        out = x.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def balance_loss(importance_per_layer: list[torch.Tensor], dp_group: dist.ProcessGroup | None) -> torch.Tensor:
    """Σ_layers cv²(importance), importance summed over every rank's tokens (LLaMA-MoE's gate loss;
    cv² = unbiased variance / (mean² + 1e-10)). Identical on every rank."""
    total = importance_per_layer[0].new_zeros(())
    for importance_N in importance_per_layer:
        if dp_group is not None:
            importance_N = _SumOverRanks.apply(importance_N, dp_group)
        total = total + importance_N.var(unbiased=True) / (importance_N.mean() ** 2 + 1e-10)
    return total
