"""Every metric chatpipe exposes, defined in one place (names are part of the operator interface)."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class LoopHistogram(Collector):
    """A Prometheus histogram for one thread's hot path (an event loop's): `observe` is a bisect and two
    additions, with no lock (prometheus_client's Histogram takes a lock per bucket and for the sum: about
    0.6 us, against 0.1). Observe it from one thread only; `collect` may run on any (a scrape racing an
    observation may see the count and the sum one observation apart, as Prometheus tolerates).
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        buckets: Sequence[float],
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.bounds = tuple(float(b) for b in buckets)
        if list(self.bounds) != sorted(set(self.bounds)):
            raise ValueError("buckets must be strictly increasing")
        self.labels = [repr(b) for b in self.bounds] + ["+Inf"]  # `le`, as prometheus_client writes it
        self.counts = [0] * len(self.labels)  # the last one is +Inf
        self.sum = 0.0
        if registry is not None:
            registry.register(self)

    def observe(self, amount: float) -> None:
        # bisect_left: a value equal to a bound falls in that bound's bucket (le is inclusive)
        self.counts[bisect_left(self.bounds, amount)] += 1
        self.sum += amount

    def collect(self) -> Iterator[HistogramMetricFamily]:
        counts, total = list(self.counts), self.sum
        cumulative, buckets = 0, []
        for label, n in zip(self.labels, counts, strict=True):
            cumulative += n
            buckets.append((label, cumulative))
        yield HistogramMetricFamily(self.name, self.documentation, buckets=buckets, sum_value=total)


class IngestMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.webhooks = Counter(
            "chatpipe_ingest_webhooks_total",
            "Webhooks by kind and outcome",
            ["kind", "outcome"],
            registry=registry,
        )
        self.auth_failures = Counter(
            "chatpipe_ingest_auth_failures_total",
            "Requests refused by authentication",
            ["reason"],
            registry=registry,
        )
        self.dead_letters = Counter(
            "chatpipe_ingest_dead_letters_total",
            "Requests parked in the dead-letter topic",
            ["reason"],
            registry=registry,
        )
        self.spool_depth = Gauge(
            "chatpipe_ingest_spool_depth", "Events waiting in the local spool", registry=registry
        )
        self.spool_stalled = Gauge(
            "chatpipe_ingest_spool_stalled",
            "1 while the spool holds records it cannot drain (see /readyz for why)",
            registry=registry,
        )
        self.spool_drain_failures = Counter(
            "chatpipe_ingest_spool_drain_failures_total",
            "Spool drain rounds that stopped on a record the broker did not take",
            registry=registry,
        )
        # its value is computed when scraped (Intake binds the function)
        self.spool_drain_age = Gauge(
            "chatpipe_ingest_spool_drain_age_seconds",
            "Seconds since the spool last drained a record or was empty (0 while empty)",
            registry=registry,
        )
        self.producer_replacements = Counter(
            "chatpipe_ingest_producer_replacements_total",
            "Kafka producers replaced by a new one, by cause (fenced, fatal, timed_out, idempotence, stuck, "
            "failing)",
            ["cause"],
            registry=registry,
        )
        # observed on the event loop for every webhook: lock-free
        self.produce_latency = LoopHistogram(
            "chatpipe_ingest_produce_seconds",
            "Time from produce to broker ack",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.request_latency = LoopHistogram(
            "chatpipe_ingest_request_seconds",
            "Webhook request latency",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )


class ProcessorMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.events = Counter(
            "chatpipe_processor_events_total", "Receipts processed by outcome", ["outcome"], registry=registry
        )
        self.states_emitted = Counter(
            "chatpipe_processor_states_emitted_total", "Message-state versions emitted", registry=registry
        )
        self.dead_letters = Counter(
            "chatpipe_processor_dead_letters_total",
            "Records parked in chatpipe.processor.dlq (acked by the broker) by the stage that failed:"
            " decode (the record) or fold (the pure core, the stored state or the outputs of its umid)"
            " for receipts; inbound_decode or inbound_fold (its conversation) for inbound messages",
            ["stage"],
            registry=registry,
        )


class SinkMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.rows = Counter(
            "chatpipe_sink_records_total",
            "Records consumed by topic and outcome",
            ["topic", "outcome"],
            registry=registry,
        )
        self.batch_seconds = Histogram(
            "chatpipe_sink_batch_seconds",
            "Time to write one batch",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.store_up = Gauge("chatpipe_sink_store_up", "1 when the store accepts writes", registry=registry)


class ApiMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "chatpipe_api_requests_total",
            "Read API requests by route and status",
            ["route", "status"],
            registry=registry,
        )


class ReconcilerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "chatpipe_reconciler_requests_total",
            "Requests to 8x8 Retrieve message details by HTTP status (timeout/error: no answer)",
            ["status"],
            registry=registry,
        )
        self.receipts = Counter(
            "chatpipe_reconciler_receipts_total", "Synthetic delivery receipts produced", registry=registry
        )
        self.rate_limited_waits = Counter(
            "chatpipe_reconciler_rate_limited_waits_total",
            "Waits before a request: spacing (our pacing per subaccount) or quota (8x8 answered 429)",
            ["reason"],
            registry=registry,
        )
        self.lookups = Counter(
            "chatpipe_reconciler_lookups_total", "Lookups by outcome", ["outcome"], registry=registry
        )
        self.candidates = Gauge(
            "chatpipe_reconciler_candidates", "Messages picked by the last pass", registry=registry
        )
        self.slowed = Gauge(
            "chatpipe_reconciler_slowed_subaccounts",
            "Subaccounts slowed down by a 429 within the cooldown (the circuit is open or half-open)",
            registry=registry,
        )
        self.last_pass = Gauge(
            "chatpipe_reconciler_last_pass_timestamp_seconds",
            "When the last pass completed (Unix time)",
            registry=registry,
        )
