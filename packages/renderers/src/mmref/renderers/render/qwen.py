"""Qwen-VL chat formats: Qwen2-VL, Qwen2.5-VL, Qwen3-VL and Qwen3.5.

Each image is ``<|vision_start|>`` + N x ``<|image_pad|>`` + ``<|vision_end|>``; turns are
``<|im_start|>{role}\\n ... <|im_end|>\\n``. The Jinja templates these reproduce live in
``mmref/renderers/chat_templates/``; parity with ``apply_chat_template`` + the processor is
a test. Tags that the templates write as text but the tokenizer has as added tokens
(``<tool_call>``, ``<tool_response>``, ``<think>`` and their closes) are emitted as their
single ids, in the template's scaffold and in any text (user text, tool descriptions, tool
results, assistant history), as the published template + tokenizer do. No other special
token comes from text; see ``mmref.renderers.render.base``.
"""

from __future__ import annotations

import json
import re
from typing import Any

from mmref.renderers.errors import RenderError
from mmref.renderers.messages import Message, TextPart
from mmref.renderers.render.base import (
    Break,
    ParsedResponse,
    ParsedToolCall,
    Renderer,
    Segment,
    Special,
    Text,
    parse_json_tool_calls,
    split_reasoning,
)

DEFAULT_SYSTEM = "You are a helpful assistant."
TOOLS_INTRO = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
TOOLS_OUTRO = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n'
    "</tool_call>"
)


# The published Qwen tokenizers have these as non-special added tokens: they are ids in any text.
TEXT_TAGS = ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>")


def tojson(value: Any) -> str:
    """JSON as transformers' chat-template ``tojson`` filter writes it."""
    return json.dumps(value, ensure_ascii=False)


class QwenRenderer(Renderer):
    """Shared turn structure of the Qwen families."""

    stop_tokens = ("<|im_end|>", "<|endoftext|>")
    text_tags = TEXT_TAGS

    def _open(self, role: str, index: int) -> list[Segment]:
        # The model samples after "assistant\n": tokenize the reply apart from the header, so a
        # rendered assistant turn is exactly the generation prompt plus what was sampled.
        brk = [Break()] if role == "assistant" else []
        return [Special("<|im_start|>", index), Text(f"{role}\n", index), *brk]

    def _close(self, index: int) -> list[Segment]:
        return [Special("<|im_end|>", index), Text("\n", index)]

    def _tag(self, tag: str, index: int) -> Segment:
        """A template tag: its added-token id when the tokenizer has one, else its text."""
        return Special(tag, index) if self.has_token(tag) else Text(tag, index)

    def generation_prompt(self) -> list[Segment]:
        return self._open("assistant", -1)

    def _tools_system(self, system: Message | None, tools: list[dict], default: str | None) -> list[Segment]:
        """The system turn that lists the tools (Hermes format), after the system text if any."""
        index = 0 if system else -1
        head = _system_text(system) + "\n\n" if system else (default + "\n\n" if default else "")
        listing = TOOLS_INTRO + "".join("\n" + tojson(t) for t in tools) + TOOLS_OUTRO
        return (self._open("system", index) + ([Text(head, index, bool(system))] if head else [])
                + [Text(listing, index)] + self._close(index))

    def parse_completion_text(self, text: str) -> ParsedResponse:
        reasoning, rest = split_reasoning(text)
        content, calls = parse_json_tool_calls(rest)
        return ParsedResponse(content.strip() if calls else content, reasoning, calls)

    def _hermes_calls(self, message: Message, index: int, newline_first: bool) -> list[Segment]:
        segments: list[Segment] = []
        for j, call in enumerate(message.tool_calls):
            if j > 0 or newline_first:
                segments.append(Text("\n", index, True))
            args = call.function.arguments
            body = f'\n{{"name": "{call.function.name}", "arguments": {args if isinstance(args, str) else tojson(args)}}}\n'
            segments += [self._tag("<tool_call>", index), Text(body, index, True), self._tag("</tool_call>", index)]
        return segments


class Qwen2VLRenderer(QwenRenderer):
    """Qwen2-VL's published template: default system prompt, plain role headers."""

    family = "qwen2-vl"
    supports_tools = False

    def conversation(self, messages: list[Message], tools: list[dict] | None) -> list[Segment]:
        if tools and not self.supports_tools:
            raise RenderError(f"the {self.family} chat template has no tool support; pass tools=None")
        segments: list[Segment] = []
        counter = [0]
        if tools:
            system = messages[0] if messages and messages[0].role == "system" else None
            segments += self._tools_system(system, tools, DEFAULT_SYSTEM)
            start = 1 if system else 0
        else:
            start = 0
            if not messages or messages[0].role != "system":
                segments += self._open("system", -1) + [Text(DEFAULT_SYSTEM, -1)] + self._close(-1)
        for index in range(start, len(messages)):
            segments += self._message(messages[index], index, counter)
        return segments

    def continuation(self, messages: list[Message], images_before: int) -> list[Segment]:
        counter = [images_before]
        return [s for i, m in enumerate(messages) for s in self._message(m, i, counter)]

    def _message(self, message: Message, index: int, counter: list[int]) -> list[Segment]:
        if message.tool_calls and not self.supports_tools:
            raise RenderError(f"message {index}: the {self.family} chat template cannot render tool_calls")
        content = self.content_segments(message, index, counter)
        calls = self._hermes_calls(message, index, newline_first=bool(content))
        return self._open(message.role, index) + content + calls + self._close(index)


class Qwen25VLRenderer(Qwen2VLRenderer):
    """Qwen2.5-VL: Qwen2-VL's template; tools and tool calls in the Hermes format of Qwen2.5."""

    family = "qwen2.5-vl"
    supports_tools = True


class Qwen3VLRenderer(QwenRenderer):
    """Qwen3-VL's published template: no default system; tool results grouped in a user turn."""

    family = "qwen3-vl"

    def conversation(self, messages: list[Message], tools: list[dict] | None) -> list[Segment]:
        system = messages[0] if messages and messages[0].role == "system" else None
        segments: list[Segment] = []
        if tools:
            segments += self._tools_system(system, tools, None)
        elif system:
            segments += self._open("system", 0) + [Text(_system_text(system), 0, True)] + self._close(0)
        return segments + self._messages(messages, [0], skip_system=True)

    def continuation(self, messages: list[Message], images_before: int) -> list[Segment]:
        return self._messages(messages, [images_before], skip_system=True)

    def _messages(self, messages: list[Message], counter: list[int], skip_system: bool) -> list[Segment]:
        segments: list[Segment] = []
        for index, message in enumerate(messages):
            if message.role == "user":
                segments += self._open("user", index) + self.content_segments(message, index, counter)
                segments += self._close(index)
            elif message.role == "assistant":
                segments += self._assistant(message, index)
            elif message.role == "tool":
                if index == 0 or messages[index - 1].role != "tool":
                    segments += [Special("<|im_start|>", index), Text("user", index)]
                segments += [Text("\n", index), self._tag("<tool_response>", index), Text("\n", index)]
                segments += self.content_segments(message, index, counter)
                segments += [Text("\n", index), self._tag("</tool_response>", index)]
                if index == len(messages) - 1 or messages[index + 1].role != "tool":
                    segments += self._close(index)
        return segments

    def _assistant(self, message: Message, index: int) -> list[Segment]:
        text = "".join(p.text for p in message.parts if isinstance(p, TextPart))
        segments = self._open("assistant", index) + ([Text(text, index, True)] if text else [])
        return segments + self._hermes_calls(message, index, newline_first=bool(text)) + self._close(index)


class Qwen35Renderer(Qwen3VLRenderer):
    """Qwen3.5: Qwen3-VL's vision layout, thinking blocks, and XML-style tool calls.

    Reasoning of earlier assistant turns is kept in the history (the published template
    drops it), so a bridged multi-turn rollout equals its full re-render token for token.
    """

    family = "qwen3.5"

    def __init__(self, tokenizer: Any, spec, add_vision_id: bool = False, enable_thinking: bool = True) -> None:
        super().__init__(tokenizer, spec, add_vision_id)
        self.enable_thinking = enable_thinking

    def generation_prompt(self) -> list[Segment]:
        if self.enable_thinking:
            return self._open("assistant", -1) + [self._tag("<think>", -1), Text("\n", -1)]
        return self._open("assistant", -1) + [self._tag("<think>", -1), Text("\n\n", -1),
                                               self._tag("</think>", -1), Text("\n\n", -1)]

    def _assistant(self, message: Message, index: int) -> list[Segment]:
        text = "".join(p.text for p in message.parts if isinstance(p, TextPart))
        segments = self._open("assistant", index)
        reasoning = message.reasoning_content or ""
        segments += [self._tag("<think>", index), Text("\n", index), Break(), Text(reasoning + "\n", index, True),
                     self._tag("</think>", index), Text("\n\n" + text, index, True)]
        for call in message.tool_calls:
            args = _arguments_object(call.function.arguments, index, call.function.name)
            params = "".join(f"<parameter={k}>\n{v if isinstance(v, str) else tojson(v)}\n</parameter>\n"
                             for k, v in args.items())
            segments += [Text("\n\n", index), self._tag("<tool_call>", index),
                         Text(f"\n<function={call.function.name}>\n{params}</function>\n", index, True),
                         self._tag("</tool_call>", index)]
        return segments + self._close(index)

    def parse_completion_text(self, text: str) -> ParsedResponse:
        reasoning, rest = split_reasoning(text)
        calls = []
        for raw in re.findall(r"<tool_call>(.*?)(?:</tool_call>|$)", rest, flags=re.DOTALL):
            match = re.search(r"<function=([^>\n]+)>(.*?)</function>", raw, flags=re.DOTALL)
            if match is None:
                calls.append(ParsedToolCall(None, None, raw, "malformed"))
                continue
            params = {k: _xml_value(v) for k, v in re.findall(r"<parameter=([^>\n]+)>\n?(.*?)\n?</parameter>",
                                                               match.group(2), flags=re.DOTALL)}
            calls.append(ParsedToolCall(match.group(1), params, raw))
        content = re.sub(r"\s*<tool_call>.*?(?:</tool_call>|$)", "", rest, flags=re.DOTALL)
        return ParsedResponse(content.strip(), reasoning, calls)


def _xml_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _system_text(message: Message) -> str:
    return "".join(p.text for p in message.parts if isinstance(p, TextPart))


def _arguments_object(arguments: Any, index: int, name: str) -> dict:
    """Tool-call arguments as a dict (Qwen3.5 writes each as a <parameter=...>); a clear error otherwise."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as exc:
            raise RenderError(f"message {index}: tool call {name!r} arguments are not valid JSON: {exc}") from None
    if not isinstance(arguments, dict):
        raise RenderError(f"message {index}: tool call {name!r} arguments must be a JSON object, "
                          f"got {type(arguments).__name__}")
    return arguments
