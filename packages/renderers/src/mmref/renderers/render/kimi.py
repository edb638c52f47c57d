"""Kimi K2.5 chat format: role tokens, and each image's ``<|media_pad|>`` run.

    <|im_user|>user<|im_middle|><|media_begin|>image<|media_content|><|media_pad|>...<|media_end|>text<|im_end|>
    <|im_assistant|>assistant<|im_middle|>

The chat template writes one ``<|media_pad|>`` per image and the processor expands it to one
per merged patch (transformers' ``Kimi_K25Processor.replace_image_token``: ``t*h*w / merge**2``);
a ref's ``num_tokens`` is that expanded count, the tokens the model sees.
"""

from __future__ import annotations

import json
import re
from typing import Any

from mmref.renderers.layout import LayoutSpec
from mmref.renderers.messages import Message, TextPart
from mmref.renderers.render.base import (
    ParsedResponse,
    ParsedToolCall,
    Renderer,
    Segment,
    Special,
    Text,
    split_reasoning,
)

DEFAULT_SYSTEM = "You are Kimi, an AI assistant created by Moonshot AI."
_ROLE_TOKEN = {"system": "<|im_system|>", "user": "<|im_user|>", "assistant": "<|im_assistant|>", "tool": "<|im_system|>"}


class KimiK25Renderer(Renderer):
    """Kimi K2.5 (raw mode; thinking kept in history so bridging is exact)."""

    family = "kimi-k2.5"
    close_token = "<|im_end|>"
    stop_tokens = ("<|im_end|>",)
    image_start, image_pad, image_end = "<|media_begin|>", "<|media_pad|>", "<|media_end|>"
    image_special_tokens = ("<|media_begin|>", "<|media_content|>", "<|media_pad|>", "<|media_end|>")
    after_close = ""

    def __init__(self, tokenizer: Any, spec: LayoutSpec, add_vision_id: bool = False) -> None:
        super().__init__(tokenizer, spec, add_vision_id)
        image_word = self._text_encoder.encode("image", add_special_tokens=False).ids  # once, not per image
        self._image_prefix = [self.token_id("<|media_begin|>"), *image_word, self.token_id("<|media_content|>")]

    def _turn(self, role: str, index: int, body: list[Segment]) -> list[Segment]:
        return [Special(_ROLE_TOKEN[role], index), Text(role, index), Special("<|im_middle|>", index), *body,
                Special("<|im_end|>", index)]

    def conversation(self, messages: list[Message], tools: list[dict] | None) -> list[Segment]:
        segments: list[Segment] = []
        if tools:
            segments += self._turn("system", -1, [Text("# Tools\n" + json.dumps(tools, ensure_ascii=False), -1)])
        if not messages or messages[0].role != "system":
            segments += self._turn("system", -1, [Text(DEFAULT_SYSTEM, -1)])
        return segments + self.continuation(messages, 0)

    def continuation(self, messages: list[Message], images_before: int) -> list[Segment]:
        counter = [images_before]
        segments: list[Segment] = []
        for index, message in enumerate(messages):
            body = self.content_segments(message, index, counter)
            if message.role == "tool":
                body = [Text(f"## Return of {message.tool_call_id or ''}\n", index)] + body
            if message.role == "assistant":
                body = self._assistant_body(message, index)
            segments += self._turn(message.role, index, body)
        return segments

    def _assistant_body(self, message: Message, index: int) -> list[Segment]:
        text = "".join(p.text for p in message.parts if isinstance(p, TextPart))
        body: list[Segment] = [Text(f"<think>{message.reasoning_content or ''}</think>{text}", index, True)]
        if message.tool_calls:
            body.append(Special("<|tool_calls_section_begin|>", index))
            for j, call in enumerate(message.tool_calls):
                args = call.function.arguments
                body += [Special("<|tool_call_begin|>", index), Text(f"functions.{call.function.name}:{j}", index, True),
                         Special("<|tool_call_argument_begin|>", index),
                         Text(args if isinstance(args, str) else json.dumps(args, ensure_ascii=False), index, True),
                         Special("<|tool_call_end|>", index)]
            body.append(Special("<|tool_calls_section_end|>", index))
        return body

    def generation_prompt(self) -> list[Segment]:
        return [Special("<|im_assistant|>", -1), Text("assistant", -1), Special("<|im_middle|>", -1)]

    def image_prefix_ids(self) -> list[int]:
        return self._image_prefix

    def parse_completion_text(self, text: str) -> ParsedResponse:
        reasoning, rest = split_reasoning(text)
        calls = []
        section = re.search(r"<\|tool_calls_section_begin\|>(.*?)(?:<\|tool_calls_section_end\|>|$)", rest, re.DOTALL)
        if section:
            for raw in re.findall(r"<\|tool_call_begin\|>(.*?)(?:<\|tool_call_end\|>|$)", section.group(1), re.DOTALL):
                calls.append(_kimi_call(raw))
            rest = rest[: section.start()]
        return ParsedResponse(rest, reasoning, calls)


def _kimi_call(raw: str) -> ParsedToolCall:
    match = re.match(r"\s*functions\.([^:<]+):\d+<\|tool_call_argument_begin\|>(.*)", raw, re.DOTALL)
    if match is None:
        return ParsedToolCall(None, None, raw, "malformed")
    try:
        arguments: Any = json.loads(match.group(2))
    except ValueError:
        return ParsedToolCall(match.group(1), None, raw, "malformed")
    return ParsedToolCall(match.group(1), arguments, raw)
