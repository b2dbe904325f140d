"""bf16 kernels on a CUDA GPU against fp32 torch references (skipped without a GPU).

Tolerance: bf16 inputs and outputs with fp32 accumulation; errors are relative to the output's
largest magnitude: 2e-2 for the expert FFN (two GEMMs, each output rounded to bf16) and for the
fused loss's input gradient; 1e-2 for the loss value (fp32 row arithmetic on bf16 student logits).
"""

from __future__ import annotations

import pytest
import torch
from ds_moekd.kernels import dense_experts, dense_swiglu_reference, grouped_experts, lm_head_divergence
from ds_moekd.kernels.backends import choose_backend, unavailable_reason
from ds_moekd.kernels.divergence import divergence_rows_torch

from ds_moekd.teacher.dense_dispatch import dispatch_dense, takes_dense_path
from ds_moekd.teacher.dispatch import dispatch_sparse

pytestmark = pytest.mark.gpu
FFN_TOL, LOSS_TOL = 2e-2, 1e-2


def rel_err(actual, expected):
    return ((actual.float() - expected.float()).abs().max() / expected.float().abs().max()).item()


def layer(num_experts=16, hidden=512, inter=688, tokens=1000, top_k=4, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    w_gate_up = torch.randn(num_experts, hidden, 2 * inter, device="cuda", generator=g) / hidden**0.5
    w_down = torch.randn(num_experts, inter, hidden, device="cuda", generator=g) / inter**0.5
    x = torch.randn(tokens, hidden, device="cuda", generator=g)
    top, ids = torch.randn(tokens, num_experts, device="cuda", generator=g).topk(top_k, dim=-1)
    return x, ids, torch.softmax(top, -1), w_gate_up, w_down


def teacher_moe(x, ids, weights, w_gate_up, w_down, backend):
    """The teacher's MoE block at EP 1 (ds_moekd/teacher/moe_block.py), on the path `takes_dense_path` picks."""
    num_experts = w_gate_up.shape[0]
    if not takes_dense_path(ids.shape[1], num_experts):
        ffn = lambda x_RH, sizes_E: grouped_experts(x_RH, sizes_E, w_gate_up, w_down, backend=backend)  # noqa: E731
        return dispatch_sparse(x, ids, weights, num_experts=num_experts, ep_size=1, ep_group=None, expert_ffn=ffn)[0]
    gates = torch.zeros(x.shape[0], num_experts, device=x.device, dtype=weights.dtype).scatter(1, ids, weights)
    ffn = lambda x_RH, gates_RE: dense_experts(x_RH, gates_RE, w_gate_up, w_down, backend=backend)  # noqa: E731
    return dispatch_dense(x, gates, ep_size=1, ep_rank=0, ep_group=None, expert_ffn=ffn)[0]


def test_auto_picks_triton_on_a_gpu():
    assert choose_backend("probe", torch.device("cuda"), torch.bfloat16) == "triton"


@pytest.mark.parametrize("backend", ["triton", "torch_grouped_mm", "megablocks"])
@pytest.mark.parametrize("top_k,path", [(4, "sparse"), (16, "dense"), (15, "dense")])
def test_bf16_expert_paths_match_fp32_reference_with_gradients(backend, top_k, path):
    assert takes_dense_path(top_k, 16) == (path == "dense")
    if unavailable_reason(backend, torch.device("cuda"), torch.bfloat16):
        pytest.skip(unavailable_reason(backend, torch.device("cuda"), torch.bfloat16))
    x, ids, weights, w_gate_up, w_down = layer(top_k=top_k)
    gates = torch.zeros(x.shape[0], 16, device="cuda").scatter_add(1, ids, weights)
    x_ref, g_ref = x.clone().requires_grad_(), gates.clone().requires_grad_()
    y_ref = dense_swiglu_reference(x_ref, g_ref, w_gate_up, w_down)
    y_ref.square().sum().backward()
    x_new = x.bfloat16().requires_grad_()
    w_new = weights.bfloat16().requires_grad_()
    y_new = teacher_moe(x_new, ids, w_new, w_gate_up.bfloat16(), w_down.bfloat16(), backend)
    y_new.float().square().sum().backward()
    assert rel_err(y_new, y_ref) < FFN_TOL
    assert rel_err(x_new.grad, x_ref.grad) < FFN_TOL
    assert rel_err(w_new.grad, g_ref.grad.gather(1, ids)) < FFN_TOL
    with torch.no_grad():  # the fused-epilogue inference path
        assert (
            rel_err(
                teacher_moe(x.bfloat16(), ids, weights.bfloat16(), w_gate_up.bfloat16(), w_down.bfloat16(), backend),
                y_ref,
            )
            < FFN_TOL
        )


def test_bf16_grouped_gemm_with_skewed_groups_and_an_empty_expert():
    x, _, _, w_gate_up, w_down = layer(tokens=3000)
    sizes = torch.tensor([2000, 0, 1, 999] + [0] * 12, device="cuda")
    from ds_moekd.kernels import grouped_swiglu_reference

    expected = grouped_swiglu_reference(x, sizes, w_gate_up, w_down)
    with torch.no_grad():
        out = grouped_experts(x.bfloat16(), sizes, w_gate_up.bfloat16(), w_down.bfloat16(), backend="triton")
    assert rel_err(out, expected) < FFN_TOL


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_bf16_fused_lm_head_divergence_matches_fp32(kind):
    g = torch.Generator(device="cuda").manual_seed(1)
    hidden = torch.randn(300, 256, device="cuda", generator=g)
    weight = torch.randn(32000, 256, device="cuda", generator=g) / 16
    teacher = (torch.randn(300, 32000, device="cuda", generator=g) * 2).bfloat16()
    logits_ref = hidden.bfloat16().float() @ weight.bfloat16().float().t()
    loss_ref, grad_ref = divergence_rows_torch(logits_ref, teacher.float(), kind, 0.3)
    h = hidden.bfloat16().requires_grad_()
    loss = lm_head_divergence(h, weight.bfloat16(), teacher, kind=kind, beta=0.3, chunk=128, backend="triton")
    loss.backward()
    assert abs(loss.item() - loss_ref.sum().item()) / loss_ref.sum().item() < LOSS_TOL
    assert rel_err(h.grad, grad_ref @ weight.bfloat16().float()) < FFN_TOL


def test_bf16_fused_ce_plus_divergence_over_two_teacher_draws_matches_fp32():
    """The training form: CE + reverse KL averaged over 2 teacher draws given as hidden states."""
    from ds_moekd.kernels import lm_head_loss

    g = torch.Generator(device="cuda").manual_seed(2)
    hidden = torch.randn(300, 256, device="cuda", generator=g)
    weight = torch.randn(32000, 256, device="cuda", generator=g) / 16
    teacher_hidden = torch.randn(2, 300, 512, device="cuda", generator=g).bfloat16()
    teacher_weight = (torch.randn(32000, 512, device="cuda", generator=g) / 16).bfloat16()
    targets = torch.randint(0, 32000, (300,), device="cuda", generator=g)
    logits_ref = hidden.bfloat16().float() @ weight.bfloat16().float().t()
    ce_ref = torch.nn.functional.cross_entropy(logits_ref, targets, reduction="sum")
    rkl = [divergence_rows_torch(logits_ref, (t @ teacher_weight.t()).float(), "reverse_kl") for t in teacher_hidden]
    loss_ref = 0.5 * ce_ref + 0.5 * (rkl[0][0].sum() + rkl[1][0].sum()) / 2
    h = hidden.bfloat16().requires_grad_()
    loss, _, _ = lm_head_loss(h, weight.bfloat16(), (teacher_hidden, teacher_weight), targets, kind="reverse_kl",
                              ce_weight=0.5, div_weight=0.5, backend="triton")
    loss.backward()
    onehot = torch.nn.functional.one_hot(targets, 32000).float()
    grad_logits_ref = 0.5 * (logits_ref.softmax(-1) - onehot) + 0.5 * (rkl[0][1] + rkl[1][1]) / 2
    assert abs(loss.item() - loss_ref.item()) / loss_ref.item() < LOSS_TOL
    assert rel_err(h.grad, grad_logits_ref @ weight.bfloat16().float()) < FFN_TOL
