"""Render invariants over generated conversations, for every family.

(a) image slots cover exactly the runs of pad tokens, and sum(num_tokens) == pad count;
(b) a conversation built turn by turn with bridge_to_next_turn equals a full render;
(c) parse_response inverts the rendering of an assistant message;
(d) special-token strings typed in text produce exactly the family's tags, bridged or not.
"""

import functools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mmref.renderers import ImageStore, refs
from mmref.renderers.render import create_renderer
from mmref.renderers.tokenizer import KIMI_SPECIAL_TOKENS, qwen2_tokenizer, tiny_tokenizer
from render_cases import image_ref

FAMILIES = ["qwen2-vl", "qwen2.5-vl", "qwen3-vl", "qwen3.5", "kimi-k2.5"]
words = st.text(alphabet="abcdefgh xyz,.!?\n", min_size=1, max_size=24)


@functools.cache
def setup(family):
    tokenizer = tiny_tokenizer(("red",), specials=KIMI_SPECIAL_TOKENS) if family == "kimi-k2.5" else qwen2_tokenizer()
    store = ImageStore(f"memory://props-{family}")
    refs = [image_ref(store, family, i) for i in range(6)]
    return create_renderer(tokenizer, family), refs


@st.composite
def user_turns(draw, family):
    """A list of turns; each turn is the env's new messages (user, sometimes tool) and a reply."""
    _, refs = setup(family)
    turns = []
    for _ in range(draw(st.integers(1, 6))):
        messages = []
        if turns and family != "qwen2-vl" and draw(st.booleans()):
            content = [{"type": "image_url", "image_url": {"url": refs[draw(st.integers(0, 5))]}}
                       for _ in range(draw(st.integers(0, 2)))] + [{"type": "text", "text": draw(words)}]
            messages.append({"role": "tool", "tool_call_id": "c0", "content": content})
        content = [{"type": "image_url", "image_url": {"url": refs[draw(st.integers(0, 5))]}}
                   for _ in range(draw(st.integers(0, 3)))]
        content.insert(draw(st.integers(0, len(content))), {"type": "text", "text": draw(words)})
        messages.append({"role": "user", "content": content})
        turns.append((messages, draw(words).strip() or "ok"))
    return turns


def completion_ids(renderer, history, reply):
    """The ids a model would sample for ``reply``: the assistant turn as the renderer writes it."""
    prompt = renderer.render(history).token_ids
    full = renderer.render(history + [{"role": "assistant", "content": reply}], add_generation_prompt=False).token_ids
    assert full[: len(prompt)] == prompt
    rest = full[len(prompt):]
    return rest[: rest.index(renderer.token_id(renderer.close_token)) + 1]


def check_rendered(rendered, renderer):
    """The renderer's slots hold the one slot invariant, and its columns line up."""
    refs.check_slots(rendered.token_ids, rendered.images, renderer.image_pad_id, sampled=rendered.sampled_mask)
    assert rendered.mm_token_type_ids == refs.token_types(len(rendered.token_ids), rendered.images)
    assert all(len(col) == len(rendered.token_ids) for col in
               (rendered.message_index, rendered.sampled_mask, rendered.is_content))


@pytest.mark.parametrize("family", FAMILIES)
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_bridged_conversation_equals_full_render(family, data):
    renderer, _ = setup(family)
    turns = data.draw(user_turns(family))
    history = [{"role": "system", "content": "look"}]
    prompt = None
    for messages, reply in turns:
        if prompt is None:
            history += messages
            prompt = renderer.render(history)
        else:
            prompt = renderer.bridge_to_next_turn(prev_prompt, prev_completion, messages, prompt.images, prev=prompt)
            history += messages
            full = renderer.render(history)
            assert prompt.token_ids == full.token_ids
            assert [(s.offset, s.ref) for s in prompt.images] == [(s.offset, s.ref) for s in full.images]
            # Attribution as in the full render, except scaffold the bridge cannot know (earlier
            # generation prompts, the newline after a close), which it leaves at -1.
            assert all(b in (f, -1) for b, f in zip(prompt.message_index, full.message_index))
            assert set(prompt.message_index) == set(full.message_index) | {-1}
        check_rendered(prompt, renderer)
        prev_prompt, prev_completion = prompt.token_ids, completion_ids(renderer, history, reply)
        assert all(prompt.sampled_mask[i] is False for i in range(len(prev_prompt)) if i >= len(prev_prompt) - 2)
        history.append({"role": "assistant", "content": reply})


@pytest.mark.parametrize("family", FAMILIES)
@settings(max_examples=25, deadline=None)
@given(reply=words)
def test_parse_response_inverts_assistant_render(family, reply):
    renderer, refs = setup(family)
    history = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": refs[0]}},
                                            {"type": "text", "text": "hi"}]}]
    parsed = renderer.parse_response(completion_ids(renderer, history, reply))
    assert parsed.content.strip() == reply.strip() and parsed.finished and not parsed.tool_calls


@pytest.mark.parametrize("family", ["qwen2.5-vl", "qwen3-vl", "qwen3.5", "kimi-k2.5"])
@settings(max_examples=15, deadline=None)
@given(name=st.from_regex(r"[a-z_]{1,10}", fullmatch=True), x=st.integers(-99, 99), text=words)
def test_parse_response_recovers_tool_calls(family, name, x, text):
    renderer, refs = setup(family)
    history = [{"role": "user", "content": "go"}]
    call = {"role": "assistant", "content": "", "tool_calls": [
        {"id": "c0", "type": "function", "function": {"name": name, "arguments": {"x": x, "note": text}}}]}
    prompt = renderer.render(history).token_ids
    full = renderer.render(history + [call], add_generation_prompt=False).token_ids
    parsed = renderer.parse_response(full[len(prompt):])
    assert [(c.name, c.arguments, c.status) for c in parsed.tool_calls] == [(name, {"x": x, "note": text}, "ok")]


def special_strings(family):
    from mmref.renderers.tokenizer import QWEN_SPECIAL_TOKENS

    return KIMI_SPECIAL_TOKENS if family == "kimi-k2.5" else QWEN_SPECIAL_TOKENS


@pytest.mark.parametrize("family", FAMILIES)
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_text_with_special_strings_yields_only_the_typed_tags_and_bridges_exactly(family, data):
    """(d) Special strings typed in text: each tag typed is one id, nothing else is; bridged == full."""
    renderer, _ = setup(family)
    pieces = st.sampled_from([*special_strings(family), "a", " b", "\n", "<", "|>", "think>", "é"])
    text = "".join(data.draw(st.lists(pieces, max_size=10)))
    history = [{"role": "user", "content": "hi"}]
    base = renderer.render(history + [{"role": "assistant", "content": "ok"}, {"role": "user", "content": "x"}])
    full = renderer.render(history + [{"role": "assistant", "content": "ok"}, {"role": "user", "content": text}])
    allowed = {t: text.count(t) for t in renderer.text_tags if renderer.has_token(t)}
    for token in special_strings(family):
        if renderer.has_token(token):
            extra = full.token_ids.count(renderer.token_id(token)) - base.token_ids.count(renderer.token_id(token))
            assert extra == allowed.get(token, 0), token
    prompt = renderer.render(history)
    bridged = renderer.bridge_to_next_turn(prompt.token_ids, completion_ids(renderer, history, "ok"),
                                           [{"role": "user", "content": text}], prompt.images, prev=prompt)
    assert bridged.token_ids == full.token_ids
