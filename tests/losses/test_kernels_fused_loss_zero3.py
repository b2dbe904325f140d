"""The fused lm_head + loss with a ZeRO-3-partitioned lm_head on 2 gloo ranks: one SGD step on
CE + divergence equals a plain-torch step with full logits on the concatenated batch (distinct,
uneven inputs; an lm_head padded past the tokenizer's vocabulary)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from ds_moekd.losses import LossTerms
from ds_moekd.losses.fused import attach_fused_loss_head
from ds_moekd.runtime.dist import ParallelGroups, init_distributed

HIDDEN, VOCAB, PADDED_VOCAB = 12, 29, 32  # lm_head rows past the tokenizer's vocab are padding


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(8, HIDDEN)
        self.lm_head = nn.Linear(HIDDEN, PADDED_VOCAB, bias=False)

    def forward(self, x):
        return torch.tanh(self.body(x))

    def get_output_embeddings(self):
        return self.lm_head


def make_inputs(rank_tokens: list[int]):
    g = torch.Generator().manual_seed(7)
    return [
        (torch.randn(n, 8, generator=g), 3 * torch.randn(n, VOCAB, generator=g), torch.randint(0, VOCAB, (n,), generator=g))
        for n in rank_tokens
    ]


def _fused_step_on_rank(inputs, kind, lr):
    import deepspeed

    groups = ParallelGroups.create(ep_size=1)
    x, teacher_logits, targets = inputs[dist.get_rank()]
    ds_config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    model = TinyLM()
    terms = LossTerms(ce_weight=0.3, divergence=kind, div_weight=0.7, temperature=1.3, beta=0.4)
    head = attach_fused_loss_head(model, vocab=VOCAB, terms=terms, chunk=3, backend="torch")
    init_distributed()  # DeepSpeed's comm layer, without its CPU inference-op build
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=lr), config=ds_config
    )
    weight = engine.module.lm_head.weight
    local_numel = weight.numel()  # partitioned: nothing of it is materialised outside the gather
    global_tokens = sum(len(i[0]) for i in inputs)
    loss_sum, parts = head(engine(x), teacher_logits, targets)
    loss = loss_sum / global_tokens
    engine.backward(loss * groups.dp_size)  # cancel DeepSpeed's mean over data-parallel ranks
    engine.step()
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params):
        after = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    return {
        "loss": loss.item(),
        "parts": {k: v.item() / global_tokens for k, v in parts.items()},
        "params": after,
        "local_numel": local_numel,
        "keys": list(model.state_dict()),
    }


def reference_step(inputs, kind, lr):
    model = TinyLM()
    x = torch.cat([i[0] for i in inputs])
    t = torch.cat([i[1] for i in inputs]) / 1.3
    targets = torch.cat([i[2] for i in inputs])
    logits = model.lm_head(model(x))[:, :VOCAB]
    ce = torch.nn.functional.cross_entropy(logits, targets)
    log_q = torch.log_softmax(logits / 1.3, -1)
    log_p = torch.log_softmax(t, -1)
    if kind == "reverse_kl":
        div = (log_q.exp() * (log_q - log_p)).sum() / len(x)
    else:  # jsd, beta 0.4
        log_m = torch.log(0.4 * log_p.exp() + 0.6 * log_q.exp())
        div = (0.4 * log_p.exp() * (log_p - log_m) + 0.6 * log_q.exp() * (log_q - log_m)).sum() / len(x)
    loss = 0.3 * ce + 0.7 * div
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= lr * p.grad
    return loss.item(), {"ce": ce.item(), kind: div.item()}, dict(model.named_parameters())


@pytest.mark.parametrize("kind", ["reverse_kl", "jsd"])
def test_fused_loss_with_zero3_partitioned_lm_head_equals_full_logits_step(rank_pool2, kind):
    inputs = make_inputs([5, 2])
    results = rank_pool2.run(_fused_step_on_rank, inputs, kind, 0.5)
    ref_loss, ref_parts, ref_params = reference_step(inputs, kind, 0.5)
    assert all(r["local_numel"] < HIDDEN * PADDED_VOCAB for r in results)
    assert results[0]["keys"] == list(TinyLM().state_dict())  # the head adds nothing to checkpoints
    assert sum(r["loss"] for r in results) == pytest.approx(ref_loss, rel=1e-5)
    for name, value in ref_parts.items():
        assert sum(r["parts"]["kl" if name == kind else name] for r in results) == pytest.approx(value, rel=1e-5)
    before = TinyLM().state_dict()
    assert not torch.equal(results[0]["params"]["lm_head.weight"], before["lm_head.weight"])
    for r in results:
        for name, expected in ref_params.items():
            torch.testing.assert_close(r["params"][name], expected.detach(), rtol=1e-5, atol=1e-6, msg=name)
