"""
Tests for txfiberdb.service.EngineService: start, run, drain, dispose,
against a real PostgreSQL.
"""

import uuid

from sqlalchemy import text
from twisted.application.service import MultiService
from twisted.internet.defer import CancelledError, Deferred

from txfiberdb import await_deferred, pool_stats, run_in_fiber, shield, sleep
from txfiberdb.service import EngineService, ServiceStopping

from .support import DatabaseTestCase
from .test_klein import running_queries, wait_until


class EngineServiceTests(DatabaseTestCase):
    def make(self, **kw):
        # A unique application_name finds this service's connections in
        # pg_stat_activity.
        self.app_name = f"svc_{uuid.uuid4().hex[:10]}"
        kw.setdefault("grace_period", 10)
        service = EngineService(f"{self.url}?application_name={self.app_name}", **kw)
        self.addCleanup(lambda: await_deferred(service.stopService()))
        return service

    def backends(self):
        return self.admin(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
            (self.app_name,),
        )[0][0]

    def select(self, service, sql, **params):
        def work():
            with service.engine.connect() as conn:
                return conn.execute(text(sql), params).scalar()

        return await_deferred(service.run(work))

    def test_nothing_before_start_nothing_connects_on_start(self):
        service = self.make()
        self.assertIsNone(service.engine)
        self.assertRaises(ServiceStopping, service.run, lambda: None)
        service.startService()
        self.assertTrue(service.running)
        self.assertIsNotNone(service.engine)
        self.assertIsNotNone(service.sessionmaker)
        self.assertEqual(self.backends(), 0)
        self.assertEqual(self.select(service, "SELECT 1"), 1)
        self.assertEqual(self.backends(), 1)

    def test_url_may_be_set_before_start(self):
        service = EngineService("postgresql+txpostgres://nobody@invalid.invalid/none")
        self.addCleanup(lambda: await_deferred(service.stopService()))
        service.url = self.url
        service.startService()
        self.assertEqual(self.select(service, "SELECT 2"), 2)

    def test_sessionmaker(self):
        service = self.make()
        service.startService()

        def work():
            with service.sessionmaker() as session:
                return session.execute(text("SELECT 3")).scalar()

        self.assertEqual(await_deferred(service.run(work)), 3)

    def test_stop_disposes_of_the_pool(self):
        service = self.make(pool_size=3)
        service.startService()
        ds = [service.run(self.select_sleep, service, 0.05) for _ in range(3)]
        for d in ds:
            await_deferred(d)
        self.assertEqual(self.backends(), 3)
        await_deferred(service.stopService())
        self.assertFalse(service.running)
        wait_until(lambda: self.backends() == 0, what="connections closed")
        self.assertRaises(ServiceStopping, service.run, lambda: None)

    def select_sleep(self, service, seconds, marker="svc-sleep"):
        with service.engine.connect() as conn:
            conn.execute(text(f"SELECT pg_sleep(:s) -- {marker}"), {"s": seconds})
        return seconds

    def test_inflight_counts_until_the_fiber_has_ended(self):
        service = self.make()
        service.startService()
        gate = Deferred()
        d = service.run(lambda: await_deferred(gate))
        self.assertEqual(service.inflight, 1)
        gate.callback("done")
        self.assertEqual(await_deferred(d), "done")
        wait_until(lambda: service.inflight == 0)

    def test_work_that_never_waits_is_not_counted(self):
        # Started from the reactor's greenlet, a unit of work that never
        # waits is over before run() returns.
        from twisted.internet import reactor

        service = self.make()
        service.startService()
        results = []
        reactor.callLater(0, lambda: results.append(service.run(lambda: 42)))
        wait_until(lambda: results)
        self.assertEqual(await_deferred(results[0]), 42)
        self.assertEqual(service.inflight, 0)
        await_deferred(service.stopService())

    def test_run_from_a_fiber_and_errors(self):
        service = self.make()
        service.startService()

        def boom():
            raise ValueError("boom")

        with self.assertRaises(ValueError):
            await_deferred(service.run(boom))
        wait_until(lambda: service.inflight == 0)

    def test_cancelled_before_it_started(self):
        """
        Work started from a fiber begins on the next reactor turn; cancelled
        before then, it never runs and is not counted as in flight.
        """
        service = self.make()
        service.startService()
        ran = []
        d = service.run(ran.append, "ran")  # from this (test) fiber
        self.assertEqual(service.inflight, 1)
        d.cancel()
        with self.assertRaises(CancelledError):
            await_deferred(d)
        sleep(0.01)
        self.assertEqual((ran, service.inflight), ([], 0))
        await_deferred(service.stopService())  # does not wait for it

    def test_stop_waits_for_work_in_flight(self):
        service = self.make()
        service.startService()
        order = []
        work = service.run(
            lambda: order.append(("work", self.select_sleep(service, 0.3)))
        )
        wait_until(lambda: running_queries(self.admin, "svc-sleep"))
        stopping = service.stopService()
        stopping.addCallback(lambda _: order.append(("stopped",)))
        # No new work while stopping.
        self.assertRaises(ServiceStopping, service.run, lambda: None)
        self.assertFalse(stopping.called)
        await_deferred(stopping)
        self.assertEqual(order, [("work", 0.3), ("stopped",)])
        self.assertIsNone(await_deferred(work))
        wait_until(lambda: self.backends() == 0, what="connections closed")

    def test_grace_period_over_cancels_running_queries(self):
        service = self.make(grace_period=0.1)
        service.startService()
        work = service.run(self.select_sleep, service, 60)
        wait_until(lambda: running_queries(self.admin, "svc-sleep"))
        await_deferred(service.stopService())
        self.assertRaises(CancelledError, await_deferred, work)
        self.assertEqual(running_queries(self.admin, "svc-sleep"), [])
        self.assertEqual(service.inflight, 0)
        wait_until(lambda: self.backends() == 0, what="connections closed")

    def test_shielded_work_finishes_after_the_grace_period(self):
        service = self.make(grace_period=0.05)
        service.startService()
        done = []

        def work():
            with shield():
                self.select_sleep(service, 0.3)
                done.append(True)

        d = service.run(work)
        wait_until(lambda: running_queries(self.admin, "svc-sleep"))
        await_deferred(service.stopService())
        self.assertEqual(done, [True])
        self.assertRaises(CancelledError, await_deferred, d)

    def test_cancel_grace_bounds_the_wait(self):
        # Work that ignores cancellation (shielded, waiting on something that
        # never comes) cannot hold the shutdown for ever.
        service = self.make(grace_period=0.05, cancel_grace=0.1)
        service.startService()
        never = Deferred()

        def stubborn():
            with shield():
                await_deferred(never)

        d = service.run(stubborn)
        await_deferred(service.stopService())
        self.assertRaises(CancelledError, await_deferred, d)
        self.assertEqual(service.inflight, 1)
        self.flushLoggedErrors()
        never.callback(None)
        wait_until(lambda: service.inflight == 0)

    def test_stop_twice_and_restart(self):
        service = self.make()
        service.startService()
        self.assertEqual(self.select(service, "SELECT 1"), 1)
        d1 = service.stopService()
        d2 = service.stopService()
        await_deferred(d1)
        await_deferred(d2)
        service.startService()
        self.assertEqual(self.select(service, "SELECT 5"), 5)

    def test_many_units_of_work_drained(self):
        service = self.make(pool_size=5, max_overflow=0, pool_timeout=30)
        service.startService()
        ds = [
            service.run(self.select_sleep, service, 0.02 * (i % 5)) for i in range(50)
        ]
        sleep(0)
        stopping = service.stopService()
        for d in ds:
            await_deferred(d)
        await_deferred(stopping)
        self.assertEqual(pool_stats(service.engine)["checked_out"], 0)

    def test_under_a_multiservice(self):
        parent = MultiService()
        service = self.make()
        service.setServiceParent(parent)
        parent.startService()
        self.assertEqual(self.select(service, "SELECT 6"), 6)
        await_deferred(parent.stopService())
        self.assertFalse(service.running)

    def test_stop_result_fires_on_the_hub(self):
        # stopService's Deferred (and with it a reactor's shutdown) must not
        # run inside the ending fiber.
        from txfiberdb import in_fiber

        service = self.make()
        service.startService()
        gate = Deferred()
        service.run(lambda: await_deferred(gate))
        where = []
        stopping = service.stopService()
        stopping.addCallback(lambda _: where.append(in_fiber()))
        run_in_fiber(lambda: gate.callback(None))
        await_deferred(stopping)
        self.assertEqual(where, [False])
