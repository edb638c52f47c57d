"""The one logits processor the transformers engine samples through, recording logprobs as it goes.

``generate(output_logits=True)`` keeps every step's full-vocab logits: n=8 samples of 1024
tokens over Qwen's 152k vocab is 5 GB, and a fuzzed n=256 request exhausted memory. This
processor keeps one step instead. Each step it

1. gathers the logprob of the token sampled at the previous step (now the last of
   ``input_ids``) from that step's distribution;
2. computes this step's distribution, ``masked_log_softmax(logits / temperature)`` with
   image special tokens removed (``mmref.trainer.logprobs``: the trainer's definition);
3. returns it, top-p truncated, as the scores ``generate`` samples from (greedy: argmax).
   The recorded logprobs stay untruncated (see ``mmref.trainer.logprobs``).

``generate`` must add no processors of its own (temperature/top_p/top_k unset), so this
one sees the raw logits. After ``generate``, ``finish(sequences)`` gathers the last step.

One-token requests take ``n`` draws from one prefill instead: ``generate(max_new_tokens=1)``
runs the prompt once per row, then ``draw(n)`` samples ``n`` tokens per row from the
recorded distribution (a GRPO group of 8 is one prompt forward, not 8).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from transformers import LogitsProcessor, TopPLogitsWarper

from mmref.trainer.logprobs import logprob_scale, masked_log_softmax


class RecordingSampler(LogitsProcessor):
    """Image-token mask, temperature and top-p for sampling; per-token logprobs of what was sampled."""

    def __init__(self, banned_token_ids: Iterable[int], temperature: float, top_p: float) -> None:
        self.banned = sorted(banned_token_ids)
        self.scale = logprob_scale(temperature)
        self.top_p = TopPLogitsWarper(top_p) if 0 < top_p < 1 and temperature > 0 else None
        self._steps: list[torch.Tensor] = []  # (B,) logprob of each sampled token so far
        self._last: torch.Tensor | None = None  # (B, V) the latest step's distribution

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self._last is not None:
            self._steps.append(self._gather(input_ids[:, -1]))
        self._last = masked_log_softmax(scores / self.scale, self.banned)
        return self.top_p(input_ids, self._last) if self.top_p is not None else self._last

    def finish(self, sequences: torch.Tensor) -> torch.Tensor:
        """(B, steps) logprobs of the generated tokens, given ``generate``'s output sequences."""
        if self._last is not None:
            self._steps.append(self._gather(sequences[:, -1]))
            self._last = None
        return torch.stack(self._steps, dim=1) if self._steps else sequences.new_zeros((sequences.shape[0], 0), dtype=torch.float32)

    def draw(self, n: int, greedy: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, n) tokens drawn from the latest step's distribution and their (B, n) logprobs; ends the record.

        Sampled as ``generate`` does (top-p truncated scores, softmax, multinomial), ``n`` draws
        with replacement per row; greedy repeats the argmax. Logprobs are untruncated, as in ``finish``.
        """
        if self._last is None:
            raise RuntimeError("draw() needs one recorded step: call generate with this processor first")
        last, self._last = self._last, None
        if greedy:
            tokens = last.argmax(-1, keepdim=True).expand(-1, n)
        else:
            scores = self.top_p(None, last) if self.top_p is not None else last
            tokens = torch.multinomial(scores.softmax(-1), n, replacement=True)
        return tokens, last.gather(-1, tokens)

    def _gather(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._last.gather(-1, tokens[:, None].to(self._last.device)).squeeze(-1)
