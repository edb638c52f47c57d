"""Processed mode: raw-mode token ids unchanged, pixels equal the processor's, grids checked."""

import numpy as np
from PIL import Image

from mmref.renderers import ImageStore, layout_spec, make_ref
from mmref.renderers.processed import build_image_processor, render_processed
from mmref.renderers.render import create_renderer
from mmref.renderers.tokenizer import qwen2_tokenizer


def test_processed_mode_keeps_raw_tokens_and_matches_processor(tmp_path):
    store, spec = ImageStore(tmp_path), layout_spec("qwen2.5-vl", max_pixels=256 * 28 * 28)
    images = [Image.new("RGB", (90 + 30 * i, 70), (10 * i, 200, 30)) for i in range(3)]
    parts = [{"type": "image_url", "image_url": {"url": make_ref(spec, store.put_image(im)).encode()}} for im in images]
    messages = [{"role": "user", "content": parts[:2] + [{"type": "text", "text": "and"}]},
                {"role": "assistant", "content": "ok"}, {"role": "user", "content": parts[2:]}]
    renderer = create_renderer(qwen2_tokenizer(), "qwen2.5-vl", spec=spec)
    processed = render_processed(renderer, messages, store)
    assert processed.tokens.token_ids == renderer.render(messages).token_ids
    expected = build_image_processor(spec)(images=images, return_tensors="pt")
    assert np.array_equal(processed.pixel_values.numpy(), expected["pixel_values"].numpy())
    assert processed.image_grid_thw.tolist() == [list(s.ref.grid_thw) for s in processed.tokens.images]
    assert processed.pixel_values.shape[0] == sum(s.length * 4 for s in processed.tokens.images)
