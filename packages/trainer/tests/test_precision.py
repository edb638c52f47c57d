"""train.dtype, gradient checkpointing, freeze_vision and the FSDP2 sharding units."""

import dataclasses

import pytest
import torch

from mmref.renderers import ImageStore
from mmref.trainer.forward import vision_tower
from mmref.trainer.inference.engine import TransformersEngine
from mmref.trainer.models import TinySize, build_tiny_model, image_token_ids_of
from mmref.trainer.pack import MicroBatch, pack
from mmref.trainer.precision import prepare_model, resolve_dtype, shard_units, vision_modules
from mmref.trainer.run_config import TrainConfig
from mmref.trainer.step import PolicyTrainer
from trainer_cases import FAMILIES, PACKING_FAMILIES, make_sample, processor, small_spec


@pytest.fixture
def store(tmp_path):
    return ImageStore(tmp_path / "store")


def samples(store, family="qwen2-vl", count=3):
    return [make_sample(store, family, 3 + i, [(i, (64, 48))], 4, sampled=3, advantage=(-1.0) ** i, logprob=-11.0)
            for i in range(count)]


def trainer_for(store, config: TrainConfig, family="qwen2-vl", seed=0) -> PolicyTrainer:
    model = prepare_model(build_tiny_model(family, seed=seed), config, "cpu")
    return PolicyTrainer(model, store=store, spec=small_spec(family), processor=processor(family), config=config,
                         image_token_ids=image_token_ids_of(model))


def test_auto_dtype_is_float32_on_cpu_bfloat16_on_cuda_and_names_are_explicit():
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("auto", "cuda") == torch.bfloat16
    assert resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    assert resolve_dtype("float32", "cuda") == torch.float32
    with pytest.raises(ValueError, match="train.dtype 'float16' is not one of auto, float32, bfloat16"):
        resolve_dtype("float16", "cpu")


def test_bfloat16_step_is_finite_and_keeps_weights_in_bfloat16(store):
    trainer = trainer_for(store, TrainConfig(lr=1e-2, dtype="bfloat16"))
    assert {p.dtype for p in trainer.model.parameters()} == {torch.bfloat16}
    before = trainer.model.lm_head.weight.detach().clone()
    metrics = trainer.step([MicroBatch(0, pack(samples(store), 4096))])
    assert all(torch.isfinite(torch.tensor(float(v))) for v in dataclasses.astuple(metrics))
    assert metrics.grad_norm > 0 and not torch.equal(trainer.model.lm_head.weight, before)
    assert {p.dtype for p in trainer.model.parameters()} == {torch.bfloat16}


def test_engine_serves_in_the_train_dtype():
    model = build_tiny_model("qwen2-vl")
    engine = TransformersEngine(model, image_token_ids_of(model), [151645], pad_token_id=151645,
                                dtype=resolve_dtype("bfloat16", "cpu"))
    assert {p.dtype for p in engine.model.parameters()} == {torch.bfloat16}


def test_freeze_vision_leaves_tower_and_merger_unchanged_and_out_of_the_optimizer(store):
    trainer = trainer_for(store, TrainConfig(lr=1e-2, freeze_vision=True))
    visual = vision_modules(trainer.model)
    before = {name: p.detach().clone() for name, p in visual.named_parameters()}
    assert any("merger" in name for name in before)
    language = trainer.model.model.language_model.layers[0].mlp.up_proj.weight
    language_before = language.detach().clone()
    trainer.step([MicroBatch(0, pack(samples(store), 4096))])
    for name, param in visual.named_parameters():
        assert torch.equal(param, before[name]), name
        assert param.grad is None, name
    assert not torch.equal(language, language_before)  # the rest still trains
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimized.isdisjoint(id(p) for p in visual.parameters())
    assert len(optimized) == sum(1 for p in trainer.model.parameters()) - len(before)


@pytest.mark.parametrize("family", PACKING_FAMILIES)
def test_gradient_checkpointing_gives_the_same_packed_loss_and_gradients(family, store):
    """Three samples packed in one row: recomputation must not change the packed forward."""
    rows = pack(samples(store, family), 4096)
    assert len(rows) == 1 and len(rows[0].sample_lengths) == 3
    plain = trainer_for(store, TrainConfig(lr=1e-2), family)
    checkpointed = trainer_for(store, TrainConfig(lr=1e-2, gradient_checkpointing=True), family)
    assert checkpointed.model.model.language_model.gradient_checkpointing
    a = plain.step([MicroBatch(0, rows)])
    b = checkpointed.step([MicroBatch(0, rows)])
    assert b.loss == pytest.approx(a.loss, abs=1e-5) and b.grad_norm == pytest.approx(a.grad_norm, rel=1e-5)
    grads = dict(checkpointed.model.named_parameters())
    for name, param in plain.model.named_parameters():
        torch.testing.assert_close(grads[name].grad, param.grad, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("family", FAMILIES)
def test_shard_units_are_every_decoder_layer_and_vision_block(family):
    size = TinySize(num_layers=3, vision_depth=2)
    model = build_tiny_model(family, size=size)
    units = shard_units(model)
    layers = list(model.model.language_model.layers)
    tower = vision_tower(model)
    blocks = list(getattr(tower, "blocks", None) or tower.layers)  # Qwen-VL blocks, Kimi MoonViT layers
    assert len(layers) == 3 and len(blocks) == 2
    assert {id(u) for u in units} == {id(m) for m in layers + blocks}
