"""The policy loss: its entropy bonus and truncated importance sampling (``tis_cap``)."""

import math

import pytest
import torch

from mmref.trainer.loss import policy_loss, tis_weights


def test_entropy_bonus_pushes_entropy_up():
    logits = torch.randn(6, 5, requires_grad=True)
    logp = torch.log_softmax(logits, -1)
    targets = torch.tensor([0, 1, 2, 3, 4, 0])
    token_logp = logp.gather(-1, targets[:, None]).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    mask = torch.ones(6, dtype=torch.bool)
    zeros = torch.zeros(6)
    out = policy_loss(token_logp, token_logp.detach(), zeros, mask, entropy, entropy_coef=0.1)
    out.loss_sum.backward()  # advantages are 0: the gradient is the bonus alone
    with torch.no_grad():
        stepped = logits - 1.0 * logits.grad
        after = -(stepped.softmax(-1) * stepped.log_softmax(-1)).sum(-1)
    assert (after > entropy.detach()).all()


def _tokens(seed: int = 0, n: int = 8):
    """(trainer logprobs with a gradient, sampler logprobs, advantages, mask, entropy) of ``n`` tokens."""
    gen = torch.Generator().manual_seed(seed)
    logp = (-torch.rand(n, generator=gen) * 3).requires_grad_(True)
    sampler = logp.detach() + (torch.rand(n, generator=gen) - 0.5)  # engines disagree by up to 0.5 nats
    advantages = torch.randn(n, generator=gen)
    mask = torch.ones(n, dtype=torch.bool)
    mask[0] = False
    return logp, sampler, advantages, mask, torch.zeros(n)


def test_tis_weight_is_the_capped_exp_of_the_trainer_sampler_log_ratio():
    log_ratio = torch.tensor([-1.0, 0.0, 0.1, 2.0], requires_grad=True)
    weight = tis_weights(log_ratio, cap=1.2)
    assert torch.allclose(weight, torch.tensor([math.exp(-1.0), 1.0, math.exp(0.1), 1.2]))
    assert not weight.requires_grad


def test_tis_metrics_sum_the_weights_and_count_capped_loss_tokens():
    logp, sampler, advantages, mask, entropy = _tokens()
    cap = 1.1
    out = policy_loss(logp, sampler, advantages, mask, entropy, tis_cap=cap)
    expected = torch.clamp(torch.exp(logp.detach() - sampler), max=cap)[mask]
    assert out.tis_weight_sum == pytest.approx(float(expected.sum()))
    assert out.tis_capped == int((expected >= cap).sum()) > 0


@pytest.mark.parametrize("off", [None, 0.0])
def test_tis_off_leaves_the_loss_and_gradient_bit_for_bit(off):
    logp, sampler, advantages, mask, entropy = _tokens(1)
    plain = policy_loss(logp, sampler, advantages, mask, entropy)
    (grad_plain,) = torch.autograd.grad(plain.loss_sum, logp)
    disabled = policy_loss(logp, sampler, advantages, mask, entropy, tis_cap=off)
    (grad_disabled,) = torch.autograd.grad(disabled.loss_sum, logp)
    assert torch.equal(plain.loss_sum, disabled.loss_sum) and torch.equal(grad_plain, grad_disabled)
    assert (disabled.tis_weight_sum, disabled.tis_capped) == (0.0, 0)


def test_tis_gradient_is_the_advantage_times_the_capped_weight_per_token():
    logp, sampler, advantages, mask, entropy = _tokens(2)
    cap = 1.1
    out = policy_loss(logp, sampler, advantages, mask, entropy, tis_cap=cap)
    (grad,) = torch.autograd.grad(out.loss_sum, logp)
    weight = torch.clamp(torch.exp(logp.detach() - sampler), max=cap)
    assert torch.allclose(grad[mask], -(weight * advantages)[mask])
    assert torch.equal(grad[~mask], torch.zeros_like(grad[~mask]))
    # Below the cap the gradient is the untruncated ratio's: -exp(logp - sampler) * A on unclipped tokens.
    plain = policy_loss(logp, sampler, advantages, mask, entropy, clip_low=10.0, clip_high=10.0)
    (grad_plain,) = torch.autograd.grad(plain.loss_sum, logp)
    below = mask & (weight < cap)
    assert below.any() and torch.allclose(grad[below], grad_plain[below])
