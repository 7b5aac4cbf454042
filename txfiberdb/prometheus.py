# -*- test-case-name: tests.test_observability -*-
"""
Prometheus metrics for a txfiberdb service, on ``prometheus_client`` (the
``txfiberdb[prometheus]`` extra).

>>> from prometheus_client import CollectorRegistry
>>> registry = CollectorRegistry()
>>> registry.register(PoolCollector(db))          # doctest: +SKIP
>>> routes = FiberRoutes(db, app, on_response=RouteMetrics(registry))  # doctest: +SKIP
>>> root.putChild(b"metrics", MetricsResource(registry))  # doctest: +SKIP

- :class:`PoolCollector`: the pool's and the fibers' figures
  (:func:`txfiberdb.pool_stats`), read at each scrape: ``txfiberdb_pool_*``
  (size, open, checked out, idle, overflow, waiting, oldest and longest
  wait), ``txfiberdb_fibers_*``, the LISTEN connection's
  ``txfiberdb_listener_*`` and, for an
  :class:`~txfiberdb.service.EngineService`, the units of work in flight and,
  with replicas, ``txfiberdb_reads_total{target}`` and
  ``txfiberdb_replicas_down``.  Open and idle count only live connections.
- :class:`RouteMetrics`: the ``on_response`` hook of
  :class:`~txfiberdb.klein.FiberRoutes`: requests by route and status code (499
  when the client went away first) and a latency histogram by route.
- :class:`MetricsResource`: the exposition as a twisted.web resource,
  rendered on the reactor's thread.  (Not ``prometheus_client.twisted``'s,
  a WSGI resource that runs in the reactor's thread pool: the pool's figures
  must be read where the pool is used.)

Everything is computed on the reactor's thread: a scrape never waits for the
pool or the database.  With several worker processes each process serves its
own figures (scrape each, or aggregate in Prometheus).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Optional

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from twisted.web.resource import Resource

from txfiberdb.notify import listener_stats
from txfiberdb.pool import pool_stats

__all__ = ["MetricsResource", "PoolCollector", "RouteMetrics"]

#: Latency buckets (seconds) of :class:`RouteMetrics`: 1 ms to 10 s.
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# pool_stats key -> (metric name, counter?, help)
_POOL = [
    ("size", "pool_size", False, "The pool's pool_size setting."),
    (
        "open",
        "pool_open_connections",
        False,
        "Live connections (checked out and idle).",
    ),
    ("checked_out", "pool_checked_out", False, "Connections in use by fibers."),
    ("idle", "pool_idle", False, "Live idle connections in the pool."),
    ("overflow", "pool_overflow", False, "Connections open beyond pool_size."),
    ("waiting", "pool_waiting", False, "Fibers parked waiting for a connection."),
    (
        "oldest_wait",
        "pool_oldest_wait_seconds",
        False,
        "How long the longest-waiting fiber has waited so far.",
    ),
    (
        "longest_wait",
        "pool_longest_wait_seconds",
        False,
        "The longest wait for a connection since start.",
    ),
    ("fibers_live", "fibers_live", False, "Fibers started and not finished."),
    ("fibers_parked", "fibers_parked", False, "Fibers waiting on a Deferred."),
    ("fibers_started", "fibers_started", True, "Fibers started."),
    ("fibers_finished", "fibers_finished", True, "Fibers finished."),
    (
        "longest_hold",
        "fiber_longest_hold_seconds",
        False,
        "The longest a fiber held the reactor without waiting.",
    ),
]


class PoolCollector:
    """
    A ``prometheus_client`` collector of :func:`txfiberdb.pool_stats` (and,
    for an EngineService, its units of work in flight).

    :param target: an :class:`~txfiberdb.service.EngineService` (its engine
        is looked up at each scrape) or an Engine.
    :param namespace: the metric names' prefix.
    """

    def __init__(self, target: Any, namespace: str = "txfiberdb") -> None:
        self.target = target
        self.namespace = namespace

    def describe(self) -> list[Metric]:
        # Names only (prometheus_client checks them for clashes at
        # registration); the figures are read at each scrape.
        return []

    def collect(self) -> Iterator[Metric]:
        engine = getattr(self.target, "engine", self.target)
        if engine is not None:
            stats = pool_stats(engine)
            for key, name, counter, help_ in _POOL:
                value = stats.get(key)
                if value is None:
                    continue
                full = f"{self.namespace}_{name}"
                family = (
                    CounterMetricFamily(full, help_, value=value)
                    if counter
                    else GaugeMetricFamily(full, help_, value=value)
                )
                yield family
        inflight = getattr(self.target, "inflight", None)
        if isinstance(inflight, int):
            yield GaugeMetricFamily(
                f"{self.namespace}_units_of_work_inflight",
                "Units of work (requests, jobs) running in fibers now.",
                value=inflight,
            )
        if engine is not None:
            yield from self._listener(engine)
        router = getattr(self.target, "router", None)
        if router is not None and getattr(router, "replicas", None):
            reads = CounterMetricFamily(
                f"{self.namespace}_reads",
                "Read-only Sessions by where they read: replica, primary (no "
                "replica configured) or fallback (no replica answered).",
                labels=["target"],
            )
            for where in ("replica", "primary", "fallback"):
                reads.add_metric([where], router.stats[where])
            yield reads
            yield GaugeMetricFamily(
                f"{self.namespace}_replicas_down",
                "Replicas set aside now (their last connection attempt failed).",
                value=router.replicas_down(),
            )

    def _listener(self, engine: Any) -> Iterator[Metric]:
        """The LISTEN connection's figures (:func:`txfiberdb.listen`)."""
        live = listener_stats(engine)
        name = f"{self.namespace}_listener"
        yield GaugeMetricFamily(
            f"{name}_connected",
            "Whether the LISTEN connection is up (1) or not (0).",
            value=int(live["connected"]),
        )
        yield GaugeMetricFamily(
            f"{name}_subscribers",
            "Subscriptions open.",
            value=live["subscribers"],
        )
        yield CounterMetricFamily(
            f"{name}_notifications",
            "Notifications received by the listener.",
            value=live["received"],
        )
        yield CounterMetricFamily(
            f"{name}_reconnects",
            "Times the LISTEN connection was lost and opened again.",
            value=live["reconnects"],
        )
        yield GaugeMetricFamily(
            f"{name}_overflows",
            "Queue overflows of the open subscriptions (slow subscribers).",
            value=live["overflows"],
        )


class RouteMetrics:
    """
    The ``on_response`` hook of :class:`~txfiberdb.klein.FiberRoutes`:
    ``<namespace>_http_requests_total{route, code}`` and the histogram
    ``<namespace>_http_request_duration_seconds{route}``.

    Routes outside FiberRoutes (a health check on the reactor) may call it
    too: ``metrics(name, code, seconds)``.
    """

    def __init__(
        self,
        registry: Optional[CollectorRegistry] = None,
        namespace: str = "txfiberdb",
        buckets: tuple[float, ...] = BUCKETS,
    ) -> None:
        registry = REGISTRY if registry is None else registry
        self.requests = Counter(
            "http_requests",
            "HTTP requests answered, by route and status (499: the client "
            "went away first).",
            ["route", "code"],
            namespace=namespace,
            registry=registry,
        )
        self.latency = Histogram(
            "http_request_duration_seconds",
            "Time from receiving a request to its answer, by route.",
            ["route"],
            namespace=namespace,
            buckets=buckets,
            registry=registry,
        )

    def __call__(self, route: str, code: int, seconds: float) -> None:
        self.requests.labels(route=route, code=str(code)).inc()
        self.latency.labels(route=route).observe(seconds)


class MetricsResource(Resource):
    """
    ``GET``: the Prometheus text exposition of ``registry``, rendered on the
    reactor's thread (collectors such as :class:`PoolCollector` read the pool,
    which only that thread may touch).
    """

    isLeaf = True

    def __init__(self, registry: Optional[CollectorRegistry] = None) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.registry = REGISTRY if registry is None else registry

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode("ascii"))
        return generate_latest(self.registry)
