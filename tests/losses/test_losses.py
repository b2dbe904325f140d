import torch
import torch.nn.functional as F
from ds_moekd.kernels import divergence

from ds_moekd.losses import token_cross_entropy


def forward_kl(teacher, student, **kwargs):
    return divergence(student, teacher, kind="forward_kl", **kwargs)


def reverse_kl(teacher, student, **kwargs):
    return divergence(student, teacher, kind="reverse_kl", **kwargs)


def _logits(seed, n=13, v=17):
    return torch.randn(n, v, generator=torch.Generator().manual_seed(seed)) * 3


def test_forward_kl_matches_torch_kl_div():
    t, s = _logits(0), _logits(1)
    expected = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="sum")
    torch.testing.assert_close(forward_kl(t, s), expected)


def test_reverse_kl_swaps_the_roles():
    t, s = _logits(2), _logits(3)
    expected = F.kl_div(F.log_softmax(t, -1), F.log_softmax(s, -1), log_target=True, reduction="sum")
    torch.testing.assert_close(reverse_kl(t, s), expected)


def test_chunking_and_temperature_do_not_change_the_sum():
    t, s = _logits(4), _logits(5)
    for fn in (forward_kl, reverse_kl):
        torch.testing.assert_close(fn(t, s, chunk=4, temperature=2.0), fn(t, s, chunk=0, temperature=2.0))
    assert not torch.allclose(forward_kl(t, s, temperature=2.0), forward_kl(t, s))


def test_kl_is_zero_for_equal_distributions_and_gradient_flows_to_student_only():
    t = _logits(6)
    s = t.clone().requires_grad_(True)
    kl = forward_kl(t, s)
    assert kl.abs() < 1e-5
    (forward_kl(t, s + 1.0 * torch.eye(13, 17)) ).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0


def test_cross_entropy_is_a_sum():
    s, y = _logits(7), torch.randint(0, 17, (13,), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(token_cross_entropy(s, y), F.cross_entropy(s, y) * 13)
