"""The renderer core: messages to token ids with per-token attribution and image slots.

A family renderer describes a conversation as a list of segments (text, special token,
image); ``Renderer`` turns segments into ids. Text between two special tokens is
tokenized as one run (so BPE merges match a whole-string render). Images become
``start + num_tokens * pad + end`` from the ref alone; no pixels are read.

Which special ids text can produce (text = message content, tool descriptions, tool
results, assistant history, reasoning): exactly the family's ``text_tags`` that the
tokenizer has as single tokens, and nothing else. The Qwen families' tags are
``<tool_call> </tool_call> <tool_response> </tool_response> <think> </think>``: the
published Qwen tokenizers mark them as non-special added tokens, so the published template
+ tokenizer produce them from any text, and so do we (parity with ``apply_chat_template``
is tested). Every other token string typed in text (``<|im_start|>``, ``<|im_end|>``,
``<|endoftext|>``, ``<|vision_start|>``, ``<|image_pad|>``, Kimi's ``<|im_*|>`` and
``<|media_*|>`` ...) is encoded as plain text: a user can never open a turn or fake an
image slot. Kimi K2.5 has no text tags.

    >>> renderer.render([{"role": "user", "content": "<think><|image_pad|>"}])  # doctest: +SKIP
    # -> ... 151667 (<think>), then the text tokens of "<|image_pad|>" ...
"""

from __future__ import annotations

import dataclasses
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
    text_tags: tuple[str, ...] = ()  # the only special tokens text may produce (see the module docstring)

    def __init__(self, tokenizer: Any, spec: LayoutSpec, add_vision_id: bool = False) -> None:
        if spec.family != self.family:
            raise RenderError(f"{type(self).__name__} renders {self.family!r} but got a {spec.family!r} layout spec")
        self.tokenizer, self.spec, self.add_vision_id = tokenizer, spec, add_vision_id
        self._ids = {t: self._special_id(t) for t in self._required_specials()}
        # Shares the tokenizer's vocabulary (no copy: creating a renderer costs ~0.1 ms, where a
        # deep copy of Qwen's 151k-token BPE took 0.6 s or more) and has no added tokens, so every
        # special string in text encodes as plain text; the allowed tags are split out before it.
        self._text_encoder = text_only_encoder(tokenizer)
        self._tag_ids = {t: self.token_id(t) for t in self.text_tags if self.has_token(t)}
        self._tag_split = (re.compile("(" + "|".join(re.escape(t) for t in sorted(self._tag_ids, key=len, reverse=True))
                                      + ")") if self._tag_ids else None)
        # Per-renderer caches (never shared, bounded): template-only text runs ("\n", "user\n")
        # and the constant columns of an image's pad run, keyed by its length.
        self._scaffold_runs: dict[tuple[str, ...], tuple[list[int], list[int] | None]] = {}
        self._pad_runs: dict[int, tuple[list[int], list[bool], list[int]]] = {}
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

        Cost: only the new messages are tokenized, but the result's per-token lists hold the
        whole prefix, copied once each (~10-15 ns a prefix token: 0.1 ms at 10k tokens), so it
        grows slowly with the conversation; a full re-render grows ~50x faster.
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
        n_prompt = len(prev_prompt_ids)
        if prev is not None:
            if len(prev.token_ids) != n_prompt:
                raise RenderError(f"prev has {len(prev.token_ids)} tokens but prev_prompt_ids has {n_prompt}")
            # Message indices ascend through a render, so the last one >= 0 is the largest:
            # a scan from the end stops within the generation prompt, not at the start.
            assistant = next((i for i in reversed(prev.message_index) if i >= 0), -1) + 1
        else:
            assistant = -1
        prefix = list(prev_prompt_ids)
        prefix += completion
        new_segments = self.continuation(parsed, images_before=len(prev_images))
        tail = self.assemble(
            ([Text(self.after_close)] if self.after_close else [])
            + (_renumber(new_segments, assistant + 1) if assistant >= 0 else new_segments)
            + self.generation_prompt(),
            offset=len(prefix),
        )
        # Only the new messages are tokenized; the prefix's columns are copied once each
        # (a few ns a token), and its mm_token_type_ids come from the slots, not a scan.
        image_ids = [0] * len(prefix)
        for slot in prev_images:
            image_ids[slot.offset:slot.end] = self._pad_run(slot.length)[2]
        if prev is not None:
            message_index, is_content = list(prev.message_index), list(prev.is_content)
        else:
            message_index, is_content = [-1] * n_prompt, [False] * n_prompt
        message_index += [assistant] * len(completion)
        message_index += tail.message_index
        is_content += [s and t != close_id for s, t in zip(sampled, completion)]
        is_content += tail.is_content
        sampled_mask = [False] * n_prompt
        sampled_mask += sampled
        sampled_mask += tail.sampled_mask
        prefix += tail.token_ids
        image_ids += tail.mm_token_type_ids
        return RenderedTokens(token_ids=prefix, message_index=message_index, sampled_mask=sampled_mask,
                              is_content=is_content, mm_token_type_ids=image_ids, images=[*prev_images, *tail.images])

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
        for segment in segments:
            if isinstance(segment, Text):
                run.append(segment)
                continue
            if run:
                self._emit_text_run(run, out)
                run = []
            if isinstance(segment, Special):
                if segment.token:
                    self._emit(out, self.token_id(segment.token), segment.message_index, False)
            elif isinstance(segment, Image):
                self._emit_image(segment, out, offset)
        if run:
            self._emit_text_run(run, out)
        out.sampled_mask.extend([False] * len(out.token_ids))  # assembled tokens are never sampled
        return out

    def _emit(self, out: RenderedTokens, token_id: int, message_index: int, is_content: bool) -> None:
        out.token_ids.append(token_id)
        out.message_index.append(message_index)
        out.is_content.append(is_content)
        out.mm_token_type_ids.append(1 if token_id == self.image_pad_id else 0)

    def _emit_text_run(self, run: list[Text], out: RenderedTokens) -> None:
        texts = tuple(t.text for t in run)
        if any(t.is_content for t in run) or sum(map(len, texts)) > 256:
            ids, owners = self._encode_run(texts)
        else:  # template text: a handful of distinct strings, tokenized once per renderer
            cached = self._scaffold_runs.get(texts)
            if cached is None:
                if len(self._scaffold_runs) >= 1024:
                    self._scaffold_runs.clear()
                cached = self._scaffold_runs[texts] = self._encode_run(texts)
            ids, owners = cached
        n = len(ids)
        out.token_ids.extend(ids)
        if owners is None:
            out.message_index.extend([run[0].message_index] * n)
            out.is_content.extend([run[0].is_content] * n)
        else:
            out.message_index.extend([run[k].message_index for k in owners])
            out.is_content.extend([run[k].is_content for k in owners])
        out.mm_token_type_ids.extend([0] * n)  # text never yields the (special) pad id

    def _encode_run(self, texts: tuple[str, ...]) -> tuple[list[int], list[int] | None]:
        """Ids of the joined texts and, for several texts, which text each token starts in."""
        text = "".join(texts)
        if self._tag_split is not None and "<" in text:
            pieces = self._tag_split.split(text)
        else:
            pieces = [text]
        ids: list[int] = []
        starts: list[int] = []
        position, several = 0, len(texts) > 1
        for piece in pieces:
            if not piece:
                continue
            tag_id = self._tag_ids.get(piece)
            if tag_id is not None:  # split() returns the tags as their own pieces
                ids.append(tag_id)
                starts.append(position)
            else:
                encoded = self._text_encoder.encode(piece, add_special_tokens=False)
                ids += encoded.ids
                if several:
                    starts += [position + start for start, _ in encoded.offsets]
            position += len(piece)
        if not several:
            return ids, None
        owners, member, end = [], 0, len(texts[0])
        for start in starts:  # token starts ascend, so one pass over the texts' bounds
            while start >= end and member < len(texts) - 1:
                member += 1
                end += len(texts[member])
            owners.append(member)
        return ids, owners

    def _pad_run(self, n: int) -> tuple[list[int], list[bool], list[int]]:
        """(n pad ids, n True, n ones): an image's constant columns, built once per length."""
        run = self._pad_runs.get(n)
        if run is None:
            if len(self._pad_runs) >= 64:  # ~5 MB at most for 1080p-sized runs
                self._pad_runs.clear()
            run = self._pad_runs[n] = ([self.image_pad_id] * n, [True] * n, [1] * n)
        return run

    def _emit_image(self, image: Image, out: RenderedTokens, offset: int) -> None:
        try:
            verify_ref(image.ref, self.spec, stage=f"{self.family} renderer")
        except ContractMismatchError as exc:
            raise RenderError(f"message {image.message_index}: {exc}") from None
        for token_id in self.image_prefix_ids():
            self._emit(out, token_id, image.message_index, True)
        n = image.ref.num_tokens
        slot = ImageSlot(ref=image.ref, offset=offset + len(out.token_ids), length=n)
        # Bulk extends from lists built once per length: a 1080p Qwen2-VL image is 2,691 pads.
        pads, trues, ones = self._pad_run(n)
        out.token_ids.extend(pads)
        out.message_index.extend([image.message_index] * n)
        out.is_content.extend(trues)
        out.mm_token_type_ids.extend(ones)
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


def _renumber(segments: list[Segment], first: int) -> list[Segment]:
    """Segments of new messages numbered from ``first`` in the whole conversation (scaffold stays -1)."""
    out: list[Segment] = []
    for s in segments:
        if isinstance(s, (Text, Special, Image)) and s.message_index >= 0:
            s = dataclasses.replace(s, message_index=s.message_index + first)
        out.append(s)
    return out


def text_only_encoder(tokenizer: Any) -> Any:
    """A ``tokenizers.Tokenizer`` over ``tokenizer``'s vocabulary with no added tokens.

    It shares the BPE model (no copy), so special-token strings in text encode as plain
    text, as ``split_special_tokens=True`` does, without mutating the shared tokenizer.
    """
    from tokenizers import Tokenizer

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise RenderError(f"renderers need a fast (tokenizers-backed) tokenizer, got {type(tokenizer).__name__}")
    encoder = Tokenizer(backend.model)  # the model object is shared, not copied
    encoder.normalizer = backend.normalizer
    encoder.pre_tokenizer = backend.pre_tokenizer
    encoder.post_processor = backend.post_processor
    encoder.decoder = backend.decoder
    return encoder


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
