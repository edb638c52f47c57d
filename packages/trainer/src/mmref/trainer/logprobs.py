"""Log-probabilities under the image-special-token mask, shared by engine and trainer.

The inference engine never samples image special tokens (``<|image_pad|>``, vision
start/end, ...): a sampled pad fed back into the next turn would break the prompt with
"image features and image tokens do not match". It removes them from the distribution
before sampling and reports logprobs under that same renormalized distribution; the
trainer calls the same function so its logprobs are comparable token for token.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


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
