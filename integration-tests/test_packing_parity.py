"""A packed row's logits equal each of its samples run alone (fp32, max abs diff <= 1e-5); a family
that cannot pack samples exactly gets one per row and refuses a row of several."""


import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mmref.renderers import ImageStore
from mmref.trainer.errors import PackingError
from mmref.trainer.forward import forward_row, rope_index_of
from mmref.trainer.materialize import Materializer
from mmref.trainer.pack import _concat, pack
from mmref.trainer.models import image_token_ids_of
from trainer_cases import FAMILIES, PACKING_FAMILIES, QWEN_VL, make_sample, processor, small_spec, tiny


def row_logits(model, family, store, row):
    materialized = Materializer(store, small_spec(family), processor(family)).materialize([row])[0]
    captured = {}

    def keep(module, inputs, output):  # returns None, so the model's output is left untouched
        captured["logits"] = output[0].detach()

    hook = model.lm_head.register_forward_hook(keep)
    try:
        with torch.no_grad():
            forward_row(model, materialized, rope_index_of(model), image_token_ids_of(model), 2, positions="all")
    finally:
        hook.remove()
    return captured["logits"]


image_lists = st.lists(st.tuples(st.integers(0, 50), st.sampled_from([(64, 48), (40, 40), (90, 60), (33, 80)])),
                       max_size=3)


@pytest.mark.parametrize("family", [f for f in PACKING_FAMILIES if f in QWEN_VL])
@settings(max_examples=6, deadline=None)
@given(specs=st.lists(st.tuples(st.integers(1, 12), image_lists, st.integers(0, 10)), min_size=2, max_size=4))
def test_packed_row_logits_equal_unpacked(tmp_path_factory, family, specs):
    assert_packed_row_equals_samples_alone(ImageStore(tmp_path_factory.mktemp("store")), family, specs)


@pytest.mark.parametrize("family", [f for f in PACKING_FAMILIES if f not in QWEN_VL])
def test_packed_row_logits_equal_unpacked_for_newer_families(tmp_path, family):
    """Kimi K2.5 (1-D RoPE): one fixed case of the property above, to keep its CPU time low."""
    specs = [(3, [(1, (64, 48)), (2, (33, 80))], 2), (7, [], 4), (1, [(1, (64, 48))], 0)]
    assert_packed_row_equals_samples_alone(ImageStore(tmp_path / "store"), family, specs)


def assert_packed_row_equals_samples_alone(store, family, specs):
    model = tiny(family)
    samples = [make_sample(store, family, pre, images, post) for pre, images, post in specs]
    (row,) = pack(samples, 10**6)
    packed = row_logits(model, family, store, row)
    by_tokens = {tuple(s.token_ids): s for s in samples}
    start = 0
    for length in row.sample_lengths:
        alone = by_tokens[tuple(row.token_ids[start:start + length])]
        expected = row_logits(model, family, store, pack([alone], 10**6)[0])  # (length - 1, V): scored positions
        got = packed[start:start + length - 1]
        assert got.shape == expected.shape
        assert got.numel() == 0 or (got - expected).abs().max().item() <= 1e-5
        start += length


@pytest.mark.parametrize("family", sorted(set(FAMILIES) - set(PACKING_FAMILIES)))
def test_sequential_family_gets_one_sample_per_row_and_refuses_a_packed_one(tmp_path, family):
    store = ImageStore(tmp_path / "store")
    samples = [make_sample(store, family, 3, [(i, (64, 48))], 2) for i in range(3)]
    rows = pack(samples, 10**6)
    assert [len(r.sample_lengths) for r in rows] == [1, 1, 1]
    packed = _concat([(sample, []) for sample in samples])  # what pack() would make were it allowed
    with pytest.raises(PackingError, match=f"3 samples of family '{family}' in one row"):
        row_logits(tiny(family), family, store, packed)
