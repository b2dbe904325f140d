"""Every kernel against its torch reference on CPU: Triton runs under TRITON_INTERPRET=1, fp32, tiny
shapes (bf16 `tl.dot` is unreliable in the interpreter; bf16 is checked on a GPU in test_kernels_gpu)."""

from __future__ import annotations

import logging

import pytest
import torch
from ds_moekd.kernels import (
    dense_experts,
    dense_swiglu_reference,
    grouped_experts,
    grouped_swiglu_reference,
    lm_head_divergence,
)
from ds_moekd.kernels.backends import choose_backend, configure
from helpers.references import full_logits_divergence

from ds_moekd.teacher.dense_dispatch import dispatch_dense, takes_dense_path
from ds_moekd.teacher.dispatch import dispatch_sparse

triton = pytest.importorskip("triton")
SPARSE_BACKENDS = ["torch", "triton", "torch_grouped_mm"]


def experts(num_experts=4, hidden=32, inter=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    w_gate_up = torch.randn(num_experts, hidden, 2 * inter, generator=g) / hidden**0.5
    w_down = torch.randn(num_experts, inter, hidden, generator=g) / inter**0.5
    return w_gate_up, w_down


def routing(tokens, num_experts, top_k, seed=1, skip_expert=None):
    """Distinct experts per token, random weights; `skip_expert` receives no token."""
    g = torch.Generator().manual_seed(seed)
    allowed = torch.tensor([e for e in range(num_experts) if e != skip_expert])
    ids = torch.stack([allowed[torch.randperm(len(allowed), generator=g)[:top_k]] for _ in range(tokens)])
    return ids, torch.rand(tokens, top_k, generator=g)


def gates_from(ids, weights, num_experts):
    return torch.zeros(ids.shape[0], num_experts).scatter_add(1, ids, weights)


def close(actual, expected, tol=2e-5):
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("swiglu", [False, True])
def test_triton_grouped_matmul_spans_tiles_and_skips_empty_groups(swiglu):
    from ds_moekd.kernels.grouped import loop_matmul
    from ds_moekd.kernels.triton_grouped_gemm import grouped_matmul

    g = torch.Generator().manual_seed(0)
    sizes = torch.tensor([70, 0, 3, 0, 60])  # 70 rows: two row tiles of 64 in one group
    a = torch.randn(int(sizes.sum()), 24, generator=g)
    b = torch.randn(5, 24, 40, generator=g)
    out = grouped_matmul(a, b, sizes, swiglu=swiglu)
    expected = loop_matmul(a, b, sizes)
    if swiglu:
        gate, up = expected.chunk(2, dim=-1)
        expected = torch.nn.functional.silu(gate) * up
    close(out, expected, 1e-4)
    # a transposed weight view (the backward's operand) goes through the strides
    close(
        grouped_matmul(out, b[:, :, : out.shape[1]].transpose(1, 2), sizes),
        loop_matmul(out, b[:, :, : out.shape[1]].transpose(1, 2), sizes),
        1e-4,
    )


@pytest.mark.parametrize("backend", SPARSE_BACKENDS)
def test_grouped_experts_forward_and_input_gradient_match_reference(backend):
    w_gate_up, w_down = experts()
    sizes = torch.tensor([7, 0, 12, 5])
    x = torch.randn(24, 32, generator=torch.Generator().manual_seed(2))
    x_ref, x_new = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ref = grouped_swiglu_reference(x_ref, sizes, w_gate_up, w_down)
    y_new = grouped_experts(x_new, sizes, w_gate_up, w_down, backend=backend)
    close(y_new, y_ref)
    (y_ref * y_ref.cos()).sum().backward()
    (y_new * y_new.cos()).sum().backward()
    close(x_new.grad, x_ref.grad)
    with torch.no_grad():  # inference takes the fused gate/up + SwiGLU epilogue on triton
        close(grouped_experts(x, sizes, w_gate_up, w_down, backend=backend), y_ref.detach())


def teacher_moe(x, ids, weights, w_gate_up, w_down, backend, path):
    """The teacher's MoE block at EP 1 (ds_moekd/teacher/moe_block.py): its sparse dispatch on
    `grouped_experts`, or its dense one on `dense_experts` with the routing scattered into gate weights."""
    if path == "sparse":
        ffn = lambda x_RH, sizes_E: grouped_experts(x_RH, sizes_E, w_gate_up, w_down, backend=backend)  # noqa: E731
        return dispatch_sparse(x, ids, weights, num_experts=w_gate_up.shape[0], ep_size=1, ep_group=None,
                               expert_ffn=ffn)[0]
    gates = torch.zeros(x.shape[0], w_gate_up.shape[0], dtype=weights.dtype).scatter(1, ids, weights)
    ffn = lambda x_RH, gates_RE: dense_experts(x_RH, gates_RE, w_gate_up, w_down, backend=backend)  # noqa: E731
    return dispatch_dense(x, gates, ep_size=1, ep_rank=0, ep_group=None, expert_ffn=ffn)[0]


def test_the_dense_rule_is_more_than_half_the_experts():
    assert [k for k in range(1, 9) if takes_dense_path(k, 8)] == [5, 6, 7, 8]
    assert not takes_dense_path(2, 4) and takes_dense_path(3, 4)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("path", ["sparse", "dense"])
def test_teacher_moe_paths_match_dense_reference_with_gradients(backend, path):
    num_experts, top_k = 4, 2
    w_gate_up, w_down = experts(num_experts)
    ids, weights = routing(20, num_experts, top_k, skip_expert=1)
    x = torch.randn(20, 32, generator=torch.Generator().manual_seed(3))
    x_ref, gates_ref = x.clone().requires_grad_(), gates_from(ids, weights, num_experts).requires_grad_()
    y_ref = dense_swiglu_reference(x_ref, gates_ref, w_gate_up, w_down)
    x_new, w_new = x.clone().requires_grad_(), weights.clone().requires_grad_()
    y_new = teacher_moe(x_new, ids, w_new, w_gate_up, w_down, backend, path)
    close(y_new, y_ref)
    (y_ref * y_ref.cos()).sum().backward()
    (y_new * y_new.cos()).sum().backward()
    close(x_new.grad, x_ref.grad)
    close(w_new.grad, gates_ref.grad.gather(1, ids))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_dense_experts_give_gate_gradients_for_every_expert(backend):
    w_gate_up, w_down = experts(num_experts=3, hidden=16, inter=24)  # I not a power of two
    g = torch.Generator().manual_seed(4)
    x = torch.randn(9, 16, generator=g)
    gates = torch.softmax(torch.randn(9, 3, generator=g), -1)
    gates[2, 1] = 0.0  # a dropped expert is a zero weight and still gets its gradient
    x_ref, g_ref = x.clone().requires_grad_(), gates.clone().requires_grad_()
    x_new, g_new = x.clone().requires_grad_(), gates.clone().requires_grad_()
    y_ref = dense_swiglu_reference(x_ref, g_ref, w_gate_up, w_down)
    y_new = dense_experts(x_new, g_new, w_gate_up, w_down, backend=backend)
    close(y_new, y_ref)
    y_ref.square().sum().backward()
    y_new.square().sum().backward()
    close(g_new.grad, g_ref.grad)
    close(x_new.grad, x_ref.grad)
    assert g_new.grad[2, 1].abs() > 0


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_dense_experts_in_token_blocks_match_reference_across_block_edges(backend, monkeypatch):
    from ds_moekd.kernels import dense

    monkeypatch.setattr(dense, "CPU_TOKEN_CHUNK", 5)  # 13 tokens: blocks of 5, 5 and a ragged 3
    assert [(s.start, s.stop) for s in dense._token_blocks(13, torch.device("cpu"))] == [(0, 5), (5, 10), (10, 13)]
    w_gate_up, w_down = experts(num_experts=3, hidden=16, inter=24)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(13, 16, generator=g)
    gates = torch.softmax(torch.randn(13, 3, generator=g), -1)
    grad_y = torch.randn(13, 16, generator=g)  # a different weight per row: a shifted block would show
    x_ref, g_ref = x.clone().requires_grad_(), gates.clone().requires_grad_()
    x_new, g_new = x.clone().requires_grad_(), gates.clone().requires_grad_()
    y_ref = dense_swiglu_reference(x_ref, g_ref, w_gate_up, w_down)
    y_new = dense_experts(x_new, g_new, w_gate_up, w_down, backend=backend)
    close(y_new, y_ref, 1e-5)
    y_ref.backward(grad_y)
    y_new.backward(grad_y)
    close(x_new.grad, x_ref.grad, 1e-5)
    close(g_new.grad, g_ref.grad, 1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_fused_lm_head_divergence_matches_full_logits(kind, backend):
    g = torch.Generator().manual_seed(5)
    hidden, weight = torch.randn(13, 16, generator=g), torch.randn(37, 16, generator=g) / 2
    teacher_hidden, teacher_weight = torch.randn(13, 8, generator=g), torch.randn(37, 8, generator=g)
    teacher_logits = teacher_hidden @ teacher_weight.t()
    h_ref, w_ref = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss_ref = full_logits_divergence(h_ref, w_ref, teacher_logits, kind, 0.3, 1.7)
    loss_ref.backward()
    for teacher in (teacher_logits, (teacher_hidden, teacher_weight)):
        h_new, w_new = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss = lm_head_divergence(
            h_new, w_new, teacher, kind=kind, beta=0.3, temperature=1.7, chunk=5, backend=backend
        )
        (2 * loss).backward()  # the upstream gradient scales both stored gradients
        close(loss, loss_ref.detach(), 1e-5)
        close(h_new.grad, 2 * h_ref.grad, 1e-5)
        close(w_new.grad, 2 * w_ref.grad, 1e-5)


def test_dispatcher_defaults_to_torch_on_cpu_logs_and_refuses_what_cannot_run(caplog):
    with caplog.at_level(logging.INFO, logger="ds_moekd.kernels"):
        assert choose_backend("probe_op", torch.device("cpu"), torch.float32) == "torch"
    assert "probe_op runs on backend torch" in caplog.text
    with pytest.raises(RuntimeError, match="megablocks needs a CUDA device"):
        choose_backend("probe_op", torch.device("cpu"), torch.float32, "megablocks")
    with pytest.raises(RuntimeError, match="unknown backend 'cutlass'"):
        choose_backend("probe_op", torch.device("cpu"), torch.float32, "cutlass")
    with pytest.raises(RuntimeError, match="runs on one of \\('torch', 'triton'\\), not 'megablocks'"):
        lm_head_divergence(
            torch.zeros(2, 4), torch.zeros(3, 4), torch.zeros(2, 3), kind="jsd", backend="megablocks"
        )
    with pytest.raises(ValueError, match="jsd needs 0 < beta < 1"):
        lm_head_divergence(torch.zeros(2, 4), torch.zeros(3, 4), torch.zeros(2, 3), kind="jsd", beta=1.0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_logits_divergence_gradient_matches_autograd_of_full_formula(backend):
    from ds_moekd.kernels import divergence

    g = torch.Generator().manual_seed(6)
    student, teacher = 3 * torch.randn(9, 23, generator=g), 3 * torch.randn(9, 23, generator=g)
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        s_ref, s_new = student.clone().requires_grad_(), student.clone().requires_grad_()
        ref = full_logits_divergence(s_ref, torch.eye(23), teacher, kind, 0.6, 0.8)  # identity lm_head
        ref.backward()
        loss = divergence(s_new, teacher, kind=kind, beta=0.6, temperature=0.8, chunk=4, backend=backend)
        loss.backward()
        close(loss, ref.detach(), 1e-5)
        close(s_new.grad, s_ref.grad, 1e-5)


def test_configure_sets_what_auto_means_and_explicit_backends_still_win():
    cpu = torch.device("cpu")
    try:
        configure(expert_backend="torch_grouped_mm", loss_backend="triton")
        assert choose_backend("probe_op", cpu, torch.float32) == "torch_grouped_mm"
        assert choose_backend("probe_op", cpu, torch.float32, family="loss") == "triton"
        assert choose_backend("probe_op", cpu, torch.float32, "torch") == "torch"
        with pytest.raises(ValueError, match="loss_backend='megablocks' is not 'auto' or one of"):
            configure(loss_backend="megablocks")
    finally:
        configure()
    assert choose_backend("probe_op", cpu, torch.float32, family="loss") == "torch"
