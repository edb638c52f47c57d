"""Run benchmarks and write ``docs/benchmarks.md`` and the README's benchmark excerpt.

    uv run python benchmarks/run_all.py                  # every benchmark (several minutes on 2 cores)
    uv run python benchmarks/run_all.py layout render    # only some; the others keep their earlier figures

Each benchmark script prints one JSON line; ``ROWS`` says which of its keys make a row and
what its target is. Every row says whether its target is met ("met" / "missed"), or "info"
where it has none. A ratio is always measured against a baseline from the same run.
Benchmarks not run this time keep the JSON line of the report they come from, and their rows
say "earlier run". The README's table between the ``benchmarks:start``/``end`` markers is
copied from the same rows (those marked for it), so no figure there is typed by hand.
"""

from __future__ import annotations

import json
import operator
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
DOC = HERE.parent / "docs" / "benchmarks.md"
README = HERE.parent / "README.md"
README_START, README_END = "<!-- benchmarks:start (written by benchmarks/run_all.py) -->", "<!-- benchmarks:end -->"


@dataclass(frozen=True)
class Target:
    """``key op bound`` on a benchmark's JSON, shown as ``text``."""

    text: str
    key: str
    op: str  # ">=", "<=", "<"
    bound: float

    def met(self, result: dict) -> bool | None:
        value = lookup(result, self.key)
        if value is None:
            return None
        return {">=": operator.ge, "<=": operator.le, "<": operator.lt}[self.op](value, self.bound)


@dataclass(frozen=True)
class Row:
    figure: str
    value: str
    baseline: str | None = None
    ratio: str | None = None
    target: Target | None = None
    readme: bool = False  # also in the README's excerpt


ROWS: dict[str, list[Row]] = {
    "layout": [
        Row("describe_image vs processor call, 1080p (ns)", "describe_image_ns", "processor_call_ns_1080p",
            "speedup_vs_processor", Target(">= 10,000x", "speedup_vs_processor", ">=", 10_000), readme=True),
        Row("largest ref, 720p/1080p/4K (bytes)", "max_ref_bytes", None, None,
            Target("<= 512 B", "max_ref_bytes", "<=", 512), readme=True),
    ],
    "render": [
        Row("raw render, 4 turns x 8 1080p, cold refs (ms) vs apply_chat_template + processor (ms)",
            "cold_render_8x1080p_ms", "processor_path_8x1080p_ms", "cold_speedup_vs_processor",
            Target(">= 1,000x", "cold_speedup_vs_processor", ">=", 1000), readme=True),
        Row("same, warm refs (parsed by an earlier render) (ms)", "warm_render_8x1080p_ms",
            "processor_path_8x1080p_ms", "warm_speedup_vs_processor", readme=True),
        Row("bridge at turn 32, 31 screenshots in the prefix (ms)", "bridge_ms_turn_32", None, None,
            Target("< 1 ms", "bridge_ms_turn_32", "<", 1.0), readme=True),
        Row("bridge turn 32 / turn 2 (not flat: copies the prefix's per-token lists)",
            "bridge_growth_turn32_over_turn2", readme=True),
        Row("bridge cost per prefix token (ns)", "bridge_ns_per_prefix_token"),
        Row("full re-render at turn 32 (ms) vs bridge (ms)", "full_render_ms_turn_32", "bridge_ms_turn_32",
            "full_over_bridge_turn32"),
        Row("create_renderer (ms) vs the tokenizer deep copy it used to make (ms)", "create_renderer_ms",
            "tokenizer_deepcopy_ms", "deepcopy_over_create", readme=True),
    ],
    "prepare": [
        Row("prepare_images vs decode+sha256+write floor, unique (MB/s)", "unique.prepare_mb_s", "unique.floor_mb_s",
            "unique.ratio", Target(">= 0.8 of floor", "unique.ratio", ">=", 0.8), readme=True),
        Row("same, each image 4x (MB/s)", "dup4.prepare_mb_s", "dup4.floor_mb_s", "dup4.ratio",
            Target(">= 0.8 of floor", "dup4.ratio", ">=", 0.8)),
    ],
    "inference": [
        Row("requests/s, 64 concurrent 2-image requests, cache on vs off", "cache_on.requests_per_s",
            "cache_off.requests_per_s", "cache_speedup", readme=True),
        Row("p95 latency cache on (s)", "cache_on.p95_s", "cache_off.p95_s"),
        Row("request bytes, refs vs base64 pixel_values", "request_bytes_refs", "request_bytes_pixel_values",
            "wire_ratio", Target(">= 1,000x smaller", "wire_ratio", ">=", 1000), readme=True),
    ],
    "trainer": [
        Row("materialize 64 samples (s) vs floor", "materialize_s", "floor_s", "materialize_over_floor",
            Target("<= 1.25x floor", "materialize_over_floor", "<=", 1.25), readme=True),
        Row("materialize inside a full step of 4 micro-batches (s) vs floor", "step_split_s.materialize", "floor_s",
            "step_materialize_over_floor", Target("<= 1.25x floor", "step_materialize_over_floor", "<=", 1.25)),
        Row("images processed in that step per unique image", "step_images_over_unique", None, None,
            Target("<= 1 (once per step)", "step_images_over_unique", "<=", 1.0)),
        Row("per-slot processing (s) vs materialize", "naive_per_slot_s", "materialize_s", "naive_over_materialize"),
        Row("packing occupancy, long-tailed lengths (%)", "packing_occupancy_pct", None, None,
            Target(">= 95 %", "packing_occupancy_pct", ">=", 95), readme=True),
    ],
    "e2e": [
        Row("mmref rl step, learnability.toml as shipped (max_async = 1) (s) vs a bare in-memory GRPO loop (s)",
            "mmref_rl_step_s_max_async_1", "bare_step_s", "rl_over_bare_max_async_1",
            Target("<= 5x", "rl_over_bare_max_async_1", "<=", 5.0), readme=True),
        Row("same, max_async = 0 (s) vs the bare loop (s)", "mmref_rl_step_s", "bare_step_s", "rl_over_bare"),
    ],
    "learning": [
        Row("color-codeword, 5 seeds: last-5 reward, worst seed", "min_last5", None, None,
            Target(">= 0.9", "min_last5", ">=", 0.9), readme=True),
        Row("lowest reward after first reaching 0.85, worst seed", "min_after_crossing_085", None, None,
            Target(">= 0.7", "min_after_crossing_085", ">=", 0.7), readme=True),
        Row("wall seconds per run, slowest seed (2 cores)", "max_wall_s", None, None,
            Target("<= 300 s", "max_wall_s", "<=", 300), readme=True),
        Row("blank images: last-5 reward (chance 0.25)", "max_blank_last5", None, None,
            Target("<= 0.35", "max_blank_last5", "<=", 0.35), readme=True),
    ],
    "memory": [
        Row("peak memory of one step, bf16 + gradient checkpointing vs fp32 (bytes), 250M params",
            "bf16_gc.peak_bytes", "fp32.peak_bytes", "bf16_gc_over_fp32_peak",
            Target("<= 0.6x fp32", "bf16_gc_over_fp32_peak", "<=", 0.6), readme=True),
        Row("trainer bytes per parameter, fp32 (AdamW minimum 16)", "fp32.bytes_per_param", "fp32.min_bytes_per_param",
            "fp32.over_min"),
        Row("trainer bytes per parameter, bf16 + checkpointing (minimum 8)", "bf16_gc.bytes_per_param",
            "bf16_gc.min_bytes_per_param", "bf16_gc.over_min"),
        Row("in-process weight handover (s/GB) vs one plain file write (s/GB)", "sync.handover_s_per_gb",
            "sync.floor_write_s_per_gb", "sync.handover_over_floor", Target("< 1x floor", "sync.handover_over_floor",
                                                                           "<", 1.0), readme=True),
        Row("rank sync: bf16 shards written + loaded by the server (s/GB) vs the write floor",
            "sync.file_sync_s_per_gb", "sync.floor_write_s_per_gb", "sync.file_sync_over_floor",
            Target("<= 4x floor", "sync.file_sync_over_floor", "<=", 4.0), readme=True),
    ],
    "transport": [
        Row("ZMQ loopback throughput (MB/s)", "throughput_mb_s"),
        Row("micro-batches/s", "micro_batches_per_s"),
        Row("bytes per step, refs + compact arrays vs pixel_values", "ref_bytes_per_step",
            "pixel_values_bytes_per_step", "pixels_over_refs",
            Target(">= 1,000x smaller", "pixels_over_refs", ">=", 1000), readme=True),
        Row("same step as plain msgpack lists vs compact (bytes)", "plain_msgpack_bytes_per_step",
            "ref_bytes_per_step", "plain_over_compact"),
    ],
}


# Run only when named (``run_all.py learning``): bench_learning.py trains 6 runs of about 4 minutes;
# bench_memory.py steps a 250M-parameter model twice on CPU (about 2 minutes).
LONG = frozenset({"learning", "memory"})


def lookup(result: dict, dotted: str | None):
    if not dotted:
        return None
    value = result
    for key in dotted.split("."):
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
    result["_load_avg_1m"] = round(os.getloadavg()[0], 2)  # other work on the machine skews absolute times
    return result


def earlier_results() -> dict[str, dict]:
    """The JSON lines of the current report, by benchmark name (empty if there is none)."""
    if not DOC.exists():
        return {}
    found = {}
    for line in DOC.read_text().splitlines():
        if line.startswith("{"):
            result = json.loads(line)
            found[result["benchmark"]] = result
    return found


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value)
    return f"{value:,}" if isinstance(value, (int, float)) else str(value)


def rows(results: dict[str, dict]) -> list[dict[str, str]]:
    out = []
    for name, result in results.items():
        for row in ROWS[name]:
            met = row.target.met(result) if row.target else None
            out.append({
                "benchmark": name + (" (earlier run)" if result.get("_earlier") else ""),
                "figure": row.figure, "value": _cell(lookup(result, row.value)),
                "baseline": _cell(lookup(result, row.baseline)), "ratio": _cell(lookup(result, row.ratio)),
                "target": row.target.text if row.target else "", "readme": row.readme,
                "met": "info" if row.target is None else "no figure" if met is None else "met" if met else "missed",
            })
    return out


def table(results: dict[str, dict]) -> str:
    lines = ["| benchmark | figure | value | baseline (same run) | ratio | target | met |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['benchmark']} | {r['figure']} | {r['value']} | {r['baseline']} | {r['ratio']} | {r['target']} "
              f"| {r['met']} |" for r in rows(results)]
    return "\n".join(lines)


def readme_excerpt(results: dict[str, dict]) -> str:
    lines = ["| benchmark | figure | value | vs | ratio | target | met |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['benchmark']} | {r['figure']} | {r['value']} | {r['baseline']} | {r['ratio']} | {r['target']} "
              f"| {r['met']} |" for r in rows(results) if r["readme"]]
    return "\n".join(lines)


def write_readme(results: dict[str, dict]) -> None:
    text = README.read_text()
    pattern = re.compile(re.escape(README_START) + ".*?" + re.escape(README_END), re.DOTALL)
    if not pattern.search(text):
        raise RuntimeError(f"README.md lacks the markers {README_START!r} ... {README_END!r}")
    block = f"{README_START}\n{readme_excerpt(results)}\n{README_END}"
    README.write_text(pattern.sub(lambda _: block, text))


def main(names: list[str]) -> None:
    unknown = sorted(set(names) - set(ROWS))
    if unknown:
        raise SystemExit(f"unknown benchmarks {unknown}; known: {list(ROWS)}")
    names = names or [name for name in ROWS if name not in LONG]
    earlier = earlier_results()
    results = {}
    for name in ROWS:
        if name in names:
            print(f"running bench_{name}.py ...", flush=True)
            results[name] = run(name)
            print(f"  done in {results[name]['_seconds']:.0f} s", flush=True)
        elif name in earlier:
            results[name] = {**earlier[name], "_earlier": True}
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text(
        "# Benchmarks\n\n"
        f"Written by `benchmarks/run_all.py` on {platform.machine()} with {platform.python_version()}; "
        "each ratio is against a baseline measured in the same run. \"met\" compares the figure with its target; "
        "\"info\" rows have none. Rows marked \"earlier run\" were not re-run this time and keep the figures of the "
        "report they come from (their JSON lines say `\"_earlier\": true`). Each JSON line records the machine's "
        f"1-minute load average when its benchmark ended (`_load_avg_1m`, {os.cpu_count()} cores): other work "
        "slows absolute times, and the processor baselines (multi-threaded torch) more than single-threaded "
        "rendering. Raw JSON lines below the table.\n\n"
        + table(results) + "\n\n```\n" + "\n".join(json.dumps(r) for r in results.values()) + "\n```\n"
    )
    write_readme(results)
    print(f"wrote {DOC} and the README excerpt")


if __name__ == "__main__":
    main(sys.argv[1:])
