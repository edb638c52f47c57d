"""The renderer core: messages to token ids with per-token attribution and image slots.

A family renderer describes a conversation as a list of segments (text, special token,
image); ``Renderer`` turns segments into ids. Text between two special tokens is
tokenized as one run (so BPE merges match a whole-string render), always with
``split_special_tokens=True``: a user who types ``<|image_pad|>`` gets text tokens, never
the special id. Images become ``start + num_tokens * pad + end`` from the ref alone;
no pixels are read.
"""

from __future__ import annotations

import copy
import json
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from mmref.renderers.contract import verify_ref
from mmref.renderers.errors import ContractMismatchError, RenderError
from mmref.renderers.layout import LayoutSpec
from mmref.renderers.messages import Message, parse_messages
from mmref.renderers.refs import ImageSlot, RawImageRef


@dataclass(frozen=True)
class Text:
    text: str
    message_index: int = -1
    is_content: bool = False


@dataclass(frozen=True)
class Special:
    token: str
    message_index: int = -1


@dataclass(frozen=True)
class Image:
    ref: RawImageRef
    message_index: int


@dataclass(frozen=True)
class Break:
    """Ends a text run: text on either side is tokenized separately (where a model's sampling starts)."""


Segment = Text | Special | Image | Break


@dataclass(frozen=True)
class RenderedTokens:
    """Token ids with parallel per-token attribution, and the image slots in prompt order.

    message_index: index into the messages (-1: scaffold such as the generation prompt)
    sampled_mask:  True where the token was sampled by the model (bridged completions)
    is_content:    True for message content (text and image tokens), False for scaffold
    mm_token_type_ids: 1 on image-pad tokens, else 0
    """

    token_ids: list[int]
    message_index: list[int]
    sampled_mask: list[bool]
    is_content: list[bool]
    mm_token_type_ids: list[int]
    images: list[ImageSlot]

    def __len__(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True)
class ParsedToolCall:
    """A tool call found in a completion; ``status`` is "malformed" when it did not parse."""

    name: str | None
    arguments: dict[str, Any] | None
    raw: str
    status: Literal["ok", "malformed"] = "ok"


@dataclass(frozen=True)
class ParsedResponse:
    """A completion split into visible content, reasoning and tool calls."""

    content: str
    reasoning: str | None = None
    tool_calls: list[ParsedToolCall] = field(default_factory=list)
    finished: bool = True  # False when the completion was cut off before its close token


class Renderer(ABC):
    """Base renderer; a family subclass supplies the chat format as segments."""

    family: str
    close_token = "<|im_end|>"
    stop_tokens: tuple[str, ...] = ("<|im_end|>",)
    image_start, image_pad, image_end = "<|vision_start|>", "<|image_pad|>", "<|vision_end|>"
    image_special_tokens: tuple[str, ...] = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                                              "<|video_pad|>", "<|vision_pad|>")
    after_close = "\n"  # scaffold the template emits after each close token

    def __init__(self, tokenizer: Any, spec: LayoutSpec, add_vision_id: bool = False) -> None:
        if spec.family != self.family:
            raise RenderError(f"{type(self).__name__} renders {self.family!r} but got a {spec.family!r} layout spec")
        self.tokenizer, self.spec, self.add_vision_id = tokenizer, spec, add_vision_id
        self._ids = {t: self._special_id(t) for t in self._required_specials()}
        # A copy of the fast tokenizer that encodes special-token strings as plain text, so
        # user text can never produce a special id (what split_special_tokens=True does).
        self._text_encoder = copy.deepcopy(tokenizer.backend_tokenizer)
        self._text_encoder.encode_special_tokens = True
        self.image_pad_id = self._ids[self.image_pad]
        self.stop_token_ids = [self._ids[t] for t in self.stop_tokens]
        self.image_token_ids = frozenset(self.token_id(t) for t in self.image_special_tokens if self.has_token(t))

    # -- family hooks -------------------------------------------------------------------

    @abstractmethod
    def conversation(self, messages: list[Message], tools: list[dict] | None) -> list[Segment]:
        """Segments of a whole conversation (system defaults, tools header, messages)."""

    @abstractmethod
    def continuation(self, messages: list[Message], images_before: int) -> list[Segment]:
        """Segments of user/tool messages appended after a closed assistant turn (bridging)."""

    @abstractmethod
    def generation_prompt(self) -> list[Segment]:
        """Segments that open the assistant's turn."""

    @abstractmethod
    def parse_completion_text(self, text: str) -> ParsedResponse:
        """Content, reasoning and tool calls of decoded completion text."""

    # -- public API ---------------------------------------------------------------------

    def render(self, messages: Sequence[Message | dict], tools: list[dict] | None = None,
               add_generation_prompt: bool = True) -> RenderedTokens:
        """Token ids of a conversation, ending at the generation prompt when asked."""
        parsed = parse_messages(messages)
        segments = self.conversation(parsed, tools)
        if add_generation_prompt:
            segments += self.generation_prompt()
        return self.assemble(segments)

    def bridge_to_next_turn(self, prev_prompt_ids: Sequence[int], prev_completion_ids: Sequence[int],
                            new_messages: Sequence[Message | dict], prev_images: Sequence[ImageSlot],
                            tools: list[dict] | None = None, *,
                            prev: RenderedTokens | None = None) -> RenderedTokens | None:
        """Previous prompt + completion verbatim, then ``new_messages`` and the generation prompt.

        The completion is trimmed after its close token, or the close token is appended
        (not sampled) when it was cut off. Returns None where only a full re-render is
        correct: an assistant or system message among the new ones.

        Attribution: with ``prev`` (the previous turn's render of ``prev_prompt_ids``) the
        prompt keeps its per-token ``message_index``/``is_content``, the completion belongs to
        the assistant message that follows, and new messages are numbered in the whole
        conversation, as a full render numbers them (the previous generation prompt stays
        scaffold, -1). Without ``prev`` the earlier tokens are -1 and new messages count from 0.
        """
        parsed = parse_messages(new_messages)
        if not parsed or any(m.role in ("assistant", "system") for m in parsed):
            return None
        completion = list(prev_completion_ids)
        close_id = self._ids[self.close_token]
        sampled = [True] * len(completion)
        stops = [i for i, t in enumerate(completion) if t in self.stop_token_ids]
        if stops:
            completion, sampled = completion[: stops[0] + 1], sampled[: stops[0] + 1]
            if completion[-1] != close_id:  # e.g. <|endoftext|>: the template closes with <|im_end|>
                completion[-1], sampled[-1] = close_id, False
        else:
            completion.append(close_id)
            sampled.append(False)
        prefix = list(prev_prompt_ids) + completion
        tail = self.assemble(
            ([Text(self.after_close)] if self.after_close else [])
            + self.continuation(parsed, images_before=len(prev_images))
            + self.generation_prompt(),
            offset=len(prefix),
        )
        n_prompt = len(prev_prompt_ids)
        image_ids = [0] * len(prefix)  # from the slots, not a per-token scan: bridging stays flat in k
        for slot in prev_images:
            image_ids[slot.offset:slot.end] = [1] * slot.length
        if prev is not None:
            if len(prev.token_ids) != n_prompt:
                raise RenderError(f"prev has {len(prev.token_ids)} tokens but prev_prompt_ids has {n_prompt}")
            assistant = max(prev.message_index, default=-1) + 1  # the reply's index in the conversation
            prompt_index, prompt_content = list(prev.message_index), list(prev.is_content)
        else:
            assistant, prompt_index, prompt_content = -1, [-1] * n_prompt, [False] * n_prompt
        first_new = assistant + 1
        return RenderedTokens(
            token_ids=prefix + tail.token_ids,
            message_index=prompt_index + [assistant] * len(completion)
            + [i + first_new if i >= 0 else -1 for i in tail.message_index],
            sampled_mask=[False] * n_prompt + sampled + tail.sampled_mask,
            is_content=prompt_content + [s and t != close_id for s, t in zip(sampled, completion)] + tail.is_content,
            mm_token_type_ids=image_ids + tail.mm_token_type_ids,
            images=list(prev_images) + tail.images,
        )

    def parse_response(self, completion_ids: Sequence[int]) -> ParsedResponse:
        """Content, reasoning and tool calls of a completion (trimmed at its stop token)."""
        ids = list(completion_ids)
        stops = [i for i, t in enumerate(ids) if t in self.stop_token_ids]
        finished = bool(stops)
        text = self.tokenizer.decode(ids[: stops[0]] if stops else ids, skip_special_tokens=False)
        parsed = self.parse_completion_text(text)
        return ParsedResponse(parsed.content, parsed.reasoning, parsed.tool_calls, finished)

    # -- assembly -----------------------------------------------------------------------

    def assemble(self, segments: list[Segment], offset: int = 0) -> RenderedTokens:
        """Token ids and attribution of segments; image slots start ``offset`` tokens in."""
        out = RenderedTokens([], [], [], [], [], [])
        run: list[Text] = []
        for segment in segments + [Special("")]:  # sentinel flushes the last text run
            if isinstance(segment, Text):
                run.append(segment)
                continue
            self._emit_text_run(run, out)
            run = []
            if isinstance(segment, Break):
                continue
            if isinstance(segment, Special) and segment.token:
                self._emit(out, self.token_id(segment.token), segment.message_index, False)
            elif isinstance(segment, Image):
                self._emit_image(segment, out, offset)
        return out

    def _emit(self, out: RenderedTokens, token_id: int, message_index: int, is_content: bool) -> None:
        out.token_ids.append(token_id)
        out.message_index.append(message_index)
        out.sampled_mask.append(False)
        out.is_content.append(is_content)
        out.mm_token_type_ids.append(1 if token_id == self.image_pad_id else 0)

    def _emit_text_run(self, run: list[Text], out: RenderedTokens) -> None:
        if not run:
            return
        text = "".join(t.text for t in run)
        if not text:
            return
        encoded = self._text_encoder.encode(text, add_special_tokens=False)
        if len(run) == 1:
            n, t = len(encoded.ids), run[0]
            out.token_ids.extend(encoded.ids)
            out.message_index.extend([t.message_index] * n)
            out.sampled_mask.extend([False] * n)
            out.is_content.extend([t.is_content] * n)
            out.mm_token_type_ids.extend([0] * n)  # text runs never hold the (special) pad id
            return
        bounds, start = [], 0
        for t in run:
            bounds.append((start, start + len(t.text), t))
            start += len(t.text)
        for token_id, (char_start, _) in zip(encoded.ids, encoded.offsets):
            owner = next((t for s, e, t in bounds if s <= char_start < e), run[-1])
            self._emit(out, token_id, owner.message_index, owner.is_content)

    def _emit_image(self, image: Image, out: RenderedTokens, offset: int) -> None:
        try:
            verify_ref(image.ref, self.spec, stage=f"{self.family} renderer")
        except ContractMismatchError as exc:
            raise RenderError(f"message {image.message_index}: {exc}") from None
        for token_id in self.image_prefix_ids():
            self._emit(out, token_id, image.message_index, True)
        n = image.ref.num_tokens
        slot = ImageSlot(ref=image.ref, offset=offset + len(out.token_ids), length=n)
        # Bulk extends: a 1080p Qwen2-VL image is 2,691 pads, per-token appends cost ~1 ms.
        out.token_ids.extend([self.image_pad_id] * n)
        out.message_index.extend([image.message_index] * n)
        out.sampled_mask.extend([False] * n)
        out.is_content.extend([True] * n)
        out.mm_token_type_ids.extend([1] * n)
        for token_id in self.image_suffix_ids():
            self._emit(out, token_id, image.message_index, True)
        out.images.append(slot)

    # -- helpers for families -----------------------------------------------------------

    def image_prefix_ids(self) -> list[int]:
        """Ids before an image's pad tokens (Qwen: ``<|vision_start|>``)."""
        return [self.token_id(self.image_start)]

    def image_suffix_ids(self) -> list[int]:
        """Ids after an image's pad tokens (Qwen: ``<|vision_end|>``)."""
        return [self.token_id(self.image_end)]

    def _required_specials(self) -> tuple[str, ...]:
        return (self.close_token, *self.stop_tokens, self.image_start, self.image_pad, self.image_end)

    def token_id(self, token: str) -> int:
        """Id of a special token (cached); ``RenderError`` if the tokenizer lacks it."""
        if token not in self._ids:
            self._ids[token] = self._special_id(token)
        return self._ids[token]

    def has_token(self, token: str) -> bool:
        """True when the tokenizer has ``token`` as a single (added) token."""
        try:
            self.token_id(token)
        except RenderError:
            return False
        return True

    def _special_id(self, token: str) -> int:
        token_id = self.tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == getattr(self.tokenizer, "unk_token_id", None):
            raise RenderError(f"tokenizer lacks special token {token!r} needed by the {self.family} renderer")
        return token_id

    def content_segments(self, message: Message, index: int, image_counter: list[int]) -> list[Segment]:
        """A message's parts as segments; ``image_counter`` numbers images for "Picture k:" labels."""
        segments: list[Segment] = []
        for part in message.parts:
            if part.type == "text":
                segments.append(Text(part.text, index, True))
                continue
            image_counter[0] += 1
            if self.add_vision_id:
                segments.append(Text(f"Picture {image_counter[0]}: ", index, True))
            segments += [Image(part.ref, index)]
        return segments


def parse_json_tool_calls(text: str) -> tuple[str, list[ParsedToolCall]]:
    """Split ``<tool_call>\\n{json}\\n</tool_call>`` blocks (Hermes style) out of text."""
    calls = []
    for raw in re.findall(r"<tool_call>(.*?)(?:</tool_call>|$)", text, flags=re.DOTALL):
        try:
            obj = json.loads(raw.strip())
            calls.append(ParsedToolCall(obj["name"], obj.get("arguments", {}), raw))
        except (ValueError, KeyError, TypeError):
            calls.append(ParsedToolCall(None, None, raw, "malformed"))
    content = re.sub(r"\s*<tool_call>.*?(?:</tool_call>|$)", "", text, flags=re.DOTALL)
    return content, calls


def split_reasoning(text: str) -> tuple[str | None, str]:
    """``<think>r</think>c`` -> (r, c); (None, text) when there is no think block."""
    match = re.match(r"\s*(?:<think>)?(.*?)</think>\s*(.*)", text, flags=re.DOTALL)
    if match is None:
        return None, text
    return match.group(1).strip(), match.group(2)
