"""``mmref demo``: generated screenshots into a store, their refs and layouts per family.

Shows the contract at work without a model: every image is written once to the
content-addressed store, its ref is computed by layout math for each family, and the
ref's size is compared with the float32 ``pixel_values`` the processor would produce.
"""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image, ImageDraw
from rich.console import Console
from rich.table import Table

from mmref.renderers import FAMILIES, ImageStore, describe_image, layout_spec, make_ref, parse_ref

SCREENSHOTS = {"720p": (1280, 720), "1080p": (1920, 1080), "4K": (3840, 2160)}


def screenshot_png(width: int, height: int, seed: int = 0) -> bytes:
    """A synthetic UI-like screenshot (flat panels and text bars) encoded as PNG."""
    image = Image.new("RGB", (width, height), (245, 245, 247))
    draw = ImageDraw.Draw(image)
    draw.rectangle([0, 0, width, height // 14], fill=(40, 44, 52))
    for i in range(12):
        y = height // 8 + i * height // 16
        draw.rectangle([width // 20, y, width // 20 + (seed * 37 + i * 97) % (width // 2) + width // 4, y + height // 40],
                       fill=((i * 40 + seed * 11) % 255, 120, 200 - i * 10))
    buffer = io.BytesIO()
    image.save(buffer, "PNG", optimize=False)
    return buffer.getvalue()


def pixel_values_bytes(family: str, width: int, height: int) -> int:
    """Bytes of float32 pixel_values the family's processor makes for this image size."""
    spec = layout_spec(family)
    return spec.pixel_values_nbytes(describe_image(spec, width, height).grid_thw)


def run_demo(store_root: str | Path, console: Console | None = None) -> list[dict]:
    """Write the screenshots, build their refs for every family, print and return the rows."""
    console = console or Console()
    store = ImageStore(store_root)
    table = Table(title=f"refs vs pixels (store: {store.url})")
    for column in ("image", "family", "grid_thw", "tokens", "file KB", "ref B", "pixel_values MB", "pixels/ref"):
        table.add_column(column, justify="right")
    rows = []
    for name, (width, height) in SCREENSHOTS.items():
        stored = store.put_bytes(screenshot_png(width, height), "image/png")
        for family in FAMILIES:
            ref = make_ref(layout_spec(family), stored)
            encoded = ref.encode()
            assert parse_ref(encoded) == ref
            pixels = pixel_values_bytes(family, width, height)
            rows.append(dict(image=name, family=family, grid_thw=ref.grid_thw, num_tokens=ref.num_tokens,
                             file_bytes=stored.nbytes, ref_bytes=len(encoded), pixel_values_bytes=pixels))
            table.add_row(name, family, "x".join(map(str, ref.grid_thw)), str(ref.num_tokens),
                          f"{stored.nbytes / 1024:.0f}", str(len(encoded)), f"{pixels / 2**20:.1f}",
                          f"{pixels / len(encoded):,.0f}x")
        console.print(f"[bold]{name}[/] {width}x{height} -> {stored.asset} ({stored.nbytes / 1024:.0f} KB)")
        console.print(f"  {make_ref(layout_spec('qwen2-vl'), stored).encode()[:96]}…")
    console.print(table)
    return rows
