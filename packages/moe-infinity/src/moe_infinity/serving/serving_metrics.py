"""The server's Prometheus metrics (`GET /metrics`), all named `moe_infinity_*`.

Three kinds of source:

- the HTTP layer counts requests by endpoint and status;
- the engine thread reports latencies and token counts as requests progress (`EngineListener`);
- everything else is read at scrape time from the engine's latest `EngineSnapshot`: queue and
  batch, KV blocks, and the offload runtime's own counters (`moe_core.OffloadStats`: hits,
  misses, bytes over PCIe, experts computed on the CPU, prefetches issued / used / cancelled,
  evictions) and cache occupancy. Only what the runtime reports is exported; nothing is
  estimated.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from moe_infinity.serving.engine_snapshot import EngineSnapshot
from moe_infinity.serving.request import FinishReason

__all__ = ["CONTENT_TYPE", "ServingMetrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0, 30.0, 60.0, 120.0)

# (metric suffix, OffloadStats field, help)
_OFFLOAD_COUNTERS = (
    ("expert_hits", "hits", "Expert uses served from a device slot."),
    ("expert_misses", "misses", "Expert uses that fetched the expert on demand."),
    ("expert_bytes_to_device", "bytes_copied",
     "Bytes of experts moved host-to-device (over PCIe on a GPU), mapped reads included."),
    ("expert_cpu_computed", "cpu_experts", "Expert uses computed on the CPU (the CPU lane)."),
    ("expert_cpu_bytes", "cpu_bytes",
     "Bytes of experts the CPU lane read from host memory (never crossing PCIe)."),
    ("expert_prefetches_issued", "prefetches_issued", "Expert prefetch copies submitted."),
    ("expert_prefetches_used", "prefetches_used", "Prefetched experts used before eviction."),
    ("expert_prefetches_cancelled", "prefetches_cancelled",
     "Prefetches cancelled before their copy started."),
    ("expert_prefetches_wasted", "prefetches_wasted",
     "Prefetched experts evicted or cancelled without a use."),
    ("expert_evictions", "evictions", "Experts evicted from a device slot."),
)


class _SnapshotCollector(Collector):
    """Gauges and runtime counters read from the engine's latest snapshot at scrape time."""

    def __init__(self, snapshot: Callable[[], EngineSnapshot]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        snap = self._snapshot()
        for name, value, text in (
                ("queue_depth", snap.queued, "Requests waiting to start."),
                ("running_requests", snap.running, "Requests in the running batch."),
                ("kv_blocks_used", snap.kv_blocks_used, "KV blocks owned by running requests."),
                ("kv_blocks_total", snap.kv_blocks_total, "KV blocks in the pool."),
                ("expert_cache_resident", snap.experts_resident, "Experts in device slots."),
                ("expert_cache_slots", snap.expert_slots, "Device slots for experts."),
                ("trace_collection_size", snap.traces_collected,
                 "Expert activation matrices in the trace collection.")):
            yield GaugeMetricFamily(f"moe_infinity_{name}", text, value=value)
        occupancy = snap.experts_resident / snap.expert_slots if snap.expert_slots else 0.0
        yield GaugeMetricFamily("moe_infinity_expert_cache_occupancy",
                                "Share of the expert slots holding an expert.", value=occupancy)
        yield CounterMetricFamily("moe_infinity_engine_steps", "Engine steps run.",
                                  value=snap.steps)
        yield CounterMetricFamily("moe_infinity_engine_steps_ahead", "Decode passes enqueued "
                                  "before the previous step's host work.",
                                  value=snap.steps_ahead)
        if snap.offload is not None:
            for name, field, text in _OFFLOAD_COUNTERS:
                yield CounterMetricFamily(f"moe_infinity_{name}", text,
                                          value=getattr(snap.offload, field))


class ServingMetrics:
    """The registry of one server (an `EngineListener` too)."""

    def __init__(self, snapshot: Callable[[], EngineSnapshot]) -> None:
        self.registry = CollectorRegistry()
        self._requests = Counter("moe_infinity_http_requests", "HTTP requests by endpoint and "
                                 "status.", ("endpoint", "status"), registry=self.registry)
        self._finished = Counter("moe_infinity_requests_finished", "Generation requests ended, "
                                 "by reason (stop, length, cancelled).", ("reason",),
                                 registry=self.registry)
        self._ttft = Histogram("moe_infinity_time_to_first_token_seconds", "Arrival to first "
                               "token.", buckets=_LATENCY_BUCKETS, registry=self.registry)
        self._itl = Histogram("moe_infinity_inter_token_seconds", "Between consecutive tokens of "
                              "a request.", buckets=_LATENCY_BUCKETS, registry=self.registry)
        self._e2e = Histogram("moe_infinity_request_seconds", "Arrival to the last token.",
                              buckets=_LATENCY_BUCKETS, registry=self.registry)
        self._prompt = Counter("moe_infinity_prompt_tokens", "Prompt tokens of ended requests.",
                               registry=self.registry)
        self._output = Counter("moe_infinity_generation_tokens", "Tokens generated by ended "
                               "requests.", registry=self.registry)
        self.registry.register(_SnapshotCollector(snapshot))

    def on_http(self, endpoint: str, status: int) -> None:
        """An HTTP request answered."""
        self._requests.labels(endpoint, str(status)).inc()

    def on_first_token(self, seconds: float) -> None:
        """See `EngineListener`."""
        self._ttft.observe(seconds)

    def on_next_token(self, seconds: float) -> None:
        """See `EngineListener`."""
        self._itl.observe(seconds)

    def on_finished(self, reason: FinishReason, seconds: float, num_prompt_tokens: int,
                    num_output_tokens: int) -> None:
        """See `EngineListener`."""
        self._finished.labels(reason).inc()
        self._e2e.observe(seconds)
        self._prompt.inc(num_prompt_tokens)
        self._output.inc(num_output_tokens)

    def render(self) -> bytes:
        """The Prometheus text exposition."""
        return generate_latest(self.registry)
