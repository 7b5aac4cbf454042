"""
Tests for txfiberdb.notify: LISTEN/NOTIFY in fibers, against the real test
PostgreSQL (one LISTEN connection per engine, reconnection after a killed
backend, bounded queues of slow subscribers).
"""

from sqlalchemy import create_engine, func, select
from twisted.internet.defer import CancelledError

import txfiberdb.dbapi
from txfiberdb import (
    ListenerClosed,
    Missed,
    Notification,
    NotInFiberError,
    WaitTimeout,
    await_deferred,
    listen,
    listener_stats,
    run_in_fiber,
)
from txfiberdb.notify import close_listener
from txfiberdb.service import EngineService
from txfiberdb.testing import test_server

from .support import DatabaseTestCase
from .test_klein import wait_until


class NotifyTestCase(DatabaseTestCase):
    def setUp(self):
        self.engine = create_engine(self.url)
        self.addCleanup(self.engine.dispose)

    def notify(self, channel, *payloads):
        """Send ``payloads`` on ``channel`` in one committed transaction."""
        with self.engine.begin() as conn:
            for payload in payloads:
                conn.execute(select(func.pg_notify(channel, payload)))

    def listener_backends(self):
        return self.admin(
            "SELECT pid, query FROM pg_stat_activity "
            "WHERE application_name = 'txfiberdb listener' "
            "AND datname = current_database()"
        )


class DeliveryTests(NotifyTestCase):
    def test_in_order(self):
        with listen(self.engine, "stock") as notes:
            self.notify("stock", "1", "2", "3")
            self.notify("stock", "4")
            self.notify("other", "ignored")
            self.notify("stock", "5")
            got = [notes.get(timeout=30) for _ in range(5)]
        self.assertEqual([n.payload for n in got], ["1", "2", "3", "4", "5"])
        self.assertTrue(all(isinstance(n, Notification) for n in got))
        self.assertEqual({n.channel for n in got}, {"stock"})
        self.assertFalse(any(n.missed for n in got))
        seqs = [n.seq for n in got]
        self.assertEqual(seqs, sorted(seqs))
        self.assertEqual(len(set(seqs)), 5)
        self.assertEqual(notes.pending, 0)

    def test_several_channels_and_iteration(self):
        with listen(self.engine, "a", "b") as notes:
            self.notify("a", "x")
            self.notify("b", "y")
            got = [(n.channel, n.payload) for n in notes.notifies(stop_after=2)]
        self.assertEqual(got, [("a", "x"), ("b", "y")])

    def test_many_subscribers_one_connection(self):
        ready = []

        def subscriber(i):
            with listen(self.engine, "orders") as notes:
                ready.append(i)
                return [n.payload for n in notes.notifies(stop_after=3)]

        ds = [run_in_fiber(subscriber, i) for i in range(50)]
        wait_until(lambda: len(ready) == 50, what="50 subscribers")
        backends = self.listener_backends()
        self.assertEqual(len(backends), 1, backends)
        self.assertEqual(listener_stats(self.engine)["subscribers"], 50)
        self.notify("orders", "a", "b")
        self.notify("orders", "c")
        for d in ds:
            self.assertEqual(await_deferred(d), ["a", "b", "c"])
        # The last one gone, the connection closes.
        wait_until(lambda: not self.listener_backends(), what="listener closed")
        self.assertFalse(listener_stats(self.engine)["connected"])

    def test_unlisten_when_subscribers_leave(self):
        keep = listen(self.engine, "kept")
        self.addCleanup(keep.close)
        gone = listen(self.engine, "gone")
        gone.close()

        def channels():
            return set(listener_stats(self.engine)["channels"])

        wait_until(lambda: channels() == {"kept"}, what="UNLISTEN gone")
        self.notify("gone", "nobody hears this")
        self.notify("kept", "k")
        self.assertEqual(keep.get(timeout=30).payload, "k")
        self.assertEqual(keep.pending, 0)
        self.assertRaises(ListenerClosed, gone.get)

    def test_rolled_back_sends_nothing(self):
        with listen(self.engine, "stock") as notes:
            conn = self.engine.connect()
            trans = conn.begin()
            conn.execute(select(func.pg_notify("stock", "rolled back")))
            trans.rollback()
            conn.close()
            self.notify("stock", "committed")
            first = notes.get(timeout=30)
        self.assertEqual(first.payload, "committed")

    def test_exact_channel_names(self):
        name = 'Mixed "Case" ünï'
        with listen(self.engine, name) as notes:
            self.notify(name.lower(), "wrong case")
            self.notify(name, "right")
            self.assertEqual(notes.get(timeout=30).payload, "right")

    def test_bad_channel_names(self):
        for bad in ["", "a\x00b", "x" * 64, "é" * 32, "\udcff"]:
            self.assertRaises(ValueError, listen, self.engine, bad)
        self.assertRaises(TypeError, listen, self.engine, b"bytes")
        self.assertRaises(ValueError, listen, self.engine)
        self.assertRaises(ValueError, listen, self.engine, "ok", max_queued=0)
        # 63 bytes is PostgreSQL's limit and fine.
        with listen(self.engine, "y" * 63) as notes:
            self.notify("y" * 63, "long")
            self.assertEqual(notes.get(timeout=30).payload, "long")

    def test_other_engines_refused(self):
        e = self.assertRaises(TypeError, listen, create_engine("sqlite://"), "c")
        self.assertIn("postgresql+txpostgres", str(e))

    def test_outside_a_fiber(self):
        d = run_in_fiber(lambda: None)
        await_deferred(d)
        from twisted.internet import reactor
        from twisted.internet.defer import Deferred

        outcome = Deferred()

        def on_hub():
            try:
                listen(self.engine, "c")
            except NotInFiberError as e:
                outcome.callback(e)
            except BaseException as e:  # pragma: no cover
                outcome.callback(e)
            else:  # pragma: no cover
                outcome.callback(None)

        reactor.callLater(0, on_hub)
        self.assertIsInstance(await_deferred(outcome), NotInFiberError)


class WaitTests(NotifyTestCase):
    def test_timeout(self):
        with listen(self.engine, "quiet") as notes:
            self.assertRaises(WaitTimeout, notes.get, timeout=0.05)
            self.assertEqual(list(notes.notifies(timeout=0.05)), [])
            # Still subscribed after a timeout.
            self.notify("quiet", "late")
            self.assertEqual(notes.get(timeout=30).payload, "late")

    def test_cancel(self):
        with listen(self.engine, "c") as notes:
            d = run_in_fiber(notes.get)
            d.cancel()
            self.assertRaises(CancelledError, await_deferred, d)
            self.notify("c", "after")
            self.assertEqual(notes.get(timeout=30).payload, "after")

    def test_one_waiter_per_subscription(self):
        with listen(self.engine, "c") as notes:
            d = run_in_fiber(notes.get)
            wait_until(lambda: notes.waiting, what="the first fiber parked")
            e = self.assertRaises(RuntimeError, notes.get, timeout=1)
            self.assertIn("its own", str(e))
            self.notify("c", "for the first")
            self.assertEqual(await_deferred(d).payload, "for the first")

    def test_close_ends_iteration(self):
        notes = listen(self.engine, "c")
        d = run_in_fiber(lambda: [n.payload for n in notes])
        self.notify("c", "one")
        wait_until(lambda: listener_stats(self.engine)["received"] >= 1)
        notes.close()
        self.assertEqual(await_deferred(d), ["one"])

    def test_dispose_ends_subscriptions(self):
        notes = listen(self.engine, "c")
        d = run_in_fiber(lambda: list(notes))
        self.engine.dispose()
        self.assertEqual(await_deferred(d), [])
        self.assertTrue(notes.closed)
        wait_until(lambda: not self.listener_backends(), what="listener closed")
        # The engine is still usable, and so is listening on it.
        with listen(self.engine, "c") as again:
            self.notify("c", "new")
            self.assertEqual(again.get(timeout=30).payload, "new")

    def test_service_stop_ends_subscriptions(self):
        service = EngineService(self.url, grace_period=30)
        service.startService()
        self.addCleanup(
            lambda: service.running and await_deferred(service.stopService())
        )

        def stream():
            with listen(service, "c") as notes:
                return [n.payload for n in notes]

        d = service.run(stream)
        wait_until(lambda: listener_stats(service)["channels"] == ["c"])
        # Far within the grace period: the listener ends the stream at once.
        await_deferred(service.stopService(), timeout=20)
        self.assertEqual(await_deferred(d), [])


class ReconnectTests(NotifyTestCase):
    def test_backend_killed(self):
        with listen(self.engine, "stock") as notes, listen(self.engine, "x") as other:
            self.notify("stock", "before")
            self.assertEqual(notes.get(timeout=30).payload, "before")
            (pid,) = [row[0] for row in self.listener_backends()]
            self.admin("SELECT pg_terminate_backend(%s)", (pid,))
            marker = notes.get(timeout=30)
            self.assertIsInstance(marker, Missed)
            self.assertTrue(marker.missed)
            self.assertEqual(marker.reason, "reconnected")
            self.assertEqual(other.get(timeout=30).reason, "reconnected")
            (new_pid,) = [row[0] for row in self.listener_backends()]
            self.assertNotEqual(new_pid, pid)
            self.notify("stock", "after")
            note = notes.get(timeout=30)
            self.assertEqual(note.payload, "after")
            self.assertNotEqual(note.epoch, marker.epoch + "-")  # (a str)
            self.assertEqual(listener_stats(self.engine)["reconnects"], 1)

    def server_admin(self, sql):
        conn = txfiberdb.dbapi.connect(test_server())
        try:
            conn.autocommit = True
            conn.cursor().execute(sql)
        finally:
            conn.close()

    def test_server_refuses_for_a_while(self):
        # The listener's database refuses connections: attempts fail (with
        # backoff) until it accepts them again, then the marker comes.
        with listen(self.engine, "c") as notes:
            dbname = self.admin("SELECT current_database()")[0][0]
            self.server_admin(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS false')
            try:
                (pid,) = [row[0] for row in self.listener_backends_from_server(dbname)]
                self.server_admin(f"SELECT pg_terminate_backend({int(pid)})")
                listener = notes.listener
                wait_until(lambda: listener.failed_attempts >= 2, what="attempts")
                self.assertFalse(listener.connected)
            finally:
                self.server_admin(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS true')
            self.assertEqual(notes.get(timeout=60).reason, "reconnected")
            self.notify("c", "back")
            self.assertEqual(notes.get(timeout=30).payload, "back")

    def listener_backends_from_server(self, dbname):
        conn = txfiberdb.dbapi.connect(test_server())
        try:
            cur = conn.cursor()
            cur.execute(
                "SELECT pid FROM pg_stat_activity WHERE application_name = "
                "'txfiberdb listener' AND datname = %s",
                (dbname,),
            )
            return cur.fetchall()
        finally:
            conn.close()


class OverflowTests(NotifyTestCase):
    def test_slow_subscriber(self):
        slow = listen(self.engine, "c", max_queued=10)
        self.addCleanup(slow.close)
        fast_d = run_in_fiber(
            lambda: [
                n.payload for n in listen(self.engine, "c").notifies(stop_after=25)
            ]
        )
        wait_until(lambda: listener_stats(self.engine)["subscribers"] == 2)
        payloads = [str(i) for i in range(25)]
        self.notify("c", *payloads)
        self.assertEqual(await_deferred(fast_d), payloads)
        wait_until(lambda: listener_stats(self.engine)["received"] >= 25)
        # Bounded: the marker and at most max_queued notes.
        self.assertLessEqual(slow.pending, 11)
        self.assertEqual(slow.overflows, 2)
        marker = slow.get()
        self.assertTrue(marker.missed)
        self.assertEqual(marker.reason, "overflow")
        rest = [slow.get().payload for _ in range(slow.pending)]
        self.assertEqual(rest, payloads[-len(rest) :])
        # Back to normal once it keeps up.
        self.notify("c", "next")
        self.assertEqual(slow.get(timeout=30).payload, "next")

    def test_memory_bounded_under_a_flood(self):
        slow = listen(self.engine, "flood", max_queued=50)
        self.addCleanup(slow.close)
        for batch in range(20):
            self.notify("flood", *(f"{batch}-{i}-" + "p" * 200 for i in range(100)))
            self.assertLessEqual(slow.pending, 51)
        wait_until(lambda: listener_stats(self.engine)["received"] >= 2000)
        self.assertLessEqual(slow.pending, 51)
        self.assertGreater(slow.overflows, 30)
        self.assertEqual(slow.get().reason, "overflow")


class CloseListenerTests(NotifyTestCase):
    def test_close_listener_without_one(self):
        close_listener(self.engine)  # no listener: nothing to do
        self.assertEqual(listener_stats(self.engine)["subscribers"], 0)
