"""Prometheus metrics of ``mcsd serve`` (``GET /metrics``), named after vLLM's so dashboards and
users recognise them (``vllm:spec_decode_num_drafts`` -> ``mcsd:spec_decode_num_drafts``).

Speculation (one *draft* = one speculative step = one target forward):
- ``mcsd:spec_decode_num_drafts_total``              steps
- ``mcsd:spec_decode_num_draft_tokens_total``        draft tree nodes verified (tree size per step)
- ``mcsd:spec_decode_num_accepted_tokens_total``     draft tokens accepted
- ``mcsd:spec_decode_num_accepted_tokens_per_pos_total{position}``  accepted at depth position+1
- ``mcsd:spec_decode_num_verified_per_pos_total{position}``  steps that verified depth position+1;
  accepted_per_pos / verified_per_pos is the conditional acceptance rate per depth (DESIGN 6)
- ``mcsd:spec_decode_mean_accepted_length``          generation tokens / drafts since start
Batching (vLLM's gauge names where vLLM has one):
- ``mcsd:num_requests_running``   rows generating now; ``mcsd:num_requests_waiting`` queue length
- ``mcsd:batch_size``             histogram of the rows in each engine step
- ``mcsd:request_mean_accepted_length``  histogram, one sample per finished request: its tokens
  per step (the acceptance of that row, whatever else shared the batch)
Requests: ``mcsd:requests_total{outcome}`` (stop, length, cancelled, error, invalid, rejected,
unavailable), prompt / generation token counters, and histograms of time to first
token, inter-token latency (time between consecutive streamed steps; one step can carry several
tokens), time per output token (per request, after the first), queue time and end-to-end latency.
Every ``Metrics`` has its own registry, so several servers can live in one process (tests).
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from mcsd.stats import Stats, StepRecord

CONTENT_TYPE = CONTENT_TYPE_LATEST  # of GET /metrics
PREFIX = "mcsd:"
OUTCOMES = ("stop", "length", "cancelled", "error", "invalid", "rejected", "unavailable")
# Buckets as vLLM's (seconds), reaching down to the millisecond steps of tiny models.
TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
)
STEP_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)  # the padded batch sizes a runtime captures
ACCEPTED_LENGTH_BUCKETS = (1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 8.0, 12.0, 16.0)
REQUEST_BUCKETS = (
    0.01,
    0.1,
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
    1920.0,
    7680.0,
)


class Metrics:
    """All counters of one server; thread-safe (the worker thread updates them)."""

    def __init__(self, running: Callable[[], int], waiting: Callable[[], int]) -> None:
        self.registry = CollectorRegistry()
        self._steps = 0  # running totals behind the mean accepted length gauge
        self._tokens = 0

        def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
            return Counter(PREFIX + name, doc, labels, registry=self.registry)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(PREFIX + name, doc, buckets=buckets, registry=self.registry)

        self.drafts = counter("spec_decode_num_drafts", "Speculative steps (target forwards).")
        self.draft_tokens = counter(
            "spec_decode_num_draft_tokens", "Draft tree nodes verified by the target."
        )
        self.accepted_tokens = counter(
            "spec_decode_num_accepted_tokens", "Draft tokens accepted by verification."
        )
        self.accepted_per_pos = counter(
            "spec_decode_num_accepted_tokens_per_pos",
            "Draft tokens accepted at tree depth position+1.",
            ("position",),
        )
        self.verified_per_pos = counter(
            "spec_decode_num_verified_per_pos",
            "Steps whose verification reached tree depth position+1.",
            ("position",),
        )
        self.requests = counter("requests", "Requests by outcome.", ("outcome",))
        for outcome in OUTCOMES:
            self.requests.labels(outcome)  # export zeros, so rates exist from the start
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of generated requests.")
        self.generation_tokens = counter("generation_tokens", "Tokens generated.")
        mean = Gauge(
            PREFIX + "spec_decode_mean_accepted_length",
            "Tokens generated per speculative step since the server started.",
            registry=self.registry,
        )
        mean.set_function(self._mean_accepted_length)
        Gauge(
            PREFIX + "num_requests_running",
            "Requests generating now (rows of the engine's batch).",
            registry=self.registry,
        ).set_function(running)
        Gauge(
            PREFIX + "num_requests_waiting",
            "Requests waiting in the queue.",
            registry=self.registry,
        ).set_function(waiting)
        self.ttft = histogram(
            "time_to_first_token_seconds", "Arrival to first token.", TTFT_BUCKETS
        )
        self.itl = histogram(
            "inter_token_latency_seconds", "Time between consecutive streamed steps.", STEP_BUCKETS
        )
        self.tpot = histogram(
            "time_per_output_token_seconds",
            "Per request: (last token - first token time) / (tokens - 1).",
            STEP_BUCKETS,
        )
        self.queue_time = histogram(
            "request_queue_time_seconds", "Arrival to start of generation.", REQUEST_BUCKETS
        )
        self.batch_size = histogram(
            "batch_size", "Rows decoded together in one engine step.", BATCH_BUCKETS
        )
        self.row_accepted_length = histogram(
            "request_mean_accepted_length",
            "Per finished request: its generated tokens per speculative step.",
            ACCEPTED_LENGTH_BUCKETS,
        )
        self.e2e = histogram(
            "e2e_request_latency_seconds", "Arrival to end of generation.", REQUEST_BUCKETS
        )

    def _mean_accepted_length(self) -> float:
        return self._tokens / self._steps if self._steps else 0.0

    def observe_step(self, record: StepRecord, tokens: int) -> None:
        """One speculative step that sent ``tokens`` tokens (fewer than ``record.emitted`` when a
        stop string ended the text early). Called by the single worker thread only."""
        self._steps += 1
        self._tokens += tokens
        self.generation_tokens.inc(tokens)
        self.drafts.inc()
        self.draft_tokens.inc(record.tree_size)
        self.accepted_tokens.inc(record.accepted)
        for position in range(record.attempted):
            self.verified_per_pos.labels(str(position)).inc()
        for position in range(record.accepted):
            self.accepted_per_pos.labels(str(position)).inc()

    def observe_batch(self, rows: int) -> None:
        """One engine step decoded ``rows`` requests together."""
        self.batch_size.observe(rows)

    def observe_row(self, stats: Stats) -> None:
        """A request finished; ``stats`` are its own steps (one row of the batch)."""
        if stats.steps:
            self.row_accepted_length.observe(stats.mean_accepted_length)

    def render(self) -> bytes:
        return generate_latest(self.registry)
