"""Token-level policy-gradient loss with an importance ratio against inference logprobs.

    ratio   = exp(logp_trainer - logp_inference)
    loss_t  = -min(ratio * A, clip(ratio, 1 - clip_low, 1 + clip_high) * A)   (DAPO-style
              asymmetric clip), plus kl_coef * k3 when a reference is given, where
              k3 = exp(r) - r - 1 with r = logp_ref - logp (Schulman's estimator of
              KL(policy || reference), unbiased on tokens sampled from the policy),
              minus entropy_coef * entropy_t (an exploration bonus; 0 by default)
    loss    = sum over loss tokens / normalizer (token-level mean across the whole step)

Truncated importance sampling (``tis_cap``; Yao et al., "Your efficient RL framework secretly
brings you off-policy RL training", verl's ``tis_imp_ratio_cap``): the sampler's logprobs differ
from the trainer's under the same weights. With a cap, the ratio above is taken against the
step's own weights (the old trainer logprobs: one optimizer step per batch, so ``logp`` detached)
and the policy-gradient term is multiplied per token by the detached weight

    w_t     = min(exp(logp_trainer_old - logp_inference), tis_cap)

(the same log-ratio ``mismatch_kl`` measures). ``tis_cap`` None or 0 leaves the loss as above.

Pure torch: tensors in, a scalar and metric tensors out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LossOutput:
    """The summed loss (divide by the step's token count) and per-step metric sums."""

    loss_sum: torch.Tensor
    tokens: int
    clipped: int
    mismatch_kl_sum: float
    entropy_sum: float
    ref_kl_sum: float = 0.0
    tis_weight_sum: float = 0.0  # sum of w_t over loss tokens (0 without tis_cap)
    tis_capped: int = 0          # loss tokens whose w_t hit the cap


def policy_loss(logprobs: torch.Tensor, inference_logprobs: torch.Tensor, advantages: torch.Tensor,
                loss_mask: torch.Tensor, entropy: torch.Tensor, clip_low: float = 0.2, clip_high: float = 0.28,
                kl_coef: float = 0.0, ref_logprobs: torch.Tensor | None = None,
                entropy_coef: float = 0.0, tis_cap: float | None = None) -> LossOutput:
    """Clipped policy-gradient loss summed over masked tokens. All inputs (T,)."""
    mask = loss_mask.float()
    # Non-loss positions can hold -inf (image tokens are banned targets): zero them before exp.
    logprobs = torch.where(loss_mask, logprobs, torch.zeros_like(logprobs))
    log_ratio = torch.where(loss_mask, logprobs - inference_logprobs, torch.zeros_like(logprobs))
    weight = tis_weights(log_ratio, tis_cap) if tis_cap else None
    ratio = torch.exp(log_ratio) if weight is None else torch.exp(log_ratio - log_ratio.detach())
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1 - clip_low, 1 + clip_high) * advantages
    per_token = -torch.minimum(unclipped, clipped)
    if weight is not None:
        per_token = per_token * weight
    ref_kl = torch.zeros((), device=logprobs.device)
    if ref_logprobs is not None:
        delta = torch.where(loss_mask, ref_logprobs - logprobs, torch.zeros_like(logprobs))
        k3 = torch.exp(delta) - delta - 1
        ref_kl = (k3.detach() * mask).sum()
        if kl_coef > 0:
            per_token = per_token + kl_coef * k3
    if entropy_coef > 0:
        per_token = per_token - entropy_coef * entropy
    with torch.no_grad():
        was_clipped = ((clipped != unclipped) & loss_mask).sum()
        # k3 estimator of KL(inference || trainer): how far the two engines disagree.
        mismatch = ((torch.exp(-log_ratio) + log_ratio - 1) * mask).sum()
        tis_sum = 0.0 if weight is None else float((weight * mask).sum())
        tis_capped = 0 if weight is None else int(((weight >= tis_cap) & loss_mask).sum())
    return LossOutput(
        loss_sum=torch.where(loss_mask, per_token, torch.zeros_like(per_token)).sum(), tokens=int(mask.sum()), clipped=int(was_clipped),
        mismatch_kl_sum=float(mismatch), entropy_sum=float(torch.where(loss_mask, entropy.detach(), torch.zeros_like(entropy)).sum()),
        ref_kl_sum=float(ref_kl), tis_weight_sum=tis_sum, tis_capped=tis_capped,
    )


def tis_weights(log_ratio: torch.Tensor, cap: float) -> torch.Tensor:
    """Truncated importance weights ``min(exp(log_ratio), cap)``, detached.

    ``log_ratio`` is trainer minus sampler logprob per token (0 off the loss mask, so weight 1 there).
    """
    return torch.clamp(torch.exp(log_ratio.detach()), max=cap)
