"""Processed mode (SFT): the raw-mode render plus pixels from the real image processor.

Token ids are exactly raw mode's; the pixels come from transformers'
``Qwen2VLImageProcessorPil`` (Kimi K2.5: ``mmref.renderers.kimi_processor``) configured by
the renderer's ``LayoutSpec``, and each image's
grid is checked against its ref. transformers' processing classes and torch are imported
lazily, so importing this module stays cheap.

    >>> rendered = render_processed(renderer, messages, store)        # doctest: +SKIP
    >>> rendered.pixel_values.shape, rendered.image_grid_thw           # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mmref.renderers.decode import decode_rgb
from mmref.renderers.errors import ContractMismatchError, RenderError
from mmref.renderers.layout import LayoutSpec
from mmref.renderers.render.base import RenderedTokens, Renderer
from mmref.renderers.store import ImageStore


@dataclass(frozen=True)
class ProcessedRender:
    """A render with its pixels.

    pixel_values:   (sum over images of t*h*w, C * temporal_patch * patch * patch) float32
    image_grid_thw: (num_images, 3) int64
    """

    tokens: RenderedTokens
    pixel_values: Any
    image_grid_thw: Any


# image_processor_type values (as configs name them) that each resize rule's PIL processor reads.
PROCESSOR_TYPES = {
    "smart": frozenset({"Qwen2VLImageProcessor", "Qwen2VLImageProcessorFast", "Qwen2VLImageProcessorPil"}),
    "navit": frozenset({"Kimi_K25ImageProcessor", "Kimi_K25ImageProcessorPil"}),
}


def image_processor_class(spec: LayoutSpec) -> type:
    """The PIL image processor class of ``spec``'s resize rule (``from_dict`` reads a saved config)."""
    if spec.resize == "navit":
        from mmref.renderers.kimi_processor import Kimi_K25ImageProcessorPil

        return Kimi_K25ImageProcessorPil
    from transformers import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil


def build_image_processor(spec: LayoutSpec) -> Any:
    """The PIL image processor that implements ``spec``: transformers' Qwen2-VL one (every Qwen family),
    or Kimi K2.5's (``mmref.renderers.kimi_processor``; transformers has it on torchvision only)."""
    cls = image_processor_class(spec)
    if spec.resize == "navit":
        return cls(
            patch_size=spec.patch_size, merge_size=spec.merge_size, max_patches=spec.in_patch_limit,
            size={"max_height": spec.patch_limit_on_one_side, "max_width": spec.patch_limit_on_one_side},
            image_mean=list(spec.image_mean), image_std=list(spec.image_std),
        )
    return cls(
        patch_size=spec.patch_size, merge_size=spec.merge_size, temporal_patch_size=spec.temporal_patch_size,
        size={"shortest_edge": spec.min_pixels, "longest_edge": spec.max_pixels},
        image_mean=list(spec.image_mean), image_std=list(spec.image_std),
    )


def reference_processor(tokenizer: Any, spec: LayoutSpec, chat_template: str | None = None) -> Any:
    """The full transformers processor of ``spec.family`` (for parity checks), without a video processor."""
    from transformers import Qwen2_5_VLProcessor, Qwen2VLProcessor, Qwen3VLProcessor

    base = {"qwen2-vl": Qwen2VLProcessor, "qwen2.5-vl": Qwen2_5_VLProcessor,
            "qwen3-vl": Qwen3VLProcessor, "qwen3.5": Qwen3VLProcessor}.get(spec.family)
    if base is None:
        raise RenderError(f"no transformers processor for family {spec.family!r}")

    class ImageOnlyProcessor(base):  # transformers 5.x insists on a video processor instance
        def check_argument_for_proper_class(self, argument_name: str, argument: Any) -> Any:
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    return ImageOnlyProcessor(image_processor=build_image_processor(spec), tokenizer=tokenizer,
                              video_processor=None, chat_template=chat_template)


def render_processed(renderer: Renderer, messages: Sequence[Any], store: ImageStore, tools: list[dict] | None = None,
                     add_generation_prompt: bool = True, image_processor: Any = None) -> ProcessedRender:
    """Render ``messages`` and process each image's verified bytes into pixel tensors."""
    tokens = renderer.render(messages, tools=tools, add_generation_prompt=add_generation_prompt)
    if not tokens.images:
        return ProcessedRender(tokens, None, None)
    processor = image_processor or build_image_processor(renderer.spec)
    images = [decode_rgb(store.read(slot.ref), slot.ref) for slot in tokens.images]
    out = processor(images=images, return_tensors="pt")
    for slot, grid in zip(tokens.images, out["image_grid_thw"].tolist()):
        if tuple(grid) != tuple(slot.ref.grid_thw):
            raise ContractMismatchError(f"processed mode: image {slot.ref.describe()}: processor grid {tuple(grid)} "
                                        f"!= ref grid_thw {slot.ref.grid_thw}")
    return ProcessedRender(tokens, out["pixel_values"], out["image_grid_thw"])
