"""The vision tower run once per unique image gives the logits and gradients of running it on every slot."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mmref.renderers import ImageStore
from mmref.trainer.forward import rope_index_of, vision_tower
from mmref.trainer.materialize import Materializer
from mmref.trainer.pack import pack, row_position_ids
from mmref.trainer.vision_once import vision_once
from trainer_cases import PACKING_FAMILIES, QWEN_VL, make_sample, processor, small_spec, tiny


def logits_and_vision_grad(model, batch, position_ids, once: bool):
    model.zero_grad()
    pixels = batch.pixel_values() if once else batch.slot_pixel_values()
    with vision_once(vision_tower(model), batch.unique_grid_thw, batch.image_index, 2) if once else torch.enable_grad():
        logits = model(input_ids=batch.input_ids, position_ids=position_ids, pixel_values=pixels,
                       image_grid_thw=batch.image_grid_thw, mm_token_type_ids=batch.mm_token_type_ids,
                       use_cache=False).logits
    logits.square().mean().backward()
    return logits.detach(), vision_tower(model).patch_embed.proj.weight.grad.clone()


# Few distinct images, so slots repeat them (as a GRPO group does).
images = st.lists(st.tuples(st.integers(0, 2), st.sampled_from([(64, 48), (40, 40), (33, 80)])), min_size=1, max_size=3)


@pytest.mark.parametrize("family", [f for f in PACKING_FAMILIES if f in QWEN_VL])
@settings(max_examples=4, deadline=None)
@given(specs=st.lists(st.tuples(st.integers(1, 6), images), min_size=2, max_size=4))
def test_unique_image_forward_equals_per_slot_forward(tmp_path_factory, family, specs):
    assert_vision_once_equals_per_slot(ImageStore(tmp_path_factory.mktemp("store")), family, specs)


@pytest.mark.parametrize("family", [f for f in PACKING_FAMILIES if f not in QWEN_VL])
def test_unique_image_forward_equals_per_slot_forward_for_newer_families(tmp_path, family):
    """Kimi K2.5 (its tower's output is merged before its projector): one fixed case, to keep CPU time low."""
    specs = [(2, [(0, (64, 48)), (1, (33, 80))]), (4, [(0, (64, 48))]), (1, [(1, (33, 80)), (0, (64, 48))])]
    assert_vision_once_equals_per_slot(ImageStore(tmp_path / "store"), family, specs)


def assert_vision_once_equals_per_slot(store, family, specs):
    model = tiny(family)
    (row,) = pack([make_sample(store, family, pre, imgs, 2) for pre, imgs in specs], 10**6)
    (batch,) = Materializer(store, small_spec(family), processor(family)).materialize([row])
    position_ids = row_position_ids(rope_index_of(model), row)
    seen = []
    hook = vision_tower(model).register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
    once_logits, once_grad = logits_and_vision_grad(model, batch, position_ids, once=True)
    hook.remove()
    slot_logits, slot_grad = logits_and_vision_grad(model, batch, position_ids, once=False)
    assert seen == [batch.pixel_values().shape[0]]  # the tower saw each unique image once
    assert batch.pixel_values().shape[0] == int(batch.unique_grid_thw.prod(-1).sum())
    assert (once_logits - slot_logits).abs().max().item() <= 1e-5
    assert torch.allclose(once_grad, slot_grad, atol=1e-6, rtol=1e-4)
