"""Renderers: chat messages with image refs to exact token ids, per model family.

    >>> renderer = create_renderer(qwen2_tokenizer(), "qwen2-vl")      # doctest: +SKIP
    >>> rendered = renderer.render(messages)                            # doctest: +SKIP
    >>> rendered.token_ids, rendered.images                             # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

from mmref.renderers.errors import RenderError
from mmref.renderers.layout import LayoutSpec, layout_spec
from mmref.renderers.render.base import ParsedResponse, ParsedToolCall, RenderedTokens, Renderer
from mmref.renderers.render.kimi import KimiK25Renderer
from mmref.renderers.render.qwen import Qwen2VLRenderer, Qwen3VLRenderer, Qwen25VLRenderer, Qwen35Renderer

RENDERERS: dict[str, type[Renderer]] = {
    cls.family: cls for cls in (Qwen2VLRenderer, Qwen25VLRenderer, Qwen3VLRenderer, Qwen35Renderer, KimiK25Renderer)
}


def create_renderer(tokenizer: Any, family: str, spec: LayoutSpec | None = None, **options: Any) -> Renderer:
    """The renderer of ``family`` over ``tokenizer``; ``spec`` defaults to the family's published layout."""
    if family not in RENDERERS:
        raise RenderError(f"no renderer for family {family!r}; known: {sorted(RENDERERS)}")
    return RENDERERS[family](tokenizer, spec or layout_spec(family), **options)


__all__ = ["CHAT_TEMPLATE_FILES", "chat_template", "ParsedResponse", "ParsedToolCall", "RENDERERS", "RenderedTokens",
           "Renderer", "create_renderer"]


# family -> its published Jinja chat template, shipped in ``mmref/renderers/chat_templates/``.
CHAT_TEMPLATE_FILES = {"qwen2-vl": "qwen2_vl.jinja", "qwen2.5-vl": "qwen2_5_vl.jinja", "qwen3-vl": "qwen3_vl.jinja"}


def chat_template(family: str) -> str:
    """The published Jinja chat template of a Qwen-VL family, as shipped in this package."""
    from importlib import resources

    if family not in CHAT_TEMPLATE_FILES:
        raise RenderError(f"no shipped chat template for {family!r}; have {sorted(CHAT_TEMPLATE_FILES)}")
    return (resources.files("mmref.renderers") / "chat_templates" / CHAT_TEMPLATE_FILES[family]).read_text()
