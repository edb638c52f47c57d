"""An agent with a tool that returns an image: the model sees a large picture small and may zoom in.

Agent code as it would run against any OpenAI-compatible server: the `openai` SDK, tool
calls, images in messages, several turns. `mmref rl` gives each rollout its own session
URL and trains on what the interception server records (examples/zoom-agent.toml):

    uv run mmref rl examples/zoom-agent.toml

The task of a seed: a 448 x 448 picture with one small coloured square somewhere. The
model first sees it at 112 x 112 (the square is a few pixels); `zoom(x, y, w, h)` crops that
box of the small view from the large picture and returns it as an image. A reply that is
no tool call is the answer; one that names no colour gets a reminder, up to `max_turns`.
"""

from __future__ import annotations

import base64
import io
import json
import random
import string
from typing import Any

from openai import AsyncOpenAI
from PIL import Image, ImageDraw

from mmref.client.environment import Vocabulary

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}
TOOLS = [{"type": "function", "function": {
    "name": "zoom", "description": "Look closer: the box (x, y, w, h) of the image, in its pixels, enlarged.",
    "parameters": {"type": "object", "required": ["x", "y", "w", "h"], "properties": {
        k: {"type": "integer"} for k in ("x", "y", "w", "h")}}}}]


def picture(seed: int, large: int = 448) -> tuple[Image.Image, str]:
    """The seed's large picture and the colour of its square."""
    rng = random.Random(seed)
    colour = rng.choice(sorted(COLOURS))
    image = Image.new("RGB", (large, large), (128, 128, 128))
    side = large // 14
    x, y = rng.randrange(large - side), rng.randrange(large - side)
    ImageDraw.Draw(image).rectangle([x, y, x + side, y + side], fill=COLOURS[colour])
    return image, colour


def data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def zoom(image: Image.Image, scale: float, arguments: str, view: int) -> list[dict[str, Any]]:
    """The tool: the box of the small view, cropped from the large picture; bad arguments get a text reply."""
    try:
        box = json.loads(arguments)
        x, y, w, h = (int(box[k]) for k in ("x", "y", "w", "h"))
    except (ValueError, KeyError, TypeError) as exc:
        return [{"type": "text", "text": f"zoom needs integer x, y, w, h: {exc}"}]
    x, y = min(max(x, 0), view - 1), min(max(y, 0), view - 1)
    w, h = min(max(w, 1), view - x), min(max(h, 1), view - y)
    crop = image.crop((int(x * scale), int(y * scale), int((x + w) * scale), int((y + h) * scale)))
    return [{"type": "image_url", "image_url": {"url": data_url(crop.resize((view, view)))}}]


async def zoom_agent(base_url: str, model: str, seed: int, max_turns: int = 3, small: int = 112,
                     large: int = 448, max_tokens: int = 24, temperature: float = 1.0) -> float:
    """One episode: 1.0 when the final answer names the square's colour, else 0.0."""
    image, colour = picture(seed, large)
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "Name the colour of the small square. Call zoom to look closer."},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(image.resize((small, small)))}},
                                     {"type": "text", "text": "Which colour is the square?"}]}]
    async with AsyncOpenAI(base_url=base_url, api_key="mmref", max_retries=0) as client:
        for _ in range(max_turns):
            reply = (await client.chat.completions.create(model=model, messages=messages, tools=TOOLS,
                                                          max_tokens=max_tokens, temperature=temperature)).choices[0]
            message = reply.message
            messages.append(message.model_dump(exclude_none=True))
            if message.tool_calls:
                messages += [{"role": "tool", "tool_call_id": call.id,
                              "content": zoom(image, large / small, call.function.arguments, small)}
                             for call in message.tool_calls]
                continue
            named = [c for c in COLOURS if c in (message.content or "").lower()]
            if named:
                return float(named == [colour])
            messages.append({"role": "user", "content": "Answer with one colour: red, green, blue or yellow."})
    return 0.0


# For the tiny CPU models (their tokenizer is built from it): colour words as single tokens, printable ASCII.
zoom_agent.vocabulary = Vocabulary(words=tuple(COLOURS), text=string.printable)
