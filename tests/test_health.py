"""
Tests for txfiberdb.health: the readiness probe against real servers (the
test server, a stopped one, one that accepts and never answers).
"""

from sqlalchemy import create_engine, text
from twisted.internet import protocol, reactor
from twisted.internet.defer import gatherResults

from txfiberdb import await_deferred, run_in_fiber, sleep
from txfiberdb.health import ReadinessProbe
from txfiberdb.service import EngineService
from txfiberdb.testing import TemporaryPostgres

from .support import DatabaseTestCase


class ReadinessProbeTests(DatabaseTestCase):
    def engine(self, url=None, **kw):
        engine = create_engine(url or self.url, **kw)
        self.addCleanup(engine.dispose)
        return engine

    def probe(self, target, **kw):
        probe = ReadinessProbe(target, **kw)
        self.addCleanup(probe.close)
        return probe

    def test_ready(self):
        result = await_deferred(self.probe(self.engine()).check())
        self.assertTrue(result.ready)
        self.assertEqual(result.reason, "")
        self.assertEqual(result.to_json()["status"], "ready")

    def test_flood_of_probes_is_one_query(self):
        """Concurrent checks share one; a fresh result is reused."""
        probe = self.probe(self.engine(), cache_for=60)
        results = await_deferred(gatherResults([probe.check() for _ in range(100)]))
        self.assertTrue(all(r.ready for r in results))
        await_deferred(probe.check())
        self.assertEqual(probe.checks, 1)
        probe.cache_for = 0
        await_deferred(probe.check())
        self.assertEqual(probe.checks, 2)

    def test_exhausted_pool_is_still_ready(self):
        """The probe never waits for (nor takes) a pool slot."""
        engine = self.engine(pool_size=1, max_overflow=0, pool_timeout=30)
        held = engine.connect()
        self.addCleanup(held.close)
        held.execute(text("SELECT 1"))
        result = await_deferred(self.probe(engine).check())
        self.assertTrue(result.ready)
        self.assertEqual(engine.pool.checkedout(), 1)

    def test_stopped_server_is_not_ready_then_recovers(self):
        pg = TemporaryPostgres().start()
        self.addCleanup(pg.stop)
        probe = self.probe(self.engine(pg.url()), cache_for=0)
        self.assertTrue(await_deferred(probe.check()).ready)
        pg.stop_server()
        result = await_deferred(probe.check())
        self.assertFalse(result.ready)
        self.assertIn(f"port {pg.port}", result.reason)
        self.assertEqual(result.to_json()["status"], "unavailable")
        pg.start_server()
        self.assertTrue(await_deferred(probe.check()).ready)

    def test_silent_server_times_out(self):
        """A server that accepts and never answers cannot hold the probe."""
        silent = protocol.ServerFactory.forProtocol(protocol.Protocol)
        port = reactor.listenTCP(0, silent, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        url = f"postgresql+txpostgres://x@127.0.0.1:{port.getHost().port}/x"
        probe = self.probe(self.engine(url), timeout=0.3)
        result = await_deferred(probe.check())
        self.assertFalse(result.ready)
        self.assertIn("0.3 s", result.reason)

    def test_server_that_stops_answering_mid_check(self):
        """A check whose query gets no answer in time drops its connection."""
        pg = TemporaryPostgres().start()
        self.addCleanup(pg.stop)
        probe = self.probe(self.engine(pg.url()), timeout=0.5, cache_for=0)
        self.assertTrue(await_deferred(probe.check()).ready)
        pg.pause()  # SIGSTOP: the server holds its sockets and says nothing
        try:
            result = await_deferred(probe.check())
        finally:
            pg.resume()
        self.assertFalse(result.ready)
        self.assertIn("no answer within 0.5 s", result.reason)
        self.assertTrue(await_deferred(probe.check()).ready)

    def test_service_not_running(self):
        service = EngineService(self.url)
        probe = self.probe(service)
        result = await_deferred(probe.check())
        self.assertFalse(result.ready)
        self.assertIn("not running", result.reason)
        service.startService()
        self.addCleanup(lambda: await_deferred(service.stopService()))
        probe.cache_for = 0
        self.assertTrue(await_deferred(probe.check()).ready)

    def test_from_the_hub(self):
        """check() may be called outside a fiber (a route on the reactor)."""
        probe = self.probe(self.engine())
        d = []
        run_in_fiber(lambda: None)  # (we are in a fiber; call from the hub:)
        reactor.callLater(0, lambda: d.append(probe.check()))
        while not d:
            sleep(0.01)
        self.assertTrue(await_deferred(d[0]).ready)

    def test_bad_arguments(self):
        self.assertRaises(ValueError, ReadinessProbe, None, timeout=0)
        self.assertRaises(ValueError, ReadinessProbe, None, cache_for=-1)
