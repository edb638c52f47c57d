"""Prometheus text metrics of the inference server (counters, gauges, a latency summary)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from mmref.trainer.inference.feature_cache import CacheStats


@dataclass
class ServerMetrics:
    requests: Counter = field(default_factory=Counter)  # by status code
    latency_sum: float = 0.0
    latency_count: int = 0
    tokens_generated: int = 0

    def observe(self, status: int, seconds: float) -> None:
        self.requests[status] += 1
        self.latency_sum += seconds
        self.latency_count += 1

    def render(self, cache: CacheStats, cache_bytes: int, weight_version: int) -> str:
        """The /metrics page."""
        lines = ["# TYPE mmref_requests_total counter"]
        lines += [f'mmref_requests_total{{status="{code}"}} {n}' for code, n in sorted(self.requests.items())]
        lines += [
            "# TYPE mmref_request_latency_seconds summary",
            f"mmref_request_latency_seconds_sum {self.latency_sum:.6f}",
            f"mmref_request_latency_seconds_count {self.latency_count}",
            "# TYPE mmref_tokens_generated_total counter", f"mmref_tokens_generated_total {self.tokens_generated}",
            "# TYPE mmref_feature_cache_hits_total counter", f"mmref_feature_cache_hits_total {cache.hits}",
            "# TYPE mmref_feature_cache_misses_total counter", f"mmref_feature_cache_misses_total {cache.misses}",
            "# TYPE mmref_feature_cache_evictions_total counter", f"mmref_feature_cache_evictions_total {cache.evictions}",
            "# TYPE mmref_feature_cache_bytes gauge", f"mmref_feature_cache_bytes {cache_bytes}",
            "# TYPE mmref_images_processed_total counter", f"mmref_images_processed_total {cache.processed}",
            "# TYPE mmref_weight_version gauge", f"mmref_weight_version {weight_version}",
        ]
        return "\n".join(lines) + "\n"


def parse_metrics(text: str) -> dict[str, float]:
    """``name{labels} value`` lines of a metrics page as a dict (for tests and clients)."""
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values
