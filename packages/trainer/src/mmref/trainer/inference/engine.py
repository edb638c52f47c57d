"""Inference engines: the ``Engine`` protocol and the built-in transformers engine.

The transformers engine queues requests (asyncio) for one worker thread that owns the
model; requests waiting together with the same sampling params (and no seed) run as one
left-padded ``generate`` batch, each with its ``n`` samples as rows; an image shared by
several requests of a batch (a GRPO group) goes through the vision tower once. A GRPO group
sent as one ``n = G`` request costs one prompt forward: a one-token request draws its ``n``
tokens from that one distribution; a longer one (image prompts) repeats the prefilled KV
cache ``n`` times and decodes from there.
Image special tokens are removed from the sampling distribution and logprobs are reported
under the same mask, recorded step by step (``inference.sampling.RecordingSampler``).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import torch
from transformers import LogitsProcessorList
from transformers.cache_utils import Cache, LinearAttentionCacheLayerMixin

from mmref.trainer.checkpoint import copy_weights, load_weights_into
from mmref.trainer.forward import rope_index_of, vision_tower
from mmref.trainer.inference.api import Choice, SamplingParams
from mmref.trainer.inference.sampling import RecordingSampler
from mmref.trainer.models import merge_size_of
from mmref.trainer.pixels import ImageFeatures
from mmref.trainer.vision_once import vision_once


_ANNOUNCED: ContextVar[bool] = ContextVar("mmref_engine_announced", default=False)


class Engine(Protocol):
    """What the server needs from an engine."""

    name: str  # "transformers" or "vllm": what /v1/models reports
    input_kind: Literal["features", "images"]  # processed ImageFeatures, or DecodedImage for engines that process
    max_model_len: int
    vocab_size: int  # rows of the input embedding: valid prompt ids are [0, vocab_size)
    image_token_ids: frozenset[int]
    weight_version: int

    async def generate(self, prompt_ids: list[int], features: Sequence[ImageFeatures], mm_token_type_ids: list[int],
                       sampling: SamplingParams, image_sha256: Sequence[str]) -> list[Choice]: ...

    async def update_weights(self, path: str) -> int: ...


@dataclass
class Job:
    """One request for ``generate_batch``: a prompt with its image features (``future`` is the queue's).

    ``image_sha256`` (one per feature, optional) names equal images across jobs.
    """

    prompt_ids: list[int]
    features: Sequence[ImageFeatures]
    mm_token_type_ids: list[int]
    sampling: SamplingParams
    future: asyncio.Future | None = None
    image_sha256: Sequence[str] = ()


class TransformersEngine:
    """Sampling with a transformers model on CPU or CUDA, in ``dtype`` (None: the model's own).

    Logprobs are computed in float32 from the model's logits (``mmref.trainer.logprobs``).
    """

    name = "transformers"
    input_kind = "features"

    def __init__(self, model: torch.nn.Module, image_token_ids: frozenset[int], stop_token_ids: Sequence[int],
                 pad_token_id: int, device: str = "cpu", weight_version: int = 0,
                 max_model_len: int | None = None, max_batch: int = 32, batch_wait_s: float = 0.005,
                 max_batch_wait_s: float = 0.05, dtype: torch.dtype | None = None) -> None:
        self.model = model.to(device=device, dtype=dtype).eval()
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
        self.merge_size = merge_size_of(model)
        self._mrope = rope_index_of(model) is not None  # mRoPE models take mm_token_type_ids, others refuse them
        self._queue: asyncio.Queue[Job] | None = None
        self._worker: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._model_lock = threading.Lock()
        self.max_batch, self.batch_wait_s = max_batch, batch_wait_s  # requests per forward; wait for the next
        self.max_batch_wait_s = max_batch_wait_s  # longest a batch stays open for requests still ``arriving``
        self._arriving = 0
        # perf_counter sums a caller reads as deltas (mmref rl's per-step split): sampling, weight loads
        self.generate_s = 0.0
        self.load_s = 0.0
        self.batches = 0  # forwards (generate batches) run

    async def generate(self, prompt_ids, features, mm_token_type_ids, sampling, image_sha256=()) -> list[Choice]:
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._worker is None or self._worker.done():
            # The queue and its worker belong to one event loop; a new loop gets its own.
            self._loop, self._queue = loop, asyncio.Queue()
            self._worker = loop.create_task(self._serve())
        future = asyncio.get_running_loop().create_future()
        if _ANNOUNCED.get():  # announced by ``arriving``: no longer on its way
            _ANNOUNCED.set(False)
            self._arriving -= 1
        await self._queue.put(Job(prompt_ids, features, mm_token_type_ids, sampling, future, image_sha256))
        return await future

    @contextmanager
    def arriving(self) -> Iterator[None]:
        """Around a request's handling before ``generate`` (validation, feature loading): the worker
        holds its next batch open for requests inside this block, up to ``max_batch_wait_s``."""
        self._arriving += 1
        token = _ANNOUNCED.set(True)
        try:
            yield
        finally:
            if _ANNOUNCED.get():  # never reached generate (a bad request)
                self._arriving -= 1
            _ANNOUNCED.reset(token)

    async def _serve(self) -> None:
        while True:
            jobs = [await self._queue.get()]
            opened = time.perf_counter()
            while len(jobs) < self.max_batch:  # drain: one thread hop and one forward per batch of requests
                if self._queue.empty():
                    # A burst (a step's group requests) reaches the queue several ms apart, behind HTTP
                    # parsing and feature loading; a forward costs 7 ms for 1 prompt and 18 ms for 32
                    # (1 thread), so waiting for requests already being handled beats a forward each.
                    await asyncio.sleep(self.batch_wait_s)
                    expected = self._arriving > 0 and time.perf_counter() - opened < self.max_batch_wait_s
                    if self._queue.empty() and not expected:
                        break
                    if self._queue.empty():
                        continue
                jobs.append(self._queue.get_nowait())
            results = await asyncio.to_thread(self._run_jobs, jobs)
            for job, result in zip(jobs, results):
                if job.future.done():
                    continue
                if isinstance(result, BaseException):
                    job.future.set_exception(result)
                else:
                    job.future.set_result(result)

    def _run_jobs(self, jobs: list[Job]) -> list[list[Choice] | BaseException]:
        """Run drained jobs, batching those with equal sampling params and no seed into one ``generate``."""
        results: dict[int, list[Choice] | BaseException] = {}
        start = time.perf_counter()
        for batch in _batches(jobs):
            self.batches += 1
            try:
                for job, choices in zip(batch, self.generate_batch(batch)):
                    results[id(job)] = choices
            except Exception as exc:  # delivered to the waiting requests, the worker lives on
                if len(batch) > 1:  # isolate the bad request: the others still get answers
                    for job in batch:
                        results[id(job)] = self._run_jobs([job])[0]
                else:
                    results[id(batch[0])] = exc
        self.generate_s += time.perf_counter() - start
        return [results[id(job)] for job in jobs]

    @torch.no_grad()
    def generate_batch(self, jobs: Sequence[Job]) -> list[list[Choice]]:
        """Sample ``n`` completions for each job's prompt in one left-padded batch (blocking).

        The jobs share sampling params; rows come back job by job, ``n`` each.
        """
        sampling = jobs[0].sampling
        width = max(len(job.prompt_ids) for job in jobs)

        def left_pad(values: list[int], fill: int) -> list[int]:
            return [fill] * (width - len(values)) + list(values)

        ids = torch.tensor([left_pad(j.prompt_ids, self.pad_token_id) for j in jobs], device=self.device)
        mask = torch.tensor([left_pad([1] * len(j.prompt_ids), 0) for j in jobs], device=self.device)
        types = torch.tensor([left_pad(j.mm_token_type_ids, 0) for j in jobs], device=self.device)
        one_token = sampling.max_tokens == 1  # n draws from one prefill, not n prefills
        kwargs, images = self._image_inputs(jobs, 1)
        if kwargs and sampling.n > 1 and not one_token:  # one prefill per prompt, KV cache repeated n times
            return self._generate_expanded(jobs, ids, mask, types, kwargs, images, sampling)
        expand = sampling.n if not (one_token or kwargs) else 1  # text-only prompts: generate expands them
        stops = sorted(set(self.stop_token_ids) | set(sampling.stop_token_ids))
        sampler = RecordingSampler(self.image_token_ids, sampling.temperature, sampling.top_p)
        with self._model_lock, images:
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed)
            if one_token and kwargs:
                # One forward, no ``generate``: its setup cost 11 ms a call against a 7 ms forward of
                # one prompt (1 thread). Image prompts only: their mRoPE positions come from
                # get_rope_index with the attention mask, as in generate; text-only left-padded
                # prompts would need generate's own text positions.
                logits = self.model(input_ids=ids, attention_mask=mask, **self._positions(mask, types), **kwargs,
                                    use_cache=False, logits_to_keep=1).logits[:, -1]
                sampler(ids, logits)
            else:
                out = self.model.generate(
                    input_ids=ids, attention_mask=mask, **self._token_types(types), **kwargs,
                    do_sample=sampling.temperature > 0, logits_processor=LogitsProcessorList([sampler]),
                    max_new_tokens=sampling.max_tokens, eos_token_id=stops, pad_token_id=self.pad_token_id,
                    num_return_sequences=expand, return_dict_in_generate=True,
                )
            if one_token:  # (B, n) -> (B * n, 1): rows job by job, n each, as generate lays them out
                drawn = sampler.draw(sampling.n, greedy=sampling.temperature == 0)
                tokens, token_logp = (t.reshape(-1, 1) for t in drawn)
            else:
                tokens, token_logp = out.sequences[:, width:], sampler.finish(out.sequences)
        rows = [_choice(row.tolist(), lp.tolist(), stops) for row, lp in zip(tokens, token_logp)]
        return [rows[i * sampling.n:(i + 1) * sampling.n] for i in range(len(jobs))]

    def _token_types(self, types: torch.Tensor) -> dict[str, torch.Tensor]:
        """``generate``'s position inputs: ``mm_token_type_ids`` for an mRoPE model; nothing for a model with
        1-D positions (generate counts them from the attention mask)."""
        return {"mm_token_type_ids": types} if self._mrope else {}

    def _positions(self, mask: torch.Tensor, types: torch.Tensor) -> dict[str, torch.Tensor]:
        """A direct forward's position inputs for left-padded rows: as ``generate`` makes them (mRoPE models
        derive theirs from the mask), else 1-D positions counted from each row's first real token."""
        if self._mrope:
            return self._token_types(types)
        return {"position_ids": (mask.long().cumsum(-1) - 1).clamp(min=0)}

    def _generate_expanded(self, jobs: Sequence[Job], ids: torch.Tensor, mask: torch.Tensor, types: torch.Tensor,
                           kwargs: dict[str, torch.Tensor], images: AbstractContextManager,
                           sampling: SamplingParams) -> list[list[Choice]]:
        """``n > 1`` samples of several tokens: prefill each prompt once, draw its ``n`` first tokens,
        repeat the KV cache ``n`` times and let ``generate`` continue from it.

        ``generate(num_return_sequences=n)`` would prefill (and run the vision tower on) every
        prompt ``n`` times. Image prompts only, as the one-token path.
        """
        n, width = sampling.n, ids.shape[1]
        stops = sorted(set(self.stop_token_ids) | set(sampling.stop_token_ids))
        first = RecordingSampler(self.image_token_ids, sampling.temperature, sampling.top_p)
        rest = RecordingSampler(self.image_token_ids, sampling.temperature, sampling.top_p)
        with self._model_lock:
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed)
            with images:
                out = self.model(input_ids=ids, attention_mask=mask, **self._positions(mask, types), **kwargs,
                                 use_cache=True, logits_to_keep=1)
            first(ids, out.logits[:, -1])
            tokens, token_logp = (t.reshape(-1, 1) for t in first.draw(n, greedy=sampling.temperature == 0))  # (B*n, 1)
            cache = out.past_key_values
            repeat_cache(cache, n)
            language = self.model.model
            if getattr(language, "rope_deltas", None) is not None:  # mRoPE models: (B*n, 1) text positions
                language.rope_deltas = language.rope_deltas.repeat_interleave(n, dim=0)
            ids = torch.cat([ids.repeat_interleave(n, dim=0), tokens], dim=1)
            mask = torch.cat([mask.repeat_interleave(n, dim=0), torch.ones_like(tokens)], dim=1)
            types = torch.cat([types.repeat_interleave(n, dim=0), torch.zeros_like(tokens)], dim=1)
            more = self.model.generate(
                input_ids=ids, attention_mask=mask, **self._token_types(types), past_key_values=cache,
                do_sample=sampling.temperature > 0, logits_processor=LogitsProcessorList([rest]),
                max_new_tokens=sampling.max_tokens - 1, eos_token_id=stops, pad_token_id=self.pad_token_id,
                return_dict_in_generate=True,
            )
            tokens = more.sequences[:, width:]
            token_logp = torch.cat([token_logp, rest.finish(more.sequences)], dim=1)
        rows = [_choice(row.tolist(), lp.tolist(), stops) for row, lp in zip(tokens, token_logp)]
        return [rows[i * n:(i + 1) * n] for i in range(len(jobs))]

    def _image_inputs(self, jobs: Sequence[Job], expand: int) -> tuple[dict[str, torch.Tensor], AbstractContextManager]:
        """``generate``'s image kwargs, and the context that runs the vision tower once per unique image.

        Requests of a batch may share images (a GRPO group sent as n=1 requests); when generate
        runs each prompt once (``expand == 1``) each unique image (by sha256 where given, else by
        feature object) goes through the tower once. When generate expands every prompt into
        ``expand`` rows it splits pixel_values per row itself, so every slot is sent.
        """
        features = [f for job in jobs for f in job.features]
        if not features:
            return {}, nullcontext()
        keys = [key for job in jobs for key in (job.image_sha256 or [id(f) for f in job.features])]
        first: dict = {}
        for key, feature in zip(keys, features):
            first.setdefault(key, feature)
        shared = expand == 1 and len(keys) == len(features) and len(first) < len(features)
        unique = list(first.values()) if shared else features
        kwargs = dict(pixel_values=torch.cat([f.pixel_values for f in unique]).to(self.device),
                      image_grid_thw=torch.tensor([f.grid_thw for f in features], device=self.device))
        if not shared:
            return kwargs, nullcontext()
        position = {key: i for i, key in enumerate(first)}
        unique_grids = torch.tensor([f.grid_thw for f in unique], device=self.device)
        index = torch.tensor([position[key] for key in keys])
        return kwargs, vision_once(vision_tower(self.model), unique_grids, index, self.merge_size)

    async def update_weights(self, path: str) -> int:
        def load() -> int:
            with self._model_lock:
                start = time.perf_counter()
                version = load_weights_into(self.model, Path(path))
                self.load_s += time.perf_counter() - start
                return version
        self.weight_version = await asyncio.to_thread(load)
        return self.weight_version

    def load_from(self, source: torch.nn.Module, version: int) -> int:
        """Take ``source``'s weights (the in-process trainer's model) as ``version``, no file; bytes copied.

        Blocking; under the model lock, so no batch samples from half-copied weights.
        """
        with self._model_lock:
            start = time.perf_counter()
            nbytes = copy_weights(source, self.model)
            self.weight_version = version
            self.load_s += time.perf_counter() - start
        return nbytes


def repeat_cache(cache: Cache, repeats: int) -> None:
    """Repeat a prefilled cache ``repeats`` times along the batch (in place), each row next to its copies.

    Linear-attention layers (Qwen3.5's gated delta net) keep conv and recurrent states, which
    transformers' ``batch_repeat_interleave`` does not repeat; those are repeated here.
    """
    for layer in cache.layers:
        if isinstance(layer, LinearAttentionCacheLayerMixin):
            for states in (layer.conv_states, layer.recurrent_states):
                for index, state in states.items():
                    if state is not None:
                        states[index] = state.repeat_interleave(repeats, dim=0)
        if hasattr(layer, "batch_repeat_interleave"):  # attention (also the attention half of a hybrid layer)
            layer.batch_repeat_interleave(repeats)


def _choice(ids: list[int], logprobs: list[float], stops: Sequence[int]) -> Choice:
    """Trim a generated row after its first stop token (rows of a batch are padded after stopping)."""
    for i, token in enumerate(ids):
        if token in stops:
            return Choice(token_ids=ids[: i + 1], logprobs=logprobs[: i + 1], finish_reason="stop")
    return Choice(token_ids=ids, logprobs=logprobs, finish_reason="length")


def _batches(jobs: Sequence[Job]) -> list[list[Job]]:
    """Jobs grouped by identical sampling params; a seeded job runs alone (its seed must mean one prompt)."""
    groups: dict[str, list[Job]] = {}
    alone = []
    for job in jobs:
        if job.sampling.seed is not None:
            alone.append([job])
        else:
            groups.setdefault(job.sampling.model_dump_json(), []).append(job)
    return list(groups.values()) + alone
