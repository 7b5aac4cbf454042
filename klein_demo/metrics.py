# -*- test-case-name: tests.test_demo -*-
"""
Request counters and latency histograms, rendered with the pool and fiber
counters of txfiberdb in the Prometheus text format (version 0.0.4).  No
client library needed: the format is a few lines of text.
"""

from __future__ import annotations

import bisect
import os
import time
from collections import defaultdict
from typing import Any, Optional

from txfiberdb import listener_stats, pool_stats
from txfiberdb.workers import worker_index

__all__ = ["CONTENT_TYPE", "Metrics"]

CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# listener_stats key -> (metric name, type, help)
_LISTENER_METRICS = [
    (
        "connected",
        "txfiberdb_listener_connected",
        "gauge",
        "Whether the LISTEN connection is up (1) or not (0).",
    ),
    (
        "subscribers",
        "txfiberdb_listener_subscribers",
        "gauge",
        "Subscriptions open (the demo: /events streams).",
    ),
    (
        "received",
        "txfiberdb_listener_notifications_total",
        "counter",
        "Notifications received by the listener.",
    ),
    (
        "reconnects",
        "txfiberdb_listener_reconnects_total",
        "counter",
        "Times the LISTEN connection was lost and opened again.",
    ),
    (
        "overflows",
        "txfiberdb_listener_overflows",
        "gauge",
        "Queue overflows of the open subscriptions (slow subscribers).",
    ),
]

# pool_stats key -> (metric name, type, help)
_POOL_METRICS = [
    ("size", "txfiberdb_pool_size", "gauge", "The pool's pool_size setting."),
    (
        "open",
        "txfiberdb_pool_open_connections",
        "gauge",
        "Connections open (checked out and idle).",
    ),
    (
        "checked_out",
        "txfiberdb_pool_checked_out",
        "gauge",
        "Connections in use by fibers.",
    ),
    ("idle", "txfiberdb_pool_idle", "gauge", "Idle connections in the pool."),
    (
        "overflow",
        "txfiberdb_pool_overflow",
        "gauge",
        "Connections open beyond pool_size.",
    ),
    (
        "waiting",
        "txfiberdb_pool_waiting",
        "gauge",
        "Fibers parked waiting for a connection.",
    ),
    (
        "oldest_wait",
        "txfiberdb_pool_oldest_wait_seconds",
        "gauge",
        "How long the longest-waiting fiber has waited so far.",
    ),
    (
        "longest_wait",
        "txfiberdb_pool_longest_wait_seconds",
        "gauge",
        "The longest wait for a connection since start.",
    ),
    (
        "fibers_live",
        "txfiberdb_fibers_live",
        "gauge",
        "Fibers started and not finished.",
    ),
    (
        "fibers_parked",
        "txfiberdb_fibers_parked",
        "gauge",
        "Fibers waiting on a Deferred.",
    ),
    ("fibers_started", "txfiberdb_fibers_started_total", "counter", "Fibers started."),
    (
        "fibers_finished",
        "txfiberdb_fibers_finished_total",
        "counter",
        "Fibers finished.",
    ),
    (
        "longest_hold",
        "txfiberdb_fiber_longest_hold_seconds",
        "gauge",
        "The longest a fiber held the reactor without waiting.",
    ),
]


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _num(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    return repr(float(value))


class Metrics:
    """Counts requests by route and status, and their latencies by route."""

    def __init__(self) -> None:
        self.started = time.time()
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        # route -> [count per bucket (not cumulative), ..., +Inf], sum
        self.latency: dict[str, list[Any]] = {}

    def observe(self, route: str, code: int, seconds: float) -> None:
        """Record one answered request (the ``on_response`` hook of FiberRoutes)."""
        self.requests[(route, code)] += 1
        entry = self.latency.get(route)
        if entry is None:
            entry = self.latency[route] = [[0] * (len(BUCKETS) + 1), 0.0]
        entry[0][bisect.bisect_left(BUCKETS, seconds)] += 1
        entry[1] += seconds

    def render(
        self,
        engine: Optional[Any] = None,
        inflight: Optional[int] = None,
        router: Optional[Any] = None,
    ) -> str:
        out: list[str] = []

        def head(name: str, kind: str, help_: str) -> None:
            out.append(f"# HELP {name} {help_}")
            out.append(f"# TYPE {name} {kind}")

        head(
            "klein_demo_http_requests_total",
            "counter",
            "HTTP requests answered, by route and status (499: the client went away).",
        )
        for (route, code), n in sorted(self.requests.items()):
            labels = f'route="{_label(route)}",code="{code}"'
            out.append(f"klein_demo_http_requests_total{{{labels}}} {n}")
        name = "klein_demo_http_request_duration_seconds"
        head(
            name, "histogram", "Time from receiving a request to its answer, by route."
        )
        for route, (counts, total) in sorted(self.latency.items()):
            r = _label(route)
            cumulative = 0
            for bound, n in zip(BUCKETS, counts[:-1], strict=True):
                cumulative += n
                out.append(f'{name}_bucket{{route="{r}",le="{bound}"}} {cumulative}')
            cumulative += counts[-1]
            out.append(f'{name}_bucket{{route="{r}",le="+Inf"}} {cumulative}')
            out.append(f'{name}_sum{{route="{r}"}} {_num(total)}')
            out.append(f'{name}_count{{route="{r}"}} {cumulative}')
        if inflight is not None:
            head(
                "klein_demo_units_of_work_inflight",
                "gauge",
                "Requests and jobs running in fibers now.",
            )
            out.append(f"klein_demo_units_of_work_inflight {inflight}")
        if engine is not None:
            stats = pool_stats(engine)
            if "idle" in stats:
                stats["open"] = stats["checked_out"] + stats["idle"]
            for key, metric, kind, help_ in _POOL_METRICS:
                value = stats.get(key)
                if value is None:
                    continue
                head(metric, kind, help_)
                out.append(f"{metric} {_num(value)}")
            live = listener_stats(engine)
            for key, metric, kind, help_ in _LISTENER_METRICS:
                head(metric, kind, help_)
                out.append(f"{metric} {_num(int(live[key]))}")
        if router is not None and router.replicas:
            head(
                "txfiberdb_reads_total",
                "counter",
                "Read-only Sessions by where they read: replica, primary (no "
                "replica configured) or fallback (no replica answered).",
            )
            for target in ("replica", "primary", "fallback"):
                out.append(
                    f'txfiberdb_reads_total{{target="{target}"}} {router.stats[target]}'
                )
            head(
                "txfiberdb_replicas_down",
                "gauge",
                "Replicas set aside now (their last connection attempt failed).",
            )
            out.append(f"txfiberdb_replicas_down {router.replicas_down()}")
        head(
            "klein_demo_start_time_seconds",
            "gauge",
            "When the service started (Unix time).",
        )
        out.append(f"klein_demo_start_time_seconds {_num(self.started)}")
        # Per process: with --workers N each scrape is answered by one worker.
        head(
            "klein_demo_worker_info",
            "gauge",
            "The process that answered: its worker number (0: no supervisor) and pid.",
        )
        out.append(
            f'klein_demo_worker_info{{worker="{worker_index() or 0}",'
            f'pid="{os.getpid()}"}} 1'
        )
        return "\n".join(out) + "\n"
