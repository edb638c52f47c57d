"""Run every benchmark and write ``docs/benchmarks.md``: one table of figures with their baselines.

    uv run python benchmarks/run_all.py            # all benchmarks (a few minutes on 2 cores)
    uv run python benchmarks/run_all.py layout     # only some

Each benchmark script prints one JSON line; ``ROWS`` says which of its keys make a row:
(figure, value key, baseline key, ratio key, target). A ratio is always measured against a
baseline from the same run.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DOC = HERE.parent / "docs" / "benchmarks.md"

# benchmark -> rows of (figure, value key, baseline key, ratio key, target text)
ROWS: dict[str, list[tuple[str, str, str | None, str | None, str]]] = {
    "layout": [("describe_image vs processor call, 1080p (ns)", "describe_image_ns", "processor_call_ns_1080p",
                "speedup_vs_processor", ">= 10,000x"),
               ("largest ref, 720p/1080p/4K (bytes)", "max_ref_bytes", None, None, "<= 512 B")],
    "render": [("raw render, 4 turns x 8 1080p (ms) vs apply_chat_template + processor", "raw_render_8x1080p_ms",
                "processor_path_8x1080p_ms", "speedup_vs_processor", ">= 1,000x"),
               ("bridge cost turn 32 / turn 2", "bridge_growth_turn32_over_turn2", None, None, "flat"),
               ("full re-render / bridge at turn 32", "full_over_bridge_turn32", None, None, "")],
    "prepare": [("prepare_images vs decode+sha256+write floor, unique (MB/s)", "unique.prepare_mb_s",
                 "unique.floor_mb_s", "unique.ratio", ">= 0.8 of floor"),
                ("same, each image 4x (MB/s)", "dup4.prepare_mb_s", "dup4.floor_mb_s", "dup4.ratio", ">= 0.8 of floor")],
    "inference": [("requests/s, 64 concurrent 2-image requests, cache on vs off", "cache_on.requests_per_s",
                   "cache_off.requests_per_s", "cache_speedup", ""),
                  ("p95 latency cache on (s)", "cache_on.p95_s", "cache_off.p95_s", None, ""),
                  ("request bytes, refs vs base64 pixel_values", "request_bytes_refs", "request_bytes_pixel_values",
                   "wire_ratio", ">= 1,000x smaller")],
    "trainer": [("materialize 64 samples (s) vs floor", "materialize_s", "floor_s", "materialize_over_floor",
                 "<= 1.25x floor"),
                ("per-slot processing (s) vs materialize", "naive_per_slot_s", "materialize_s",
                 "naive_over_materialize", ""),
                ("packing occupancy, long-tailed lengths (%)", "packing_occupancy_pct", None, None, ">= 95 %")],
    "e2e": [("mmref rl step (s) vs a bare in-memory loop, same model/task/batch", "mmref_rl_step_s", "bare_step_s",
             "rl_over_bare", "<= 3x")],
    "transport": [("ZMQ loopback throughput (MB/s)", "throughput_mb_s", None, None, ""),
                  ("micro-batches/s", "micro_batches_per_s", None, None, ""),
                  ("bytes per step, refs vs pixel_values", "ref_bytes_per_step", "pixel_values_bytes_per_step",
                   "pixels_over_refs", "")],
}


def lookup(result: dict, dotted: str | None):
    value = result
    for key in (dotted or "").split("."):
        if not dotted:
            return None
        value = value.get(key) if isinstance(value, dict) else None
    return value


def run(name: str, timeout_s: float = 900) -> dict:
    """Run ``bench_<name>.py`` in a fresh interpreter and parse its JSON line."""
    start = time.perf_counter()
    out = subprocess.run([sys.executable, str(HERE / f"bench_{name}.py")], capture_output=True, text=True,
                         timeout=timeout_s, check=False)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"bench_{name}.py failed (exit {out.returncode}): {out.stderr[-2000:]}")
    result = json.loads(lines[-1])
    result["_seconds"] = time.perf_counter() - start
    return result


def table(results: dict[str, dict]) -> str:
    lines = ["| benchmark | figure | value | baseline (same run) | ratio | target |", "|---|---|---|---|---|---|"]
    for name, result in results.items():
        for figure, value, baseline, ratio, target in ROWS[name]:
            cells = [lookup(result, value), lookup(result, baseline), lookup(result, ratio)]
            shown = ["" if c is None else f"{c:,}" if isinstance(c, (int, float)) else str(c) for c in cells]
            lines.append(f"| {name} | {figure} | {shown[0]} | {shown[1]} | {shown[2]} | {target} |")
    return "\n".join(lines)


def main(names: list[str]) -> None:
    names = names or list(ROWS)
    results = {}
    for name in names:
        print(f"running bench_{name}.py ...", flush=True)
        results[name] = run(name)
        print(f"  done in {results[name]['_seconds']:.0f} s", flush=True)
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text(
        "# Benchmarks\n\n"
        f"Written by `benchmarks/run_all.py` on {platform.machine()} with {platform.python_version()}; "
        "each ratio is against a baseline measured in the same run. Raw JSON lines below the table.\n\n"
        + table(results) + "\n\n```\n" + "\n".join(json.dumps(r) for r in results.values()) + "\n```\n"
    )
    print(f"wrote {DOC}")


if __name__ == "__main__":
    main(sys.argv[1:])
