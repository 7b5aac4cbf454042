# -*- test-case-name: tests.test_demo -*-
"""
The shop's ``/metrics``: txfiberdb's Prometheus collectors
(:mod:`txfiberdb.prometheus`, on ``prometheus_client``) and the few figures
that are the demo's own, in one registry per service.

- requests by route and status and their latencies:
  ``klein_demo_http_requests_total``, ``klein_demo_http_request_duration_seconds``
  (:class:`~txfiberdb.prometheus.RouteMetrics`, FiberRoutes' ``on_response``);
- the pool, the fibers, the LISTEN connection and the replicas:
  ``txfiberdb_*`` (:class:`~txfiberdb.prometheus.PoolCollector`);
- the demo's: units of work in flight, start time, and which worker process
  answered (``--workers N``: each scrape is answered by one worker, so
  Prometheus should scrape each worker, or aggregate by ``pid``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric

from txfiberdb.prometheus import PoolCollector, RouteMetrics
from txfiberdb.workers import worker_index

__all__ = ["CONTENT_TYPE", "Metrics"]

CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"


class _ShopCollector:
    """The demo's own figures, read at each scrape."""

    def __init__(self, db: Any, started: float) -> None:
        self.db = db
        self.started = started

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "klein_demo_units_of_work_inflight",
            "Requests and jobs running in fibers now.",
            value=self.db.inflight,
        )
        yield GaugeMetricFamily(
            "klein_demo_start_time_seconds",
            "When the service started (Unix time).",
            value=self.started,
        )
        info = GaugeMetricFamily(
            "klein_demo_worker_info",
            "The process that answered: its worker number (0: no supervisor) "
            "and pid.",
            labels=["worker", "pid"],
        )
        info.add_metric([str(worker_index() or 0), str(os.getpid())], 1)
        yield info


class Metrics:
    """
    The shop's metrics registry.  :meth:`observe` is FiberRoutes'
    ``on_response`` hook; :meth:`bind` attaches the service whose pool,
    listener and replicas are reported; :meth:`render` is the exposition.
    """

    def __init__(self) -> None:
        self.started = time.time()
        self.registry = CollectorRegistry()
        self.routes = RouteMetrics(self.registry, namespace="klein_demo")
        self._bound = False

    def observe(self, route: str, code: int, seconds: float) -> None:
        """Record one answered request (the ``on_response`` hook of FiberRoutes)."""
        self.routes(route, code, seconds)

    def bind(self, db: Any) -> None:
        """Report ``db``'s (an EngineService's) figures too; once."""
        if self._bound:
            return
        self._bound = True
        self.registry.register(PoolCollector(db))
        self.registry.register(_ShopCollector(db, self.started))

    def render(self) -> bytes:
        """The Prometheus text exposition of everything registered."""
        return generate_latest(self.registry)
