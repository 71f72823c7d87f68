"""Prometheus metrics of ``llamaproc serve``.

:class:`ServeMetrics` owns its own :class:`~prometheus_client.CollectorRegistry`
(nothing leaks into the process-wide default registry). Request counters and
histograms are updated by the HTTP and socket front ends; the pool's state
(queue depth, in flight, loaded models, loads, evictions, restarts) is read
from the pool at scrape time, so it can never drift from the truth. So are
the rpc workers' gauges, from the :class:`~._workers.WorkerRegistry`: a worker
the registry forgets leaves no series behind. So are the event feed's
subscribers and the events slow subscribers lost.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ..runtime import Phase
from ..types import Reshard
from ._workers import STATES

if TYPE_CHECKING:
    from ..runtime import ModelPool
    from ._events import EventFeed
    from ._workers import WorkerRegistry

__all__ = ["CONTENT_TYPE", "ServeMetrics"]

#: The ``Content-Type`` of :meth:`ServeMetrics.render`'s output.
CONTENT_TYPE = CONTENT_TYPE_LATEST

#: Label used for requests naming a model that is not configured (bounds the label set).
UNKNOWN_MODEL = "(unknown)"

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_TTFT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_RESUME_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)


class ServeMetrics:
    """The daemon's counters, histograms and pool gauges.

    ``api`` labels say which front end served a request: ``"http"`` or
    ``"socket"``. Model names that the pool does not know are recorded as
    ``"(unknown)"`` so that clients cannot grow the label set at will.
    """

    def __init__(self, pool: ModelPool | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._pool: ModelPool | None = None
        self._names: frozenset[str] = frozenset()
        self.requests = Counter(
            "llamaproc_requests",
            "Requests answered, by model, front end and outcome (an HTTP status code or an error code).",
            ["model", "api", "status"],
            registry=self.registry,
        )
        self.in_progress = Gauge(
            "llamaproc_requests_in_progress",
            "Requests being handled now (queued or generating).",
            ["model", "api"],
            registry=self.registry,
        )
        self.tokens = Counter(
            "llamaproc_generated_tokens",
            "Tokens generated.",
            ["model", "api"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "llamaproc_request_duration_seconds",
            "Time from a request's arrival to its last byte, queueing included.",
            ["model", "api"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.ttft = Histogram(
            "llamaproc_time_to_first_token_seconds",
            "Time from a request's arrival to its first generated token, queueing and loading included.",
            ["model"],
            buckets=_TTFT_BUCKETS,
            registry=self.registry,
        )
        self.reshards = Counter(
            "llamaproc_reshards",
            "Recoveries of a sharded model's streams from lost rpc workers.",
            ["model"],
            registry=self.registry,
        )
        self.resume = Histogram(
            "llamaproc_resume_seconds",
            "Time from detecting lost rpc workers to the stream's next token.",
            ["model"],
            buckets=_RESUME_BUCKETS,
            registry=self.registry,
        )
        self._workers: WorkerRegistry | None = None
        self._events: EventFeed | None = None
        self.registry.register(_PoolCollector(self))
        self.registry.register(_WorkerCollector(self))
        self.registry.register(_EventCollector(self))
        if pool is not None:
            self.attach(pool)

    def attach(self, pool: ModelPool) -> None:
        """Read the pool's state at every scrape from now on."""
        self._pool = pool
        self._names = frozenset(pool.names())

    def attach_workers(self, workers: WorkerRegistry) -> None:
        """Read the rpc workers' gauges from ``workers`` at every scrape from now on."""
        self._workers = workers

    def attach_events(self, events: EventFeed) -> None:
        """Read the event feed's subscribers and losses from ``events`` at every scrape from now on."""
        self._events = events

    def record_reshard(self, model: str, reshard: Reshard | Mapping[str, Any]) -> None:
        """Count a reshard of ``model``: a new coordinator over the workers left (a :class:`Reshard` or its JSON)."""
        self.reshards.labels(self.label(model)).inc()

    def record_resume(self, model: str, reshard: Reshard | Mapping[str, Any]) -> None:
        """The resume latency of one stream of ``model`` cut by a reshard: from detection to its next token."""
        seconds = reshard.seconds if isinstance(reshard, Reshard) else reshard.get("seconds")
        if isinstance(seconds, (int, float)) and not isinstance(seconds, bool) and seconds >= 0:
            self.resume.labels(self.label(model)).observe(seconds)

    def label(self, model: str) -> str:
        """The ``model`` label for a requested name."""
        if self._pool is None or model in self._names:
            return model
        return UNKNOWN_MODEL

    def request_started(self, model: str, api: str) -> None:
        self.in_progress.labels(self.label(model), api).inc()

    def request_done(self, model: str, api: str, status: str, seconds: float, tokens: int) -> None:
        """Record a finished request. Call exactly once per :meth:`request_started`."""
        model = self.label(model)
        self.in_progress.labels(model, api).dec()
        self.requests.labels(model, api, status).inc()
        self.latency.labels(model, api).observe(seconds)
        if tokens:
            self.tokens.labels(model, api).inc(tokens)

    def first_token(self, model: str, seconds: float) -> None:
        self.ttft.labels(self.label(model)).observe(seconds)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)


class _PoolCollector(Collector):
    """Gauges and counters read from the pool at scrape time."""

    def __init__(self, metrics: ServeMetrics) -> None:
        self._metrics = metrics

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        pool = self._metrics._pool
        if pool is None:
            return
        statuses = pool.status()
        queued = GaugeMetricFamily("llamaproc_model_queue_depth", "Requests waiting for a slot.", labels=["model"])
        in_flight = GaugeMetricFamily("llamaproc_model_in_flight", "Requests holding a slot.", labels=["model"])
        loaded = GaugeMetricFamily("llamaproc_model_loaded", "1 when the model is loaded.", labels=["model"])
        phase = GaugeMetricFamily(
            "llamaproc_model_phase",
            "1 for the model's current phase, 0 for the others (one series per phase).",
            labels=["model", "phase"],
        )
        restarts = CounterMetricFamily(
            "llamaproc_model_restarts", "Restarts of the model's llama-server after a crash.", labels=["model"]
        )
        lease = GaugeMetricFamily(
            "llamaproc_model_lease_bytes",
            "Memory the model holds in the ledger (0 without a lease), by device.",
            labels=["model", "device"],
        )
        for s in statuses:
            model = pool.config.models.get(s.name)  # absent while a removed model drains
            device = s.lease.device if s.lease else model.device if model is not None else "cpu"
            lease.add_metric([s.name, device], s.lease.memory if s.lease else 0)
            queued.add_metric([s.name], s.queued)
            in_flight.add_metric([s.name], s.in_flight)
            loaded.add_metric([s.name], 1 if s.loaded else 0)
            for each in Phase:
                phase.add_metric([s.name, str(each)], 1 if s.phase == each else 0)
            restarts.add_metric([s.name], s.restarts)
        yield queued
        yield in_flight
        yield loaded
        yield phase
        yield restarts
        if pool.ledger is not None:
            yield lease
        yield GaugeMetricFamily(
            "llamaproc_loaded_models", "Models loaded now.", value=sum(1 for s in statuses if s.loaded)
        )
        stats = pool.stats
        yield CounterMetricFamily("llamaproc_loads", "Model loads (first loads and reloads).", value=stats.loads)
        yield CounterMetricFamily("llamaproc_evictions", "Models unloaded to make room.", value=stats.evictions)
        yield CounterMetricFamily("llamaproc_restarts", "Restarts after a crash, all models.", value=stats.restarts)
        yield CounterMetricFamily(
            "llamaproc_idle_unloads", "Models unloaded after idle_timeout.", value=stats.idle_unloads
        )
        if pool.ledger is not None:
            yield CounterMetricFamily(
                "llamaproc_preemptions",
                "Models unloaded to give their lease to a waiter of higher priority.",
                value=stats.preemptions,
            )
            yield CounterMetricFamily(
                "llamaproc_leases_lost", "Models stopped because their lease was lost.", value=stats.leases_lost
            )


class _WorkerCollector(Collector):
    """The rpc workers' gauges, read from the registry at scrape time (one series per worker it knows)."""

    def __init__(self, metrics: ServeMetrics) -> None:
        self._metrics = metrics

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        registry = self._metrics._workers
        if registry is None:
            return
        layers = GaugeMetricFamily(
            "llamaproc_worker_layers",
            "Layers of a model a worker holds (the worker is labelled by its address).",
            labels=["worker", "model"],
        )
        state = GaugeMetricFamily(
            "llamaproc_worker_state",
            "1 for the worker's current state (ready, in use, lost), 0 for the others.",
            labels=["worker", "state"],
        )
        for entry, now in registry.states():
            if entry.model is not None and entry.layers is not None:
                layers.add_metric([entry.address, entry.model], len(entry.layers))
            for each in STATES:
                state.add_metric([entry.address, each], 1 if now == each else 0)
        yield layers
        yield state


class _EventCollector(Collector):
    """The event feed's subscribers and the events slow subscribers lost, read at scrape time."""

    def __init__(self, metrics: ServeMetrics) -> None:
        self._metrics = metrics

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        events = self._metrics._events
        if events is None:
            return
        yield GaugeMetricFamily(
            "llamaproc_event_subscribers", "Clients following GET /api/events.", value=len(events.subscribers)
        )
        yield CounterMetricFamily(
            "llamaproc_events_dropped",
            "Events of GET /api/events that slow subscribers lost (each was told how many).",
            value=events.dropped,
        )
