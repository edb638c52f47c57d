"""Inference engines: the ``Engine`` protocol and the built-in transformers engine.

The transformers engine serializes requests on one model through an asyncio queue (one
worker thread owns the model); a request's ``n`` samples run as one batch of ``n`` rows.
Image special tokens are removed from the sampling distribution and logprobs are reported
under the same mask, recorded step by step (``inference.sampling.RecordingSampler``).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from transformers import LogitsProcessorList

from mmref.trainer.checkpoint import load_weights_into
from mmref.trainer.inference.api import Choice, SamplingParams
from mmref.trainer.inference.sampling import RecordingSampler
from mmref.trainer.pixels import ImageFeatures


class Engine(Protocol):
    """What the server needs from an engine."""

    max_model_len: int
    vocab_size: int  # rows of the input embedding: valid prompt ids are [0, vocab_size)
    image_token_ids: frozenset[int]
    weight_version: int

    async def generate(self, prompt_ids: list[int], features: Sequence[ImageFeatures], mm_token_type_ids: list[int],
                       sampling: SamplingParams, image_sha256: Sequence[str]) -> list[Choice]: ...

    async def update_weights(self, path: str) -> int: ...


@dataclass
class _Job:
    prompt_ids: list[int]
    features: Sequence[ImageFeatures]
    mm_token_type_ids: list[int]
    sampling: SamplingParams
    future: asyncio.Future


class TransformersEngine:
    """Sampling with a transformers model on CPU or CUDA."""

    def __init__(self, model: torch.nn.Module, image_token_ids: frozenset[int], stop_token_ids: Sequence[int],
                 pad_token_id: int, device: str = "cpu", weight_version: int = 0,
                 max_model_len: int | None = None) -> None:
        self.model = model.to(device).eval()
        self.device = torch.device(device)
        self.image_token_ids = frozenset(image_token_ids)
        self.stop_token_ids = list(stop_token_ids)
        self.pad_token_id = pad_token_id
        self.weight_version = weight_version
        text = getattr(model.config, "text_config", model.config)
        limit = int(text.max_position_embeddings)
        if max_model_len is not None and not 0 < max_model_len <= limit:
            raise ValueError(f"max_model_len {max_model_len} must be in [1, {limit}] (the model's max_position_embeddings)")
        self.max_model_len = max_model_len or limit
        self.vocab_size = int(model.get_input_embeddings().num_embeddings)
        self._queue: asyncio.Queue[_Job] | None = None
        self._worker: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._model_lock = threading.Lock()

    async def generate(self, prompt_ids, features, mm_token_type_ids, sampling, image_sha256=()) -> list[Choice]:
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._worker is None or self._worker.done():
            # The queue and its worker belong to one event loop; a new loop gets its own.
            self._loop, self._queue = loop, asyncio.Queue()
            self._worker = loop.create_task(self._serve())
        future = asyncio.get_running_loop().create_future()
        await self._queue.put(_Job(prompt_ids, features, mm_token_type_ids, sampling, future))
        return await future

    async def _serve(self) -> None:
        while True:
            jobs = [await self._queue.get()]
            while not self._queue.empty() and len(jobs) < 32:  # drain: one thread hop per batch of requests
                jobs.append(self._queue.get_nowait())
            results = await asyncio.to_thread(self._run_jobs, jobs)
            for job, result in zip(jobs, results):
                if job.future.done():
                    continue
                if isinstance(result, BaseException):
                    job.future.set_exception(result)
                else:
                    job.future.set_result(result)

    def _run_jobs(self, jobs: list[_Job]) -> list[list[Choice] | BaseException]:
        results: list[list[Choice] | BaseException] = []
        for job in jobs:
            try:
                results.append(self.generate_sync(job.prompt_ids, job.features, job.mm_token_type_ids, job.sampling))
            except Exception as exc:  # delivered to the waiting request, the worker lives on
                results.append(exc)
        return results

    @torch.no_grad()
    def generate_sync(self, prompt_ids: list[int], features: Sequence[ImageFeatures], mm_token_type_ids: list[int],
                      sampling: SamplingParams) -> list[Choice]:
        """Sample ``sampling.n`` completions of one prompt (blocking)."""
        with self._model_lock:
            ids = torch.tensor([prompt_ids], device=self.device)
            kwargs = {}
            if features:
                kwargs = dict(pixel_values=torch.cat([f.pixel_values for f in features]).to(self.device),
                              image_grid_thw=torch.tensor([f.grid_thw for f in features], device=self.device))
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed)
            stops = sorted(set(self.stop_token_ids) | set(sampling.stop_token_ids))
            sampler = RecordingSampler(self.image_token_ids, sampling.temperature, sampling.top_p)
            out = self.model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids),
                mm_token_type_ids=torch.tensor([mm_token_type_ids], device=self.device), **kwargs,
                do_sample=sampling.temperature > 0, logits_processor=LogitsProcessorList([sampler]),
                max_new_tokens=sampling.max_tokens, eos_token_id=stops, pad_token_id=self.pad_token_id,
                num_return_sequences=sampling.n, return_dict_in_generate=True,
            )
            completions = out.sequences[:, ids.shape[1]:]
            token_logp = sampler.finish(out.sequences)
        return [_choice(row.tolist(), lp.tolist(), stops) for row, lp in zip(completions, token_logp)]

    async def update_weights(self, path: str) -> int:
        def load() -> int:
            with self._model_lock:
                return load_weights_into(self.model, Path(path))
        self.weight_version = await asyncio.to_thread(load)
        return self.weight_version


def _choice(ids: list[int], logprobs: list[float], stops: Sequence[int]) -> Choice:
    """Trim a generated row after its first stop token (rows of a batch are padded after stopping)."""
    for i, token in enumerate(ids):
        if token in stops:
            return Choice(token_ids=ids[: i + 1], logprobs=logprobs[: i + 1], finish_reason="stop")
    return Choice(token_ids=ids, logprobs=logprobs, finish_reason="length")
