"""The policy loss's entropy bonus."""

import torch

from mmref.trainer.loss import policy_loss


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
