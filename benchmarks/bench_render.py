"""Raw-mode rendering vs the transformers processor path, and bridge vs full re-render.

Prints one JSON line. Targets: raw render of a 4-turn conversation with 8 1080p
screenshots >= 1000x faster than apply_chat_template + processor; the cost of turn k by
bridge stays flat as k grows to 32, well under a millisecond per new image.
"""

from __future__ import annotations

import io
import json
import sys
import tempfile
from pathlib import Path

from PIL import Image

from mmref.renderers import ImageStore, layout_spec, make_ref
from mmref.renderers.processed import reference_processor
from mmref.renderers.render import chat_template, create_renderer
from mmref.renderers.tokenizer import qwen2_tokenizer
from mmref.trainer.demo import screenshot_png

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import median_seconds  # noqa: E402

FAMILY = "qwen2-vl"


def conversation(parts: list, turns: int, per_turn: int) -> list[dict]:
    messages = [{"role": "system", "content": "You operate a computer."}]
    for t in range(turns):
        content = parts[t * per_turn:(t + 1) * per_turn] + [{"type": "text", "text": f"Step {t}: what changed?"}]
        messages.append({"role": "user", "content": content})
        if t < turns - 1:
            messages.append({"role": "assistant", "content": f"Clicked button {t}."})
    return messages


def main() -> dict:
    tokenizer, spec = qwen2_tokenizer(), layout_spec(FAMILY)
    renderer = create_renderer(tokenizer, FAMILY)
    store = ImageStore(tempfile.mkdtemp(prefix="mmref-bench-render-"))
    pngs = [screenshot_png(1920, 1080, seed=i) for i in range(8)]
    refs = [make_ref(spec, store.put_bytes(p, "image/png")).encode() for p in pngs]
    ours = conversation([{"type": "image_url", "image_url": {"url": r}} for r in refs], turns=4, per_turn=2)
    theirs = conversation([{"type": "image"}] * 8, turns=4, per_turn=2)
    raw_s = median_seconds(lambda: renderer.render(ours), 50)

    processor = reference_processor(tokenizer, spec, chat_template(FAMILY))

    def processor_path():
        text = processor.apply_chat_template(theirs, tokenize=False, add_generation_prompt=True)
        images = [Image.open(io.BytesIO(p)).convert("RGB") for p in pngs]
        return processor(text=[text], images=images)

    processor_s = median_seconds(processor_path, 3)
    assert processor_path()["input_ids"][0] == renderer.render(ours).token_ids

    # Turn k: one new small screenshot per turn; bridge vs full render of the whole conversation.
    small = [make_ref(spec, store.put_bytes(screenshot_png(640, 360, seed=100 + i), "image/png")).encode()
             for i in range(32)]
    history = [{"role": "system", "content": "You operate a computer."}]
    prompt, bridge_ms, full_ms = None, {}, {}
    reply = tokenizer.encode("Clicked.", add_special_tokens=False) + [151645]
    for k in range(1, 33):
        new = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": small[k - 1]}},
                                            {"type": "text", "text": f"turn {k}"}]}]
        if prompt is not None:
            args = (prompt.token_ids, reply, new, prompt.images)
            bridge_ms[k] = median_seconds(lambda: renderer.bridge_to_next_turn(*args), 20) * 1e3
            bridged = renderer.bridge_to_next_turn(*args)
        history += new
        full_ms[k] = median_seconds(lambda: renderer.render(history), 5) * 1e3
        prompt = bridged if k > 1 else renderer.render(history)
        history.append({"role": "assistant", "content": "Clicked."})
    result = {
        "benchmark": "render",
        "raw_render_8x1080p_ms": round(raw_s * 1e3, 3),
        "processor_path_8x1080p_ms": round(processor_s * 1e3, 1),
        "speedup_vs_processor": round(processor_s / raw_s),
        "target_speedup": 1000,
        "bridge_ms_turn_2_8_16_32": [round(bridge_ms[k], 3) for k in (2, 8, 16, 32)],
        "full_render_ms_turn_2_8_16_32": [round(full_ms[k], 3) for k in (2, 8, 16, 32)],
        "bridge_growth_turn32_over_turn2": round(bridge_ms[32] / bridge_ms[2], 2),
        "full_over_bridge_turn32": round(full_ms[32] / bridge_ms[32], 1),
    }
    result["ok"] = result["speedup_vs_processor"] >= 1000 and bridge_ms[32] < 1.0
    return result


if __name__ == "__main__":
    print(json.dumps(main()))
