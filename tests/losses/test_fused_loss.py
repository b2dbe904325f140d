"""The fused lm_head loss (CE + divergence in one pass, ds_moekd.kernels.lm_head_loss) against plain
torch autograd on full logits, and the `LossTerms` both training paths share."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from ds_moekd.kernels import lm_head_loss
from helpers.references import full_logits_divergence

from ds_moekd.losses import LossTerms


def full_logits_loss(hidden, weight, teacher_logits, targets, kind, beta, temperature, ce_weight, div_weight):
    ce = F.cross_entropy(hidden @ weight.t(), targets, reduction="sum")
    div = full_logits_divergence(hidden, weight, teacher_logits, kind, beta, temperature)
    return ce_weight * ce + div_weight * div, ce, div


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_fused_ce_plus_divergence_matches_autograd_on_full_logits(kind, backend):
    g = torch.Generator().manual_seed(11)
    hidden, weight = torch.randn(13, 16, generator=g), torch.randn(37, 16, generator=g) / 2
    teacher_hidden, teacher_weight = torch.randn(13, 8, generator=g), torch.randn(37, 8, generator=g)
    targets = torch.randint(0, 37, (13,), generator=g)
    h_ref, w_ref = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ref = full_logits_loss(h_ref, w_ref, teacher_hidden @ teacher_weight.t(), targets, kind, 0.3, 1.7, 0.4, 0.6)
    ref[0].backward()
    for teacher in (teacher_hidden @ teacher_weight.t(), (teacher_hidden, teacher_weight)):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss, ce, div = lm_head_loss(
            h, w, teacher, targets, kind=kind, beta=0.3, temperature=1.7, ce_weight=0.4, div_weight=0.6,
            chunk=5, backend=backend,
        )
        (3 * loss).backward()  # the upstream gradient scales both stored gradients
        torch.testing.assert_close(loss, ref[0].detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ce, ref[1].detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(div, ref[2].detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(h.grad, 3 * h_ref.grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(w.grad, 3 * w_ref.grad, rtol=1e-5, atol=1e-5)
        assert not ce.requires_grad and not div.requires_grad


def test_fused_cross_entropy_alone_and_bad_calls():
    g = torch.Generator().manual_seed(2)
    hidden, weight = torch.randn(7, 6, generator=g, requires_grad=True), torch.randn(11, 6, generator=g)
    targets = torch.randint(0, 11, (7,), generator=g)
    loss, ce, _ = lm_head_loss(hidden, weight, None, targets, ce_weight=1.0, chunk=3)
    loss.backward()
    h_ref = hidden.detach().clone().requires_grad_()
    ref = F.cross_entropy(h_ref @ weight.t(), targets, reduction="sum")
    ref.backward()
    torch.testing.assert_close(loss, ref.detach())
    torch.testing.assert_close(ce, ref.detach())
    torch.testing.assert_close(hidden.grad, h_ref.grad)
    with pytest.raises(ValueError, match="give the teacher, the targets or both"):
        lm_head_loss(hidden, weight, None, None)


def test_loss_terms_on_logits_weigh_and_name_the_parts():
    g = torch.Generator().manual_seed(4)
    student, teacher = torch.randn(9, 20, generator=g, requires_grad=True), torch.randn(9, 20, generator=g)
    targets = torch.randint(0, 20, (9,), generator=g)
    terms = LossTerms(ce_weight=0.25, divergence="reverse_kl", div_weight=2.0, temperature=1.5, div_name="rkl")
    loss, parts = terms.on_logits(student, teacher, targets, chunk=4)
    ref, ce, div = full_logits_loss(
        student, torch.eye(20), teacher, targets, "reverse_kl", 0.5, 1.5,
        0.25, 2.0,
    )
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    assert set(parts) == {"ce", "rkl"}
    torch.testing.assert_close(parts["ce"], ce.detach())
    torch.testing.assert_close(parts["rkl"], div.detach(), rtol=1e-5, atol=1e-6)
    only_ce, parts = LossTerms().on_logits(student, None, targets)
    assert set(parts) == {"ce"}
    torch.testing.assert_close(only_ce, F.cross_entropy(student, targets, reduction="sum"))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_teacher_draws_average_the_divergence_over_draws(kind, backend):
    """KA: M teacher draws (a leading draw dimension) score (1/M) Σ_m D(p_m, q), in the fused head
    (hidden states per draw) and on logits alike."""
    from ds_moekd.kernels import divergence

    g = torch.Generator().manual_seed(21)
    draws, n, h, ht, v = 3, 11, 16, 8, 29
    hidden, weight = torch.randn(n, h, generator=g), torch.randn(v, h, generator=g) / 2
    teacher_hidden, teacher_weight = torch.randn(draws, n, ht, generator=g), torch.randn(v, ht, generator=g)
    targets = torch.randint(0, v, (n,), generator=g)
    teacher_logits = teacher_hidden @ teacher_weight.t()  # [M, N, V]
    h_ref, w_ref = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    refs = [full_logits_loss(h_ref, w_ref, teacher_logits[m], targets, kind, 0.3, 1.4, 0.0, 1.0)[2]
            for m in range(draws)]
    ref = torch.stack(refs).mean()
    ref.backward()
    for teacher in (teacher_logits, (teacher_hidden, teacher_weight)):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss, _, div = lm_head_loss(h, w, teacher, None, kind=kind, beta=0.3, temperature=1.4, chunk=4,
                                    backend=backend)
        loss.backward()
        torch.testing.assert_close(div, ref.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(h.grad, h_ref.grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(w.grad, w_ref.grad, rtol=1e-5, atol=1e-5)
    logits = (hidden @ weight.t()).requires_grad_()
    on_logits = divergence(logits, teacher_logits, kind=kind, beta=0.3, temperature=1.4, chunk=4, backend=backend)
    on_logits.backward()
    torch.testing.assert_close(on_logits, ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits.grad @ weight, h_ref.grad, rtol=1e-5, atol=1e-5)


def test_teacher_that_does_not_match_the_student_is_refused_with_its_shapes():
    hidden, weight = torch.randn(5, 4), torch.randn(9, 4)
    with pytest.raises(ValueError, match=r"teacher \(5, 8\) does not match the student's 5 tokens x 9 vocabulary"):
        lm_head_loss(hidden, weight, torch.randn(5, 8))
    with pytest.raises(ValueError, match=r"teacher \(\(2, 6, 3\), \(9, 3\)\) does not match the student's 5 tokens"):
        lm_head_loss(hidden, weight, (torch.randn(2, 6, 3), torch.randn(9, 3)))
    with pytest.raises(ValueError, match="does not match"):
        lm_head_loss(hidden, weight, (torch.randn(5, 3), torch.randn(9, 4)))
