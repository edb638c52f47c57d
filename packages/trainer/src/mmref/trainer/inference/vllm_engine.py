"""The vLLM engine (optional extra ``vllm``): our requests in vLLM's types.

- Prompt: ``TokensPrompt(prompt_token_ids, multi_modal_data={"image": [PIL...]},
  multi_modal_uuids={"image": [sha256...]})``: the ids already hold the expanded pads,
  and vLLM's multimodal cache keys on our content hash.
- Sampling: image special tokens get a -100 logit bias (never sampled), and the engine runs
  with ``logprobs_mode="processed_logprobs"`` so reported logprobs are under that mask.
- Weights: ``collective_rpc("load_weights", ...)`` then ``process_weights_after_loading``
  (the CPU backend needs the second call to repack weights).

These translation functions are pure and tested without vLLM. Wiring them into an
``Engine`` (``AsyncLLMEngine`` + image passing instead of processed features) is not done
yet: ``mmref serve --engine vllm`` says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mmref.trainer.inference.api import Choice, SamplingParams

BANNED_LOGIT_BIAS = -100.0


def tokens_prompt(prompt_ids: list[int], images: Sequence[Any], image_sha256: Sequence[str]) -> dict[str, Any]:
    """A vLLM ``TokensPrompt`` (a TypedDict) for a prompt whose pads are already expanded."""
    if len(images) != len(image_sha256):
        raise ValueError(f"{len(images)} images but {len(image_sha256)} hashes")
    prompt: dict[str, Any] = {"prompt_token_ids": list(prompt_ids)}
    if images:
        prompt["multi_modal_data"] = {"image": list(images)}
        prompt["multi_modal_uuids"] = {"image": list(image_sha256)}
    return prompt


def sampling_kwargs(sampling: SamplingParams, banned_token_ids: Sequence[int], stop_token_ids: Sequence[int]) -> dict:
    """Keyword arguments of ``vllm.SamplingParams`` for our sampling params."""
    return {
        "n": sampling.n, "temperature": sampling.temperature, "top_p": sampling.top_p,
        "max_tokens": sampling.max_tokens, "seed": sampling.seed,
        "stop_token_ids": sorted(set(stop_token_ids) | set(sampling.stop_token_ids)),
        "logit_bias": {int(t): BANNED_LOGIT_BIAS for t in banned_token_ids},
        "logprobs": 0,  # the sampled token's logprob only
        "detokenize": False, "skip_special_tokens": False,
    }


def choices_from_output(output: Any) -> list[Choice]:
    """Our choices from a vLLM ``RequestOutput`` (token ids, sampled logprobs, finish reason)."""
    choices = []
    for completion in output.outputs:
        ids = list(completion.token_ids)
        logprobs = [float(step[token].logprob) for step, token in zip(completion.logprobs or [], ids)]
        reason = "stop" if completion.finish_reason == "stop" else "length"
        choices.append(Choice(token_ids=ids, logprobs=logprobs, finish_reason=reason))
    return choices
