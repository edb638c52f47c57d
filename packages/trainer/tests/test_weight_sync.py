"""Weight sync: shard-by-shard checkpoints in the train dtype, and the in-process handover to the engine."""

import json

import pytest
import torch

from mmref.renderers.refs import ImageSlot
from mmref.trainer.checkpoint import INDEX, copy_weights, load_weights_into, named_tensors, save_checkpoint
from mmref.trainer.models import build_tiny_model
from mmref.trainer.pack import MicroBatch, pack
from mmref.trainer.precision import prepare_model
from mmref.trainer.run_config import TrainConfig
from mmref.trainer.samples import TrainingSample
from mmref.trainer.step import PolicyTrainer
from inference_cases import PAD, app_and_store, generate, prompt_with_images, served, stored_refs, teacher_forced

# Measured on CPU (torch 2.13, tiny qwen2-vl, 5 sampled tokens after a 1-image prompt, 3 runs):
# the bfloat16 engine (KV-cached generate) and the bfloat16 trainer (one forward) differ by
# 0.0 nats per token, as do float32 ones: same kernels, one unpadded prompt, logprobs in float32
# from the logits. The bound is one bfloat16 ulp at |logprob| ~ 0.5, so a handover that rounds
# or misses a tensor fails.
BF16_LOGPROB_BOUND = 2e-3


def test_sharded_checkpoint_equals_the_full_state_dict_in_the_train_dtype(tmp_path):
    model = build_tiny_model("qwen2-vl")
    path = save_checkpoint(model, tmp_path / "latest", "qwen2-vl", 3, dtype=torch.bfloat16, max_shard_bytes=64_000)
    weight_map = json.loads((path / INDEX).read_text())["weight_map"]
    files = sorted(set(weight_map.values()))
    assert len(files) > 2 and files[-1] == f"model-{len(files):05d}-of-{len(files):05d}.safetensors"
    expected = {name: t for name, t in model.state_dict().items() if name != "lm_head.weight"}  # tied: embed's name
    assert set(weight_map) == set(expected)
    fresh = build_tiny_model("qwen2-vl", seed=7)
    assert load_weights_into(fresh, path) == 3
    for name, tensor in fresh.state_dict().items():
        torch.testing.assert_close(tensor, model.state_dict()[name].to(torch.bfloat16).float(), rtol=0, atol=0,
                                   msg=lambda m, n=name: f"{n}: {m}")
    assert not list(tmp_path.glob("*.tmp"))


def test_non_writing_ranks_write_nothing(tmp_path):
    assert save_checkpoint(build_tiny_model("qwen2-vl"), tmp_path / "latest", "qwen2-vl", 1, write=False) is None
    assert not list(tmp_path.iterdir())


def test_copy_weights_refuses_a_different_architecture():
    with pytest.raises(ValueError, match="weight handover: .* in the engine.s model but .* in the trainer.s; they must be the same architecture"):
        copy_weights(build_tiny_model("qwen2-vl"), build_tiny_model("qwen3-vl"))


def _trained(served_model, store, ids, image_slots, dtype):
    """A trainer (``dtype``) one step away from the served model's weights."""
    n = len(ids) + 3
    sample = TrainingSample("qwen2-vl", ids + [11, 12, 13], [i >= len(ids) for i in range(n)],
                            [1.0 if i >= len(ids) else 0.0 for i in range(n)],
                            [-11.0 if i >= len(ids) else 0.0 for i in range(n)], image_slots, PAD)
    config = TrainConfig(lr=1e-2, dtype=dtype)
    model = prepare_model(build_tiny_model("qwen2-vl"), config, "cpu")
    trainer = PolicyTrainer(model, store=store, spec=served_model.spec, processor=served_model.processor,
                            config=config, image_token_ids=served_model.engine.image_token_ids)
    trainer.step([MicroBatch(0, pack([sample], 10**6))])
    return trainer.model.eval()


@pytest.mark.parametrize("dtype, bound", [("float32", 1e-4), ("bfloat16", BF16_LOGPROB_BOUND)])
def test_handover_gives_the_engine_the_trainers_logprobs(dtype, bound):
    served_model = served("qwen2-vl")
    served_model.engine.model.to(getattr(torch, dtype))
    app, store = app_and_store(served_model)
    refs = stored_refs(served_model, store, 1)
    ids, slots = prompt_with_images(refs)
    image_slots = [ImageSlot(ref=refs[0], offset=slots[0]["offset"], length=slots[0]["length"])]
    model = _trained(served_model, store, ids, image_slots, dtype)
    before = generate(app, ids, slots, max_tokens=5, seed=2).json()["choices"][0]
    nbytes = served_model.engine.load_from(model, version=1)
    assert nbytes == sum(t.numel() * t.element_size() for _, t in named_tensors(model))
    response = generate(app, ids, slots, max_tokens=5, seed=2).json()
    assert response["weight_version"] == 1 and response["choices"][0]["logprobs"] != before["logprobs"]
    choice = response["choices"][0]
    served_model.engine.model = model  # teacher_forced scores with the engine's model: now the trainer's own
    trainer = teacher_forced(served_model, store, ids, slots, choice["token_ids"])
    mismatch = (trainer - torch.tensor(choice["logprobs"])).abs().max().item()
    assert mismatch <= bound, f"{dtype}: engine vs trainer logprobs differ by {mismatch}"
