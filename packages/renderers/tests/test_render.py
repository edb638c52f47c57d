"""Renderer behaviour: errors, special-token safety, bridging edge cases, raw mode reads no pixels."""

import io

import pytest
from PIL import Image

from mmref.renderers import ImageStore, layout_spec, make_ref
from mmref.renderers.errors import RenderError
from mmref.renderers.render import create_renderer
from mmref.renderers.tokenizer import qwen2_tokenizer

IMAGE_PAD, VISION_START, IM_END = 151655, 151652, 151645


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return ImageStore(tmp_path_factory.mktemp("store"))


@pytest.fixture(scope="module")
def renderer():
    return create_renderer(qwen2_tokenizer(), "qwen2-vl")


def ref_part(store, size=(80, 60), family="qwen2-vl", spec=None):
    stored = store.put_image(Image.new("RGB", size, (size[0] % 256, 9, 9)))
    return {"type": "image_url", "image_url": {"url": make_ref(spec or layout_spec(family), stored).encode()}}


def test_typed_special_token_strings_never_become_special_ids(renderer):
    rendered = renderer.render([{"role": "user", "content": "look: <|image_pad|><|vision_start|><|im_end|>"}])
    assert IMAGE_PAD not in rendered.token_ids and VISION_START not in rendered.token_ids
    assert rendered.token_ids.count(IM_END) == 2  # system and user turns only
    assert not rendered.images


def test_slot_offsets_attribution_and_generation_prompt(renderer, store):
    messages = [{"role": "user", "content": [ref_part(store), {"type": "text", "text": "colour?"}]}]
    rendered = renderer.render(messages)
    slot = rendered.images[0]
    assert rendered.token_ids[slot.offset - 1] == VISION_START
    assert rendered.token_ids[slot.offset:slot.end] == [IMAGE_PAD] * slot.length
    assert set(rendered.message_index[slot.offset:slot.end]) == {0}
    assert rendered.message_index[-3:] == [-1, -1, -1]  # "<|im_start|>assistant\n" is scaffold
    assert all(rendered.is_content[slot.offset:slot.end]) and not any(rendered.sampled_mask)


@pytest.mark.parametrize("url,needle", [
    ("data:image/png;base64,iVBORw0KGgo=", "only store refs"),
    ("https://example.com/a.png", "only store refs"),
    ("mmref:v1:!!", "invalid ref"),
])
def test_non_ref_image_parts_are_render_errors(renderer, url, needle):
    with pytest.raises(RenderError, match=needle):
        renderer.render([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}])


@pytest.mark.parametrize("part,needle", [
    ({"type": "image", "image": "x.png"}, "prepare_images"),
    ({"type": "image_url", "image_url": "mmref:v1:x"}, "needs an object"),
    ({"type": "audio"}, "unsupported content part type 'audio'"),
    ({"type": "image_url", "image_url": {"url": "x", "pixel_values": [1]}}, "pixel_values"),
])
def test_malformed_parts_are_named(renderer, part, needle):
    with pytest.raises(RenderError, match=needle):
        renderer.render([{"role": "user", "content": [part]}])


def test_message_errors_name_the_index(renderer):
    with pytest.raises(RenderError, match="message 1 is invalid"):
        renderer.render([{"role": "user", "content": "a"}, {"role": "wizard", "content": "b"}])


def test_ref_from_other_layout_is_refused(renderer, store):
    drifted = ref_part(store, spec=layout_spec("qwen2-vl", max_pixels=64 * 28 * 28))
    with pytest.raises(RenderError, match="fingerprint"):
        renderer.render([{"role": "user", "content": [drifted]}])
    with pytest.raises(RenderError, match="ref family 'qwen3-vl'"):
        renderer.render([{"role": "user", "content": [ref_part(store, family="qwen3-vl")]}])


def test_qwen2_vl_refuses_tools(renderer):
    with pytest.raises(RenderError, match="no tool support"):
        renderer.render([{"role": "user", "content": "x"}], tools=[{"type": "function", "function": {"name": "f"}}])


def test_bridge_returns_none_when_a_full_render_is_required(renderer):
    prompt = renderer.render([{"role": "user", "content": "hi"}])
    for new in ([{"role": "assistant", "content": "x"}], [{"role": "system", "content": "x"}], []):
        assert renderer.bridge_to_next_turn(prompt.token_ids, [1, IM_END], new, []) is None


def test_bridge_trims_after_close_and_synthesizes_missing_close(renderer):
    prompt = renderer.render([{"role": "user", "content": "hi"}])
    reply = qwen2_tokenizer().encode("ok", add_special_tokens=False)
    new = [{"role": "user", "content": "again"}]
    trimmed = renderer.bridge_to_next_turn(prompt.token_ids, reply + [IM_END, 42, 43], new, [])
    cut = renderer.bridge_to_next_turn(prompt.token_ids, reply, new, [])
    assert trimmed.token_ids == cut.token_ids
    n = len(prompt)
    assert trimmed.sampled_mask[n:n + len(reply) + 1] == [True] * (len(reply) + 1)
    assert cut.sampled_mask[n:n + len(reply) + 1] == [True] * len(reply) + [False]  # synthesized close
    endoftext = renderer.bridge_to_next_turn(prompt.token_ids, reply + [151643], new, [])
    assert endoftext.token_ids == trimmed.token_ids


def test_raw_mode_never_decodes_pixels(renderer, store, monkeypatch):
    parts = [ref_part(store, (100 + i, 60)) for i in range(4)]
    opened = []
    monkeypatch.setattr(Image, "open", lambda *a, **k: opened.append(a) or pytest.fail("image decoded"))
    rendered = renderer.render([{"role": "user", "content": parts}])
    assert len(rendered.images) == 4 and opened == []


def test_stop_and_image_token_ids(renderer):
    assert renderer.stop_token_ids == [IM_END, 151643]
    assert {IMAGE_PAD, VISION_START, 151653, 151656}.issubset(renderer.image_token_ids)


def test_parse_response_reports_malformed_tool_calls_and_cutoff():
    renderer = create_renderer(qwen2_tokenizer(), "qwen3-vl")
    ids = qwen2_tokenizer().encode('ok<tool_call>\n{"name": broken\n</tool_call>', add_special_tokens=False)
    parsed = renderer.parse_response(ids)
    assert parsed.content == "ok" and not parsed.finished
    assert [c.status for c in parsed.tool_calls] == ["malformed"]


def test_unknown_family_is_named():
    with pytest.raises(RenderError, match="no renderer for family 'llava'"):
        create_renderer(qwen2_tokenizer(), "llava")


def test_storing_and_rendering_reads_headers_but_never_decodes_pixels(renderer, tmp_path, monkeypatch):
    from PIL import ImageFile

    encoded = []
    for i in range(4):
        buffer = io.BytesIO()
        Image.new("RGB", (300 + 7 * i, 200), (i * 40, 90, 200)).save(buffer, "PNG")
        encoded.append(buffer.getvalue())
    loads = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(self.size) or real_load(self))
    store = ImageStore(tmp_path)
    refs = [make_ref(renderer.spec, store.put_bytes(data, "image/png")) for data in encoded]
    parts = [{"type": "image_url", "image_url": {"url": ref.encode()}} for ref in refs]
    rendered = renderer.render([{"role": "user", "content": parts}])
    assert [s.ref.width for s in rendered.images] == [300, 307, 314, 321]
    assert loads == []  # sizes came from the PNG headers; no pixel was decoded


@pytest.mark.parametrize("arguments,needle", [
    ("{not json", "arguments are not valid JSON"),
    ("[1, 2]", "arguments must be a JSON object, got list"),
])
def test_qwen35_tool_call_arguments_that_are_not_an_object_are_render_errors(arguments, needle):
    qwen35 = create_renderer(qwen2_tokenizer(), "qwen3.5")
    call = {"id": "c1", "type": "function", "function": {"name": "click", "arguments": arguments}}
    messages = [{"role": "user", "content": "go"}, {"role": "assistant", "content": "", "tool_calls": [call]}]
    with pytest.raises(RenderError, match=f"message 1: tool call 'click' {needle}"):
        qwen35.render(messages)


def test_bridge_with_prev_numbers_messages_in_the_whole_conversation(renderer):
    history = [{"role": "user", "content": "hi"}]
    prompt = renderer.render(history)
    reply = qwen2_tokenizer().encode("ok", add_special_tokens=False) + [IM_END]
    new = [{"role": "user", "content": "again"}]
    bridged = renderer.bridge_to_next_turn(prompt.token_ids, reply, new, [], prev=prompt)
    full = renderer.render(history + [{"role": "assistant", "content": "ok"}] + new)
    assert bridged.token_ids == full.token_ids
    content = [i for i, c in zip(bridged.message_index, bridged.is_content) if c]
    assert content == [i for i, c in zip(full.message_index, full.is_content) if c] == [0, 1, 2]
    with pytest.raises(RenderError, match="prev has"):
        renderer.bridge_to_next_turn(prompt.token_ids[:-1], reply, new, [], prev=prompt)


# -- which special tokens text can produce, per family ------------------------------------

QWEN_TEXT_TAGS = {"<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>"}
NEUTRAL = "plain words"


def _special_family(family):
    from mmref.renderers.tokenizer import KIMI_SPECIAL_TOKENS, QWEN_SPECIAL_TOKENS, tiny_tokenizer

    if family == "kimi-k2.5":
        return create_renderer(tiny_tokenizer(specials=KIMI_SPECIAL_TOKENS), family), KIMI_SPECIAL_TOKENS, set()
    return create_renderer(qwen2_tokenizer(), family), QWEN_SPECIAL_TOKENS, QWEN_TEXT_TAGS


def _typed_into(place, text):
    """A conversation (and tools) with ``text`` typed into one place a user or tool controls."""
    tools = None
    messages = [{"role": "user", "content": "start"}]
    if place == "user text":
        messages = [{"role": "user", "content": f"look {text} here"}]
    elif place == "tool description":
        tools = [{"type": "function", "function": {"name": "zoom", "description": f"Zoom {text} in",
                                                   "parameters": {"type": "object", "properties": {}}}}]
    elif place == "tool result":
        messages += [{"role": "assistant", "content": "calling"},
                     {"role": "tool", "tool_call_id": "c1", "content": f"result {text} end"}]
    elif place == "assistant history":
        messages += [{"role": "assistant", "content": f"I said {text} before"}, {"role": "user", "content": "more"}]
    return messages, tools


def _special_counts(renderer, specials, messages, tools):
    ids = set(renderer.token_id(t) for t in specials if renderer.has_token(t))
    rendered = renderer.render(messages, tools=tools)
    return {i: rendered.token_ids.count(i) for i in ids}


@pytest.mark.parametrize("place", ["user text", "tool description", "tool result", "assistant history"])
@pytest.mark.parametrize("family", ["qwen2-vl", "qwen2.5-vl", "qwen3-vl", "qwen3.5", "kimi-k2.5"])
def test_text_produces_exactly_the_families_text_tags_as_special_ids(family, place):
    """Each special token string typed into text: the tags become one id, nothing else becomes any."""
    renderer, specials, allowed = _special_family(family)
    if place == "tool description" and family == "qwen2-vl":
        pytest.skip("qwen2-vl's template has no tools")
    baseline = _special_counts(renderer, specials, *_typed_into(place, NEUTRAL))

    def became(token):
        counts = _special_counts(renderer, specials, *_typed_into(place, token))
        if counts == baseline:
            return "text"
        one_more = {**baseline, renderer.token_id(token): baseline[renderer.token_id(token)] + 1}
        return "id" if counts == one_more else f"other special ids: {counts} vs {baseline}"

    assert {t: became(t) for t in specials} == {t: "id" if t in allowed else "text" for t in specials}


def test_typed_tag_is_one_id_with_the_messages_attribution():
    renderer = create_renderer(qwen2_tokenizer(), "qwen3-vl")
    rendered = renderer.render([{"role": "user", "content": "a<think>b<|im_start|>c"}])
    think = rendered.token_ids.index(151667)
    assert rendered.message_index[think] == 0 and rendered.is_content[think]
    assert rendered.token_ids.count(151644) == 2  # the user turn and the generation prompt only
    text_ids = qwen2_tokenizer().encode("b<|im_start|>c", add_special_tokens=False, split_special_tokens=True)
    assert rendered.token_ids[think + 1:think + 1 + len(text_ids)] == text_ids


def test_creating_a_renderer_does_not_copy_or_mutate_the_tokenizer():
    from mmref.renderers.render.base import text_only_encoder

    tokenizer = qwen2_tokenizer()
    encoder = text_only_encoder(tokenizer)
    assert encoder.get_added_tokens_decoder() == {}  # special strings in text stay text
    assert encoder.get_vocab_size() == 151_643
    before = tokenizer.backend_tokenizer.encode_special_tokens
    create_renderer(tokenizer, "qwen3-vl").render([{"role": "user", "content": "<|im_end|>"}])
    assert tokenizer.backend_tokenizer.encode_special_tokens == before
    assert tokenizer.encode("<|im_end|>", add_special_tokens=False) == [IM_END]
