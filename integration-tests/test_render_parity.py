"""Raw-mode render equals transformers' apply_chat_template + processor, token for token."""

import pytest

from mmref.renderers import ImageStore, layout_spec
from mmref.renderers.processed import reference_processor
from mmref.renderers.render import chat_template, create_renderer
from mmref.renderers.tokenizer import qwen2_tokenizer
from render_cases import image_ref, picture

FAMILIES = ["qwen2-vl", "qwen2.5-vl", "qwen3-vl"]
TOOLS = [{"type": "function", "function": {"name": "zoom", "description": "Zoom into the screen",
                                           "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}}}}]


def img(i):
    return {"type": "image_url", "image_url": {"url": None}, "_index": i}


CONVERSATIONS = {
    "one-image": [{"role": "user", "content": [img(0), {"type": "text", "text": "What colour is this?"}]}],
    "multi-turn": [
        {"role": "system", "content": "You look at screenshots."},
        {"role": "user", "content": [img(1), img(2), {"type": "text", "text": "Compare   these\n two."}]},
        {"role": "assistant", "content": "The first is wider."},
        {"role": "user", "content": [{"type": "text", "text": "And now? "}, img(3)]},
    ],
    "text-only": [{"role": "user", "content": "Hello, world!"}, {"role": "assistant", "content": "Hi."},
                  {"role": "user", "content": "Bye"}],
}
TOOL_CONVERSATION = [
    {"role": "system", "content": "Use tools."},
    {"role": "user", "content": [img(4), {"type": "text", "text": "zoom in"}]},
    {"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "type": "function",
                                                         "function": {"name": "zoom", "arguments": {"x": 3}}}]},
    {"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": "zoomed:"}, img(5)]},
    {"role": "tool", "tool_call_id": "c1", "content": "second result"},
]


def split(messages, store, family):
    """(our messages with refs, transformers messages, PIL images in prompt order)."""
    ours, theirs, images = [], [], []
    for message in messages:
        content = message.get("content")
        if not isinstance(content, list):
            ours.append(message)
            theirs.append(message)
            continue
        our_parts, their_parts = [], []
        for p in content:
            if p["type"] == "image_url":
                our_parts.append({"type": "image_url", "image_url": {"url": image_ref(store, family, p["_index"])}})
                their_parts.append({"type": "image"})
                images.append(picture(p["_index"]))
            else:
                our_parts.append(p)
                their_parts.append(p)
        ours.append({**message, "content": our_parts})
        theirs.append({**message, "content": their_parts})
    return ours, theirs, images


def reference_ids(family, messages, images, tools=None):
    processor = reference_processor(qwen2_tokenizer(), layout_spec(family), chat_template(family))
    text = processor.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
    out = processor(text=[text], images=images or None, return_tensors="pt")
    return out["input_ids"][0].tolist(), out["mm_token_type_ids"][0].tolist()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_render_equals_processor(family, name, tmp_path):
    store = ImageStore(tmp_path)
    ours, theirs, images = split(CONVERSATIONS[name], store, family)
    rendered = create_renderer(qwen2_tokenizer(), family).render(ours)
    expected_ids, expected_types = reference_ids(family, theirs, images)
    assert rendered.token_ids == expected_ids
    assert rendered.mm_token_type_ids == expected_types
    pads = [i for i, t in enumerate(expected_ids) if t == 151655]
    assert [i for s in rendered.images for i in range(s.offset, s.end)] == pads


def test_qwen3_vl_tools_and_tool_result_images_equal_processor(tmp_path):
    store = ImageStore(tmp_path)
    ours, theirs, images = split(TOOL_CONVERSATION, store, "qwen3-vl")
    rendered = create_renderer(qwen2_tokenizer(), "qwen3-vl").render(ours, tools=TOOLS)
    expected_ids, _ = reference_ids("qwen3-vl", theirs, images, tools=TOOLS)
    assert rendered.token_ids == expected_ids
    assert len(rendered.images) == 2


@pytest.mark.parametrize("family", FAMILIES)
def test_picture_labels_equal_processor_with_add_vision_id(family, tmp_path):
    store = ImageStore(tmp_path)
    ours, theirs, images = split(CONVERSATIONS["multi-turn"], store, family)
    rendered = create_renderer(qwen2_tokenizer(), family, add_vision_id=True).render(ours)
    processor = reference_processor(qwen2_tokenizer(), layout_spec(family), chat_template(family))
    text = processor.apply_chat_template(theirs, tokenize=False, add_generation_prompt=True, add_vision_id=True)
    assert "Picture 3:" in text
    assert rendered.token_ids == processor(text=[text], images=images, return_tensors="pt")["input_ids"][0].tolist()


TAGS_TEXT = "a <tool_call>x</tool_call> <tool_response>y</tool_response> <think>z</think> b"


@pytest.mark.parametrize("family", FAMILIES)
def test_tags_typed_in_text_become_ids_as_the_published_template_does(family, tmp_path):
    """Tool and think tags in user text, tool descriptions, tool results and history: same ids as the processor."""
    store = ImageStore(tmp_path)
    messages = [
        {"role": "system", "content": f"sys {TAGS_TEXT}"},
        {"role": "user", "content": [img(0), {"type": "text", "text": TAGS_TEXT}]},
        {"role": "assistant", "content": TAGS_TEXT},
        {"role": "user", "content": "next"},
    ]
    tools = None
    if family == "qwen3-vl":  # the only shipped template with tools (Qwen2/2.5-VL's publish none)
        tools = [{"type": "function", "function": {**TOOLS[0]["function"], "description": TAGS_TEXT}}]
        messages += [{"role": "assistant", "content": "", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "zoom", "arguments": {"x": 1}}}]},
            {"role": "tool", "tool_call_id": "c1", "content": TAGS_TEXT}]
    ours, theirs, images = split(messages, store, family)
    rendered = create_renderer(qwen2_tokenizer(), family).render(ours, tools=tools)
    expected_ids, _ = reference_ids(family, theirs, images, tools=tools)
    assert rendered.token_ids == expected_ids
    assert rendered.token_ids.count(151667) >= 3  # <think> from system, user and assistant text
