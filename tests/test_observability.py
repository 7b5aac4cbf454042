"""
Tests for txfiberdb.prometheus and txfiberdb.logs: the pool's figures and
route metrics scraped for real, stdlib logging routed to twisted.logger, and
OpenTelemetry's SQLAlchemy instrumentation across concurrent fibers.
"""

import logging

from klein import Klein
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import create_engine, text
from twisted.internet.defer import gatherResults
from twisted.logger import formatEvent, globalLogPublisher
from twisted.web.resource import Resource
from twisted.web.server import Site

from txfiberdb import await_deferred, run_in_fiber, sleep
from txfiberdb.klein import FiberRoutes
from txfiberdb.logs import route_stdlib_logging
from txfiberdb.prometheus import MetricsResource, PoolCollector, RouteMetrics
from txfiberdb.service import EngineService

from .support import DatabaseTestCase
from .test_klein import HTTPClient, HTTPServer


def scrape(registry):
    """{sample name with sorted labels: value} of a registry's exposition."""
    out = {}
    text_ = generate_latest(registry).decode()
    for family in text_string_to_metric_families(text_):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out


class PoolCollectorTests(DatabaseTestCase):
    def test_pool_and_fibers(self):
        service = EngineService(self.url, pool_size=4, max_overflow=2)
        service.startService()
        self.addCleanup(lambda: await_deferred(service.stopService()))
        registry = CollectorRegistry()
        registry.register(PoolCollector(service))

        def query(seconds):
            with service.engine.connect() as conn:
                return conn.execute(
                    text("SELECT pg_backend_pid() FROM pg_sleep(:s)"), {"s": seconds}
                ).scalar()

        running = [service.run(query, 0.3) for _ in range(3)]
        sleep(0.15)
        during = scrape(registry)
        self.assertEqual(during["txfiberdb_pool_checked_out"], 3)
        self.assertEqual(during["txfiberdb_units_of_work_inflight"], 3)
        self.assertEqual(during["txfiberdb_pool_size"], 4)
        pids = await_deferred(gatherResults(running))
        after = scrape(registry)
        self.assertEqual(after["txfiberdb_pool_checked_out"], 0)
        self.assertEqual(after["txfiberdb_pool_open_connections"], 3)
        self.assertGreaterEqual(after["txfiberdb_fibers_started_total"], 3)
        # Connections the server ended while idle are not counted as open.
        self.admin("SELECT pg_terminate_backend(pid) FROM unnest(%s) pid", (pids,))
        sleep(0.2)
        self.assertEqual(scrape(registry)["txfiberdb_pool_open_connections"], 0)

    def test_engine_target_and_not_started(self):
        registry = CollectorRegistry()
        service = EngineService(self.url)
        registry.register(PoolCollector(service))
        self.assertNotIn("txfiberdb_pool_size", scrape(registry))  # no engine yet
        engine = create_engine(self.url, pool_size=2)
        self.addCleanup(engine.dispose)
        other = CollectorRegistry()
        other.register(PoolCollector(engine, namespace="shop"))
        self.assertEqual(scrape(other)["shop_pool_size"], 2)


class RouteMetricsTests(DatabaseTestCase):
    def test_routes_counted_and_served(self):
        service = EngineService(self.url, pool_size=2)
        service.startService()
        self.addCleanup(lambda: await_deferred(service.stopService()))
        registry = CollectorRegistry()
        metrics = RouteMetrics(registry, namespace="app")
        app = Klein()
        routes = FiberRoutes(service, app, on_response=metrics)

        @routes.route("/one")
        def one(request, session):
            return {"one": session.execute(text("SELECT 1")).scalar()}

        @routes.route("/missing")
        def missing(request, session):
            from txfiberdb.klein import NotFound

            raise NotFound("nope")

        class Where:
            """A collector that notes the thread a scrape runs in."""

            threads = []

            def describe(self):
                return []

            def collect(self):
                from twisted.python import threadable

                self.threads.append(threadable.isInIOThread())
                return iter(())

        registry.register(Where())
        root = Resource()
        root.putChild(b"app", app.resource())
        root.putChild(b"metrics", MetricsResource(registry))
        server = HTTPServer(self, Site(root))
        http = HTTPClient(self, server.base)
        for _ in range(3):
            self.assertEqual(http.get("/app/one").code, 200)
        self.assertEqual(http.get("/app/missing").code, 404)
        r = http.get("/metrics")
        self.assertEqual(r.code, 200)
        got = {}
        for family in text_string_to_metric_families(r.body.decode()):
            for s in family.samples:
                got[(s.name, tuple(sorted(s.labels.items())))] = s.value
        self.assertEqual(
            got[("app_http_requests_total", (("code", "200"), ("route", "one")))], 3
        )
        self.assertEqual(
            got[("app_http_requests_total", (("code", "404"), ("route", "missing")))],
            1,
        )
        self.assertEqual(
            got[("app_http_request_duration_seconds_count", (("route", "one"),))], 3
        )
        # Scraped on the reactor's thread (the pool is read there only).
        self.assertEqual(Where.threads, [True])


class LoggingBridgeTests(DatabaseTestCase):
    def test_sqlalchemy_lines_in_twisted_log_without_parameters(self):
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        engine_logger = logging.getLogger("sqlalchemy.engine")
        before = engine_logger.level
        self.addCleanup(engine_logger.setLevel, before)
        handler = route_stdlib_logging(["sqlalchemy.engine"], level=logging.INFO)
        self.addCleanup(handler.remove)
        engine = create_engine(self.url, hide_parameters=True)
        self.addCleanup(engine.dispose)
        with engine.connect() as conn:
            conn.execute(text("SELECT :secret AS bridged"), {"secret": "hunter2"})
        ours = [e for e in events if e.get("log_namespace", "").startswith("sqlalchemy")]
        lines = [formatEvent(e) for e in ours]
        self.assertTrue(any("SELECT %(secret)s AS bridged" in x for x in lines), lines)
        self.assertFalse([x for x in lines if "hunter2" in x])
        self.assertTrue(all(e["log_level"].name == "info" for e in ours))
        handler.remove()
        count = len(events)
        logging.getLogger("sqlalchemy.engine").info("after removal")
        self.assertEqual(
            [e for e in events[count:] if "after removal" in formatEvent(e)], []
        )


class OpenTelemetryTests(DatabaseTestCase):
    def test_spans_of_concurrent_fibers_have_their_own_parents(self):
        """
        run_in_fiber copies the caller's context (as asyncio tasks do), so
        OpenTelemetry's current span follows each fiber: the query spans of
        five concurrent fibers are each under their own fiber's span.
        """
        try:
            from opentelemetry import trace
            from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import SimpleSpanProcessor
            from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
                InMemorySpanExporter,
            )
        except ImportError as e:
            self.skipTest(f"OpenTelemetry is not installed ({e})")
        exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        tracer = provider.get_tracer("txfiberdb-tests")
        engine = create_engine(self.url, pool_size=5)
        self.addCleanup(engine.dispose)
        # (The instrumentation declares SQLAlchemy < 2.1 and silently does
        # nothing on 2.1 unless told to skip that check.)
        SQLAlchemyInstrumentor().instrument(
            engine=engine, tracer_provider=provider, skip_dep_check=True
        )
        self.addCleanup(SQLAlchemyInstrumentor().uninstrument)

        def work(n):
            with tracer.start_as_current_span(f"fiber-{n}") as span:
                with engine.connect() as conn:
                    for _ in range(3):
                        conn.execute(text("SELECT pg_sleep(0.02)"))
                return span.get_span_context().span_id

        parents = await_deferred(
            gatherResults([run_in_fiber(work, n) for n in range(5)])
        )
        spans = exporter.get_finished_spans()
        queries = [s for s in spans if not s.name.startswith("fiber-")]
        by_parent = {}
        for s in queries:
            by_parent.setdefault(s.parent.span_id if s.parent else None, []).append(s)
        self.assertEqual(sorted(by_parent, key=str), sorted(parents, key=str))
        self.assertTrue(all(len(v) >= 3 for v in by_parent.values()))
        self.assertTrue(trace)  # (imported for its side effect: the API)
