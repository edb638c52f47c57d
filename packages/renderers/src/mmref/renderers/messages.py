"""Typed OpenAI-style chat messages, as renderers accept them.

Content is a string or a list of parts; in raw mode every image part is the canonical
ref form the client writes::

    {"type": "image_url", "image_url": {"url": "mmref:v1:..."}}

Anything else in an image position (a data URL, an http URL, an HF ``{"type": "image"}``
part) is a ``RenderError`` that says to run ``prepare_images`` first.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from mmref.renderers.errors import RefError, RenderError
from mmref.renderers.refs import RawImageRef, is_ref_string, parse_ref, reject_pixel_payload


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")


class TextPart(_Frozen):
    """A run of text."""

    type: Literal["text"] = "text"
    text: str


class ImageURL(_Frozen):
    url: str


class ImagePart(_Frozen):
    """An image, canonically a ref string in ``image_url.url``."""

    type: Literal["image_url"] = "image_url"
    image_url: ImageURL

    @property
    def ref(self) -> RawImageRef:
        """The parsed ref (raises ``RenderError`` when the url is not a ref)."""
        if not is_ref_string(self.image_url.url):
            scheme = self.image_url.url.split(":", 1)[0][:16]
            raise RenderError(
                f"image part url starts with {scheme!r}: raw-mode renderers take only store refs "
                "('mmref:v1:...'); run mmref.client.prepare_images on the request first"
            )
        try:
            return parse_ref(self.image_url.url)
        except RefError as exc:
            raise RenderError(f"image part carries an invalid ref: {exc}") from None


Part = TextPart | ImagePart


class FunctionCall(_Frozen):
    name: str
    arguments: str | dict[str, Any] = "{}"


class ToolCall(_Frozen):
    """An assistant's call of a tool (OpenAI shape)."""

    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Frozen):
    """One chat message."""

    role: Literal["system", "user", "assistant", "tool"]
    content: str | list[Part] | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCall] = Field(default_factory=list)
    tool_call_id: str | None = None
    name: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _typed_parts(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [_part(p) for p in value]
        return value

    @field_validator("tool_calls", mode="before")
    @classmethod
    def _no_null_calls(cls, value: Any) -> Any:
        return value or []

    @property
    def parts(self) -> list[Part]:
        """Content as a list of parts (a string becomes one text part)."""
        if self.content is None:
            return []
        if isinstance(self.content, str):
            return [TextPart(text=self.content)]
        return list(self.content)

    @property
    def images(self) -> list[ImagePart]:
        return [p for p in self.parts if isinstance(p, ImagePart)]


def _part(raw: Any) -> Part:
    if isinstance(raw, (TextPart, ImagePart)):
        return raw
    if not isinstance(raw, dict):
        raise RenderError(f"content part must be an object, got {type(raw).__name__}")
    kind = raw.get("type")
    if kind == "text":
        return TextPart(text=raw.get("text", ""))
    if kind == "image_url":
        url = raw.get("image_url")
        if not isinstance(url, dict) or not isinstance(url.get("url"), str):
            raise RenderError("image_url part needs an object {'url': 'mmref:v1:...'}")
        return ImagePart(image_url=ImageURL(url=url["url"]))
    if kind in ("image", "input_image") or "image" in raw:
        raise RenderError(f"image part of type {kind!r} is not a store ref; run mmref.client.prepare_images first")
    raise RenderError(f"unsupported content part type {kind!r}; expected 'text' or 'image_url'")


def parse_messages(messages: Sequence[Message | dict[str, Any]]) -> list[Message]:
    """Validate OpenAI-style dicts into ``Message`` models; errors name the message index."""
    parsed = []
    for index, message in enumerate(messages):
        if isinstance(message, Message):
            parsed.append(message)
            continue
        if not isinstance(message, dict):
            raise RenderError(f"message {index} must be an object, got {type(message).__name__}")
        try:
            reject_pixel_payload(message, f"message {index}")
        except RefError as exc:
            raise RenderError(str(exc)) from None
        try:
            parsed.append(Message.model_validate(message))
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise RenderError(f"message {index} is invalid: {problems}") from None
    return parsed
