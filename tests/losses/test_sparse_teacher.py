"""The top-k teacher's forward KL (kernels' SparseTeacher): equal to the dense loss at k = V, the
documented k + 1-outcome KL below it, and gradients that match autograd of a plain torch formula."""

import pytest
import torch
import torch.nn.functional as F
from ds_moekd.kernels import SparseTeacher, divergence, lm_head_loss


def top_k_teacher(teacher_MNV: torch.Tensor, k: int, temperature: float = 1.0) -> SparseTeacher:
    log_p = F.log_softmax(teacher_MNV.float() / temperature, dim=-1)
    logprobs, ids = log_p.topk(k, dim=-1)
    rest = log_p.scatter(-1, ids, float("-inf"))
    return SparseTeacher(logprobs, ids, rest.logsumexp(-1))


def reference_sparse_kl(student_NV, teacher_MNV, k, temperature):
    """Plain torch: KL over the k teacher tokens plus one bucket for all others, mean over draws."""
    total = 0.0
    log_q = F.log_softmax(student_NV / temperature, dim=-1)
    for teacher_NV in teacher_MNV:
        log_p = F.log_softmax(teacher_NV / temperature, dim=-1)
        ids = log_p.topk(k, dim=-1).indices
        top = torch.zeros_like(log_p, dtype=torch.bool).scatter(1, ids, True)
        p_top = log_p.exp() * top
        p_tail = (log_p.exp() * ~top).sum(-1)
        q_tail = (log_q.exp() * ~top).sum(-1)
        kl = (p_top * (log_p - log_q)).sum(-1)
        kl = kl + torch.where(p_tail > 0, p_tail * (p_tail.clamp_min(1e-30).log() - q_tail.clamp_min(1e-30).log()),
                              torch.zeros_like(p_tail))
        total = total + kl.sum()
    return total / len(teacher_MNV)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_full_k_equals_the_dense_forward_kl(temperature):
    torch.manual_seed(0)
    student = torch.randn(12, 40, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2, 12, 40, dtype=torch.float64) * 3
    dense = divergence(student, teacher, kind="forward_kl", temperature=temperature, backend="torch")
    (grad_dense,) = torch.autograd.grad(dense, student)
    sparse = divergence(student, top_k_teacher(teacher, 40, temperature), kind="forward_kl",
                        temperature=temperature, backend="torch")
    (grad_sparse,) = torch.autograd.grad(sparse, student)
    torch.testing.assert_close(sparse.double(), dense.double(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad_sparse, grad_dense, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("k", [1, 5, 39])
def test_top_k_loss_and_gradient_match_the_plain_formula(k):
    torch.manual_seed(1)
    student = torch.randn(9, 40, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(3, 9, 40, dtype=torch.float64) * 2
    ours = divergence(student, top_k_teacher(teacher, k, 1.5), kind="forward_kl", temperature=1.5,
                      chunk=4, backend="torch")
    (grad,) = torch.autograd.grad(ours, student)
    ref = reference_sparse_kl(student, teacher, k, 1.5)
    (grad_ref,) = torch.autograd.grad(ref, student)
    torch.testing.assert_close(ours.double(), ref, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-4, atol=1e-7)  # the kernel works in fp32
    dense = divergence(student.detach(), teacher, kind="forward_kl", temperature=1.5, backend="torch")
    assert ours.item() <= dense.item() + 1e-9  # merging outcomes never raises a KL


def test_fused_head_with_a_top_k_teacher_matches_logits():
    torch.manual_seed(2)
    hidden = torch.randn(10, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(30, 8, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 30, (10,))
    teacher = top_k_teacher(torch.randn(2, 10, 30, dtype=torch.float64), 7)
    loss, ce, kl = lm_head_loss(hidden, weight, teacher, targets, ce_weight=0.5, div_weight=0.5, chunk=3,
                                backend="torch")
    grads = torch.autograd.grad(loss, (hidden, weight))
    logits = hidden @ weight.t()
    ref = 0.5 * F.cross_entropy(logits, targets, reduction="sum") + 0.5 * divergence(
        logits, teacher, kind="forward_kl", backend="torch")
    ref_grads = torch.autograd.grad(ref, (hidden, weight))
    torch.testing.assert_close(loss.double(), ref.double())
    for ours, theirs in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(ours, theirs)


def test_top_k_teacher_refuses_other_divergences_and_shapes():
    teacher = top_k_teacher(torch.randn(1, 4, 10), 3)
    with pytest.raises(ValueError, match="forward_kl only"):
        divergence(torch.randn(4, 10), teacher, kind="reverse_kl", backend="torch")
    with pytest.raises(ValueError, match="does not match the student's 5 tokens"):
        divergence(torch.randn(5, 10), teacher, kind="forward_kl", backend="torch")
