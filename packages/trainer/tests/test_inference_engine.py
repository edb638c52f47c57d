"""The transformers engine: logprob parity with the trainer, the image-token mask, weight updates."""

import asyncio

import pytest
import torch

from mmref.trainer.checkpoint import save_checkpoint
from mmref.trainer.forward import forward_row, vision_tower
from mmref.trainer.materialize import Materializer
from mmref.trainer.pack import pack
from mmref.trainer.samples import TrainingSample
from mmref.renderers.refs import parse_ref
from mmref.trainer.inference.api import SamplingParams
from mmref.trainer.models import TINY_FAMILIES
from inference_cases import PAD, app_and_store, client, generate, prompt_with_images, served, stored_refs, teacher_forced


QWEN_VL = ["qwen2-vl", "qwen2.5-vl", "qwen3-vl"]
# Families only newer transformers have (hybrid Qwen3.5, Kimi K2.5 with 1-D RoPE): each is checked once per
# engine path, to keep CPU time low.
NEWER = [f for f in ("qwen3.5", "kimi-k2.5") if f in TINY_FAMILIES]
TEMPERATURES = [(0.5, 1.0), (0.7, 1.0), (1.0, 1.0), (1.5, 1.0), (0.7, 0.8)]


@pytest.mark.parametrize("family, temperature, top_p",
                         [(f, t, p) for f in QWEN_VL for t, p in TEMPERATURES] + [(f, 0.7, 0.8) for f in NEWER])
def test_engine_logprobs_equal_trainer_teacher_forced_forward(family, temperature, top_p):
    """Both sides score under masked_log_softmax(logits / T), untruncated by top-p (mmref.trainer.logprobs)."""
    model = served(family)
    app, store = app_and_store(model)
    ids, slots = prompt_with_images(stored_refs(model, store, 2))
    response = generate(app, ids, slots, max_tokens=6, n=2, seed=3, temperature=temperature, top_p=top_p)
    assert response.status_code == 200, response.text
    for choice in response.json()["choices"]:
        trainer = teacher_forced(model, store, ids, slots, choice["token_ids"], temperature)
        assert (trainer - torch.tensor(choice["logprobs"])).abs().max().item() <= 1e-4
        if temperature != 1.0:  # the untempered score is far off: the check above can fail
            untempered = teacher_forced(model, store, ids, slots, choice["token_ids"])
            assert (untempered - torch.tensor(choice["logprobs"])).abs().max().item() > 1e-3


def test_high_temperature_never_samples_image_tokens():
    model = served("qwen2-vl")
    app, store = app_and_store(model)
    ids, slots = prompt_with_images(stored_refs(model, store, 1))
    # Without the mask a random 152k-vocab model would hit one of 5 image tokens in ~1/30k draws;
    # bias the logits towards them so the mask is what keeps them out.
    lm_head = model.engine.model.lm_head
    banned = sorted(model.engine.image_token_ids)
    with torch.no_grad():
        saved = lm_head.weight[banned].clone()
        lm_head.weight[banned] *= 50
    try:
        response = generate(app, ids, slots, max_tokens=32, n=16, temperature=5.0, seed=0)
    finally:
        with torch.no_grad():
            lm_head.weight[banned] = saved
    sampled = {t for c in response.json()["choices"] for t in c["token_ids"]}
    assert len(sampled) > 50 and not sampled & set(banned)
    assert all(all(lp > float("-inf") for lp in c["logprobs"]) for c in response.json()["choices"])


def test_weight_update_changes_logprobs_and_version(tmp_path):
    model = served("qwen2-vl")
    app, store = app_and_store(model)
    ids, slots = prompt_with_images(stored_refs(model, store, 1))
    before = generate(app, ids, slots, max_tokens=4, seed=5, temperature=0).json()
    trained = served("qwen2-vl").engine.model
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = save_checkpoint(trained, tmp_path / "step-1", "qwen2-vl", weight_version=1)

    async def update():
        async with client(app) as c:
            return await c.post("/update_weights", json={"path": str(path)})
    assert asyncio.run(update()).json()["weight_version"] == 1
    after = generate(app, ids, slots, max_tokens=4, seed=5, temperature=0).json()
    assert after["weight_version"] == 1 and before["weight_version"] == 0
    assert after["choices"][0]["logprobs"] != before["choices"][0]["logprobs"]


def test_checkpoint_from_a_training_step_reloads_into_the_server_with_the_trainers_logprobs(tmp_path):
    from mmref.renderers.refs import ImageSlot as Slot
    from mmref.trainer.pack import MicroBatch
    from mmref.trainer.run_config import TrainConfig
    from mmref.trainer.step import PolicyTrainer

    model = served("qwen2-vl")
    app, store = app_and_store(model)
    refs = stored_refs(model, store, 1)
    ids, slots = prompt_with_images(refs)
    image_slots = [Slot(ref=refs[0], offset=slots[0]["offset"], length=slots[0]["length"])]
    n = len(ids) + 3
    sample = TrainingSample("qwen2-vl", ids + [11, 12, 13], [i >= len(ids) for i in range(n)],
                            [1.0 if i >= len(ids) else 0.0 for i in range(n)], [-11.0 if i >= len(ids) else 0.0 for i in range(n)],
                            image_slots, PAD)
    trainer = PolicyTrainer(served("qwen2-vl").engine.model, store=store, spec=model.spec, processor=model.processor,
                            config=TrainConfig(lr=1e-2), image_token_ids=model.engine.image_token_ids)
    trainer.step([MicroBatch(0, pack([sample], 10**6))])
    path = save_checkpoint(trainer.model, tmp_path / "step-1", "qwen2-vl", weight_version=1)

    async def update():
        async with client(app) as c:
            return await c.post("/update_weights", json={"path": str(path)})
    assert asyncio.run(update()).status_code == 200
    choice = generate(app, ids, slots, max_tokens=5, seed=2).json()["choices"][0]
    tokens = ids + choice["token_ids"]
    m = len(tokens)
    check = TrainingSample("qwen2-vl", tokens, [i >= len(ids) for i in range(m)], [0.0] * m, [0.0] * m, image_slots, PAD)
    row = Materializer(store, model.spec, model.processor).materialize(pack([check], 10**6))[0]
    trainer.model.eval()
    with torch.no_grad():
        out = forward_row(trainer.model, row, trainer.rope_index, model.engine.image_token_ids, 2)
    assert (out.logprobs[len(ids) - 1:] - torch.tensor(choice["logprobs"])).abs().max().item() <= 1e-4


@pytest.mark.parametrize("family, image_counts, max_tokens, n", [
    ("qwen2-vl", (1, 2, 3), 5, 2),       # generate: different lengths and image counts, left-padded
    ("qwen2-vl", (1, 0, 2, 3), 1, 3),    # one-token groups, a text-only prompt among them
    ("qwen3-vl", (1, 0, 2, 3), 1, 3),
    *[(f, (1, 0, 2), 3, 2) for f in NEWER],  # left-padded prefill, then the repeated (hybrid) cache
])
def test_concurrent_requests_run_as_one_batch_each_with_its_own_prompts_logprobs(family, image_counts, max_tokens, n):
    """Concurrent requests of different prompts batch together; every row's logprobs equal a teacher-forced
    forward of its own prompt alone, in request order."""
    model = served(family)
    app, store = app_and_store(model)
    refs = stored_refs(model, store, max(image_counts))
    prompts = [prompt_with_images(refs[:k]) for k in image_counts]
    calls = []
    real = model.engine.generate_batch
    model.engine.generate_batch = lambda jobs: calls.append(len(jobs)) or real(jobs)

    async def many():
        async with client(app) as c:
            return await asyncio.gather(*(c.post("/inference/v1/generate", json={
                "token_ids": ids, "images": slots, "sampling": {"max_tokens": max_tokens, "n": n}})
                for ids, slots in prompts))
    responses = asyncio.run(many())
    assert all(r.status_code == 200 for r in responses) and max(calls) > 1
    for (ids, slots), response in zip(prompts, responses):
        choices = response.json()["choices"]
        assert len(choices) == n
        for choice in choices:
            assert len(choice["token_ids"]) == len(choice["logprobs"])
            alone = teacher_forced(model, store, ids, slots, choice["token_ids"])
            assert (alone - torch.tensor(choice["logprobs"])).abs().max().item() <= 1e-4


@pytest.mark.parametrize("family", QWEN_VL)
def test_batched_requests_encode_each_shared_image_once_with_unchanged_logprobs(family):
    model = served(family)
    app, store = app_and_store(model)
    refs = stored_refs(model, store, 3)
    prompts = [prompt_with_images(refs[:k]) for k in (1, 2, 3, 3)]  # 9 slots, 3 distinct images
    real = model.engine.generate_batch
    model.engine.generate_batch = lambda jobs: batches.append(jobs) or real(jobs)
    batches, tower_images = [], []
    visual = model.engine.model.model.visual
    hook = visual.register_forward_pre_hook(lambda m, args: tower_images.append(args[0].shape[0]))  # pixel rows

    async def many():
        async with client(app) as c:
            return await asyncio.gather(*(c.post("/inference/v1/generate", json={
                "token_ids": ids, "images": slots, "sampling": {"max_tokens": 4}}) for ids, slots in prompts))
    responses = asyncio.run(many())
    hook.remove()
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    # One tower call per batch, on the pixels of that batch's distinct images; some batch shared one.
    distinct = [{sha: f.pixel_values.shape[0] for job in jobs for sha, f in zip(job.image_sha256, job.features)}
                for jobs in batches]
    assert tower_images == [sum(rows.values()) for rows in distinct] and sum(map(len, batches)) == 4
    assert any(sum(len(job.features) for job in jobs) > len(rows) for jobs, rows in zip(batches, distinct))
    for (ids, slots), response in zip(prompts, responses):
        choice = response.json()["choices"][0]
        alone = teacher_forced(model, store, ids, slots, choice["token_ids"])
        assert (alone - torch.tensor(choice["logprobs"])).abs().max().item() <= 1e-4


@pytest.mark.parametrize("family", QWEN_VL)
@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 0.8)])
def test_one_token_group_request_prefills_once_and_each_draw_has_the_trainers_logprob(family, temperature, top_p):
    """n=8, max_tokens=1 (a GRPO group as one request): one prompt row through the model, 8 draws."""
    model = served(family)
    app, store = app_and_store(model)
    ids, slots = prompt_with_images(stored_refs(model, store, 2))
    text_rows, tower_rows = [], []
    language = model.engine.model.model.language_model
    hooks = [language.register_forward_pre_hook(lambda m, a, k: text_rows.append(k["inputs_embeds"].shape[0]),
                                                with_kwargs=True),
             model.engine.model.model.visual.register_forward_pre_hook(lambda m, a: tower_rows.append(a[0].shape[0]))]
    try:
        response = generate(app, ids, slots, max_tokens=1, n=8, seed=1, temperature=temperature, top_p=top_p)
    finally:
        for hook in hooks:
            hook.remove()
    assert response.status_code == 200, response.text
    choices = response.json()["choices"]
    assert len(choices) == 8 and all(len(c["token_ids"]) == len(c["logprobs"]) == 1 for c in choices)
    assert text_rows == [1]  # one prefill of one row: the 8 samples share it
    assert tower_rows == [sum(parse_ref(s["ref"]).num_tokens * 4 for s in slots)]  # each image once (merge 2x2)
    assert len({c["token_ids"][0] for c in choices}) > 1  # 8 independent draws from a random model
    for choice in choices:
        trainer = teacher_forced(model, store, ids, slots, choice["token_ids"], temperature)
        assert (trainer - torch.tensor(choice["logprobs"])).abs().max().item() <= 1e-4
        assert choice["finish_reason"] == ("stop" if choice["token_ids"][0] in (151645, 151643) else "length")


def test_greedy_one_token_group_repeats_the_argmax():
    model = served("qwen2-vl")
    app, store = app_and_store(model)
    ids, slots = prompt_with_images(stored_refs(model, store, 1))
    choices = generate(app, ids, slots, max_tokens=1, n=4, temperature=0).json()["choices"]
    longer = generate(app, ids, slots, max_tokens=2, n=1, temperature=0).json()["choices"][0]
    assert [c["token_ids"] for c in choices] == [longer["token_ids"][:1]] * 4
    assert all(abs(c["logprobs"][0] - longer["logprobs"][0]) <= 1e-5 for c in choices)


@pytest.mark.parametrize("family", ["qwen2-vl", "qwen3-vl", *NEWER])
def test_multi_token_group_request_prefills_once_then_decodes_every_sample_with_the_trainers_logprobs(family):
    """n=4, max_tokens=4: the prompt is prefilled as one row, the KV cache is repeated, decode runs 4 rows."""
    model = served(family)
    app, store = app_and_store(model)
    ids, slots = prompt_with_images(stored_refs(model, store, 2))
    text_rows, tower_calls = [], []
    language = model.engine.model.model.language_model
    hooks = [language.register_forward_pre_hook(lambda m, a, k: text_rows.append(tuple(k["inputs_embeds"].shape[:2])),
                                                with_kwargs=True),
             vision_tower(model.engine.model).register_forward_pre_hook(lambda m, a: tower_calls.append(1))]
    try:
        response = generate(app, ids, slots, max_tokens=4, n=4, seed=7, temperature=1.0, stop_token_ids=[])
    finally:
        for hook in hooks:
            hook.remove()
    assert response.status_code == 200, response.text
    choices = response.json()["choices"]
    assert len(choices) == 4 and tower_calls == [1]
    assert text_rows[0] == (1, len(ids)) and all(rows == (4, 1) for rows in text_rows[1:])  # prefill once, then decode
    assert len({tuple(c["token_ids"]) for c in choices}) > 1
    for choice in choices:
        assert len(choice["token_ids"]) == len(choice["logprobs"]) >= 1
        trainer = teacher_forced(model, store, ids, slots, choice["token_ids"])
        assert (trainer - torch.tensor(choice["logprobs"])).abs().max().item() <= 1e-4


def test_a_batch_waits_for_requests_still_being_handled_and_a_bad_one_does_not_hold_it():
    """Requests announced by the server (``arriving``) join the open batch though they reach the queue
    far apart; one that fails before ``generate`` leaves nothing waiting."""
    model = served("qwen2-vl")
    engine = model.engine
    sizes = []
    real = engine.generate_batch
    engine.generate_batch = lambda jobs: sizes.append(len(jobs)) or real(jobs)

    async def request(delay: float, fail: bool = False):
        with engine.arriving():
            await asyncio.sleep(delay)  # validation and feature loading: arrivals 8 ms apart, batch_wait_s is 5
            if fail:
                raise ValueError("bad request")
            return await engine.generate([1, 2, 3], [], [0, 0, 0], SamplingParams(max_tokens=1))

    async def burst():
        return await asyncio.gather(*(request(0.008 * i) for i in range(6)), request(0.002, fail=True),
                                    return_exceptions=True)
    results = asyncio.run(burst())
    assert sizes == [6] and isinstance(results[-1], ValueError) and engine._arriving == 0
