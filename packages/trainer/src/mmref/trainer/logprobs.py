"""Log-probabilities under the image-special-token mask, shared by engine and trainer.

The inference engine never samples image special tokens (``<|image_pad|>``, vision
start/end, ...): a sampled pad fed back into the next turn would break the prompt with
"image features and image tokens do not match". It removes them from the distribution
before sampling and reports logprobs under that same renormalized distribution; the
trainer calls the same function so its logprobs are comparable token for token.

Temperature: both sides score a token under ``masked_log_softmax(logits / T)`` with ``T`` the
temperature of the request that sampled it (``logprob_scale``: 1 for greedy, T = 0). Under
``top_p < 1`` the engine samples from the nucleus of that distribution, but both sides
report and train on the *untruncated* tempered distribution: the nucleus depends on the
whole vocabulary's order and would make the trainer's ratio undefined for tokens the
trainer's nucleus drops. The importance ratio is therefore against the tempered policy.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def logprob_scale(temperature: float) -> float:
    """The divisor of the logits whose softmax is reported for a request: ``T``, or 1 when greedy."""
    return temperature if temperature > 0 else 1.0


def masked_log_softmax(logits: torch.Tensor, banned_token_ids: Iterable[int]) -> torch.Tensor:
    """log_softmax over the vocab with banned ids at -inf.

    logits: (..., vocab) -> (..., vocab), computed in float32.
    """
    logits = logits.float()
    banned = list(banned_token_ids)
    if banned:
        logits = logits.clone()
        logits[..., banned] = float("-inf")
    return torch.log_softmax(logits, dim=-1)


def token_logprobs(logits: torch.Tensor, target_ids: torch.Tensor, banned_token_ids: Iterable[int]) -> torch.Tensor:
    """Logprob of each target id under the masked distribution.

    logits: (..., seq, vocab), target_ids: (..., seq) -> (..., seq)
    """
    logp = masked_log_softmax(logits, banned_token_ids)
    return logp.gather(-1, target_ids.unsqueeze(-1)).squeeze(-1)
