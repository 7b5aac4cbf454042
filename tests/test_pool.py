"""
Tests for FiberQueuePool: contention, timeouts, faults, leftovers.
"""

import time

from sqlalchemy import create_engine, text
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session
from sqlalchemy.pool import QueuePool
from twisted.internet import task
from twisted.internet.defer import gatherResults
from twisted.logger import globalLogPublisher

from txfiberdb import await_deferred, pool_stats, run_in_fiber, sleep
from txfiberdb.pool import FiberQueue

from .support import DatabaseTestCase


class Ticker:
    """A LoopingCall every 10 ms, recording the largest gap between ticks."""

    def __init__(self, testcase):
        self.ticks = 0
        self.last = time.monotonic()
        self.max_gap = 0.0
        self.loop = task.LoopingCall(self.tick)
        self.loop.start(0.01, now=False)
        testcase.addCleanup(lambda: self.loop.running and self.loop.stop())

    def tick(self):
        now = time.monotonic()
        self.max_gap = max(self.max_gap, now - self.last)
        self.last = now
        self.ticks += 1


class QueueTests(DatabaseTestCase):
    def test_fifo_handoff(self):
        q = FiberQueue(3)
        got = []

        def taker(i):
            got.append((i, q.get(True, None)))

        ds = [run_in_fiber(taker, i) for i in range(3)]
        sleep(0)
        self.assertEqual(q.waiting, 3)
        for item in "abc":
            q.put(item, False)
        await_deferred(gatherResults(ds))
        self.assertEqual(got, [(0, "a"), (1, "b"), (2, "c")])
        self.assertEqual(q.waiting, 0)

    def test_get_timeout(self):
        from sqlalchemy.util.queue import Empty

        q = FiberQueue(1)
        start = time.monotonic()
        with self.assertRaises(Empty):
            q.get(True, 0.2)
        self.assertGreaterEqual(time.monotonic() - start, 0.2)
        self.assertEqual(q.waiting, 0)


class PoolTests(DatabaseTestCase):
    def make_engine(self, **kw):
        engine = create_engine(self.url, **kw)
        self.addCleanup(engine.dispose)
        return engine

    def test_200_fibers_pool_of_5(self):
        engine = self.make_engine(pool_size=5, max_overflow=0, pool_timeout=60)
        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE IF NOT EXISTS box (fiber int, v int)"))
        ticker = Ticker(self)

        def worker(i):
            with Session(engine) as s:
                s.execute(text("INSERT INTO box VALUES (:f, :v)"), {"f": i, "v": i * 10})
                sleep(0.001 * (i % 7))
                # No cross-talk: each session sees its own uncommitted row only.
                mine = s.execute(
                    text("SELECT fiber, v FROM box WHERE fiber = :f"), {"f": i}
                ).all()
                s.commit()
                return mine

        results = await_deferred(gatherResults([run_in_fiber(worker, i) for i in range(200)]))
        self.assertEqual(results, [[(i, i * 10)] for i in range(200)])
        with engine.connect() as conn:
            self.assertEqual(conn.execute(text("SELECT count(*) FROM box")).scalar(), 200)
        stats = pool_stats(engine)
        self.assertEqual(stats["checked_out"], 0)
        self.assertEqual(stats["waiting"], 0)
        self.assertLessEqual(stats["size"], 5)
        self.assertGreater(stats["longest_wait"], 0)
        # The reactor kept serving the LoopingCall throughout.
        self.assertGreater(ticker.ticks, 0)
        self.assertLess(ticker.max_gap, 1.0)

    def test_pool_timeout_while_reactor_runs(self):
        engine = self.make_engine(pool_size=1, max_overflow=0, pool_timeout=0.3)
        holder = engine.connect()
        holder.execute(text("SELECT 1"))
        ticker = Ticker(self)
        start = time.monotonic()
        with self.assertRaises(PoolTimeout):
            with engine.connect():
                pass
        waited = time.monotonic() - start
        self.assertGreaterEqual(waited, 0.3)
        self.assertGreater(ticker.ticks, 5)  # the reactor was not stalled
        # The holder can still give its connection back, and it is reused.
        holder.close()
        with engine.connect() as conn:
            self.assertEqual(conn.execute(text("SELECT 1")).scalar(), 1)

    def test_waiters_served_first_come_first_served(self):
        engine = self.make_engine(pool_size=1, max_overflow=0, pool_timeout=10)
        holder = engine.connect()
        holder.execute(text("SELECT 1"))
        order = []

        def waiter(i):
            with engine.connect() as conn:
                order.append(i)
                conn.execute(text("SELECT 1"))

        ds = [run_in_fiber(waiter, i) for i in range(5)]
        sleep(0.05)
        self.assertEqual(pool_stats(engine)["waiting"], 5)
        holder.close()
        await_deferred(gatherResults(ds))
        self.assertEqual(order, [0, 1, 2, 3, 4])

    def test_fiber_dying_with_connection_gives_it_back(self):
        engine = self.make_engine(pool_size=1, max_overflow=0, pool_timeout=2)
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)

        class Oops(Exception):
            pass

        def careless():
            conn = engine.connect()  # never closed
            conn.execute(text("CREATE TEMP TABLE leftover (a int)"))
            conn.execute(text("INSERT INTO leftover VALUES (1)"))
            raise Oops()

        with self.assertRaises(Oops):
            await_deferred(run_in_fiber(careless))
        self.assertEqual(engine.pool.checkedout(), 0)
        warnings = [e for e in events if "ended holding a pooled connection" in e.get("log_format", "")]
        self.assertEqual(len(warnings), 1)
        # The same (only) connection comes back rolled back: no open transaction.
        with engine.connect() as conn:
            self.assertEqual(
                conn.execute(
                    text("SELECT count(*) FROM pg_class WHERE relname = 'leftover'")
                ).scalar(),
                0,
            )

    def test_forgotten_session_is_returned(self):
        engine = self.make_engine(pool_size=1, max_overflow=0, pool_timeout=2)

        def forgetful():
            s = Session(engine)
            s.execute(text("SELECT 1"))
            return "done"  # s never closed

        self.assertEqual(await_deferred(run_in_fiber(forgetful)), "done")
        self.assertEqual(engine.pool.checkedout(), 0)
        with engine.connect() as conn:
            self.assertEqual(conn.execute(text("SELECT 2")).scalar(), 2)

    def test_terminated_backends_replaced(self):
        engine = self.make_engine(pool_size=3, max_overflow=0)
        conns = [engine.connect() for _ in range(3)]
        pids = [c.execute(text("SELECT pg_backend_pid()")).scalar() for c in conns]
        for c in conns:
            c.close()
        self.admin(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid = ANY(%s)",
            (pids,),
        )
        sleep(0.1)
        ok = 0
        for _ in range(6):
            try:
                with engine.connect() as conn:
                    conn.execute(text("SELECT 1"))
                    ok += 1
            except Exception as e:  # the first use of each dead one is a disconnect
                self.assertTrue(getattr(e, "connection_invalidated", False), e)
        # A disconnect invalidates the whole pool: at most one failure, then all good.
        self.assertGreaterEqual(ok, 5)
        with engine.connect() as conn:
            self.assertNotIn(conn.execute(text("SELECT pg_backend_pid()")).scalar(), pids)

    def test_first_connect_many_fibers(self):
        """Many fibers connecting first at once: no deadlock on SQLAlchemy's lock."""
        engine = self.make_engine(pool_size=10, max_overflow=0)

        def first():
            with engine.connect() as conn:
                return conn.execute(text("SELECT 1")).scalar()

        results = await_deferred(gatherResults([run_in_fiber(first) for _ in range(10)]))
        self.assertEqual(results, [1] * 10)

    def test_first_connect_with_other_pools_and_after_dispose(self):
        """
        SQLAlchemy's once-only connect set-up runs under a mutex that parks
        fibers, whatever the pool class, and again after dispose() (a
        threading.Lock there would freeze the reactor for good).
        """
        from sqlalchemy import event
        from sqlalchemy.pool import NullPool

        ticker = Ticker(self)
        for kw in ({"poolclass": NullPool}, {"poolclass": QueuePool, "pool_size": 10}, {}):
            engine = self.make_engine(**kw)

            @event.listens_for(engine, "connect")
            def set_up(dbapi_connection, record):
                # Waits, under SQLAlchemy's once-only mutex, on every pool
                # the engine gets (dispose() makes a new one).
                cursor = dbapi_connection.cursor()
                cursor.execute("SELECT pg_sleep(0.05)")
                cursor.close()
                dbapi_connection.rollback()

            def query():
                with engine.connect() as conn:
                    return conn.execute(text("SELECT 1")).scalar()

            for _ in range(2):
                results = await_deferred(
                    gatherResults([run_in_fiber(query) for _ in range(8)])
                )
                self.assertEqual(results, [1] * 8)
                engine.dispose()
        self.assertLess(ticker.max_gap, 1.0)

    def test_pool_use_lifo_and_recycle(self):
        engine = self.make_engine(pool_size=2, pool_use_lifo=True, pool_recycle=3600)
        with engine.connect() as a, engine.connect() as b:
            pa = a.execute(text("SELECT pg_backend_pid()")).scalar()
            pb = b.execute(text("SELECT pg_backend_pid()")).scalar()
        # The with-block returns b, then a: LIFO hands a out first.
        with engine.connect() as c:
            self.assertEqual(c.execute(text("SELECT pg_backend_pid()")).scalar(), pa)
        self.assertNotEqual(pa, pb)

    def test_stock_queuepool_still_selectable(self):
        """Passing SQLAlchemy's QueuePool explicitly is the user's choice."""
        engine = self.make_engine(poolclass=QueuePool)
        with engine.connect() as conn:
            self.assertEqual(conn.execute(text("SELECT 1")).scalar(), 1)
