"""
An engine shared by the tests of a module and of a class, as users write it
under trial: made at module level or in a class attribute, used by several
tests, never disposed between them.  Each test class here is also the
check: trial's janitor fails a test that leaves the reactor dirty, and a
pooled connection torn out of the reactor would hang the next test.
"""

from sqlalchemy import create_engine, select, text
from sqlalchemy.orm import Session
from twisted.internet import reactor
from twisted.internet.defer import CancelledError
from twisted.trial import reporter
from twisted.trial.unittest import SynchronousTestCase, TestCase

from txfiberdb import dbapi, pool_stats, run_in_fiber, sleep
from txfiberdb.testing import (
    ConnectionLeftOpen,
    FiberTestCase,
    create_database,
    dsn_to_url,
)

DSN = create_database()
engine = create_engine(dsn_to_url(DSN), pool_size=2, max_overflow=0)


def backend_pid():
    with engine.connect() as conn:
        return conn.execute(text("SELECT pg_backend_pid()")).scalar()


class ModuleEngineFiberTests(FiberTestCase):
    """Several FiberTestCase tests on the module's engine."""

    timeout = 30  # a regression hangs: fail in 30 s, not trial's 120
    pids: set = set()

    def check(self):
        self.pids.add(backend_pid())
        # At most pool_size backends ever: pooled connections are reused
        # from test to test (they survived the previous test's end).
        self.assertLessEqual(len(self.pids), 2)
        self.assertEqual(pool_stats(engine)["checked_out"], 0)

    def test_1(self):
        self.check()

    def test_2(self):
        self.check()

    def test_3_transaction(self):
        with engine.begin() as conn:
            conn.execute(text("SELECT 1"))
        self.check()


class ModuleEnginePlainTrialTests(TestCase):
    """A plain trial TestCase whose tests return run_in_fiber's Deferred."""

    timeout = 30

    def test_1(self):
        return run_in_fiber(backend_pid).addCallback(self.assertIsInstance, int)

    def test_2(self):
        return run_in_fiber(backend_pid).addCallback(self.assertIsInstance, int)


class ClassEngineTransactionPerTest(FiberTestCase):
    """
    The engine in a class attribute, and SQLAlchemy's transaction-per-test
    recipe on it.
    """

    timeout = 30
    engine = create_engine(dsn_to_url(DSN), pool_size=1, max_overflow=0)

    def setUp(self):
        with self.engine.begin() as conn:
            conn.execute(text("CREATE TABLE IF NOT EXISTS shared (n int)"))
        self.conn = self.engine.connect()
        self.trans = self.conn.begin()
        self.session = Session(bind=self.conn, join_transaction_mode="create_savepoint")

    def tearDown(self):
        self.session.close()
        self.trans.rollback()
        self.conn.close()

    def count(self):
        return self.session.scalar(select(text("count(*)")).select_from(text("shared")))

    def test_write_1(self):
        self.session.execute(text("INSERT INTO shared VALUES (1)"))
        self.session.commit()
        self.assertEqual(self.count(), 1)

    def test_write_2(self):
        self.assertEqual(self.count(), 0)
        self.session.execute(text("INSERT INTO shared VALUES (2)"))
        self.assertEqual(self.count(), 1)


def make_sample(step):
    """A FiberTestCase running ``step`` as its test, built here so that
    trial does not collect it."""

    class Sample(FiberTestCase):
        timeout = 30

        def test_step(self):
            step(self)

    return Sample("test_step")


class LeftoversTests(SynchronousTestCase):
    """What a test leaves behind, and what the next test then sees."""

    def run_sample(self, step):
        result = reporter.TestResult()
        make_sample(step).run(result)
        return result

    def test_transaction_left_open_fails_at_once_and_says_what_to_do(self):
        left = []

        def leave_a_transaction(case):
            conn = dbapi.connect(DSN)
            conn.cursor().execute("SELECT 1")  # BEGIN ... : a transaction
            left.append(conn)

        result = self.run_sample(leave_a_transaction)
        [(_, failure)] = result.errors
        self.assertIsInstance(failure.value, ConnectionLeftOpen)
        message = str(failure.value)
        self.assertIn("a transaction open", message)
        self.assertIn("tearDown", message)
        self.assertNotIn("Reactor was unclean", str(result.errors))
        self.assertTrue(left[0].closed)

        # The next test is not affected: the shared engine still works.
        result = self.run_sample(lambda case: case.assertIsInstance(backend_pid(), int))
        self.assertTrue(result.wasSuccessful(), result.errors)

    def test_listen_observer_left_fails_at_once(self):
        left = []

        def leave_a_listener(case):
            conn = dbapi.connect(DSN)
            conn.autocommit = True
            conn.add_notify_observer(lambda notify: None)
            conn.cursor().execute("LISTEN somewhere")
            left.append(conn)  # kept: a dropped connection is closed by GC

        result = self.run_sample(leave_a_listener)
        [(_, failure)] = result.errors
        self.assertIn("NOTIFY observers", str(failure.value))
        self.assertTrue(left[0].closed)

    def test_library_timers_do_not_outlive_the_test(self):
        """
        Timers txfiberdb starts (connect timeout, pool wait timeout, a
        cancelled query's clean-up, await_deferred's timeout) are gone when
        the test ends: trial's janitor finds no pending call.
        """
        from txfiberdb import await_deferred

        busy_engine = create_engine(
            dsn_to_url(DSN), pool_size=1, max_overflow=0, pool_timeout=5
        )

        def use_the_library(case):
            dbapi.connect(DSN, connect_timeout=5).close()
            holder = engine_holder = busy_engine.connect()
            waiter = run_in_fiber(lambda: busy_engine.connect().close())
            sleep(0.01)  # the waiter parks on the pool, with its timeout
            engine_holder.close()
            await_deferred(waiter)

            def slow():
                with busy_engine.connect() as conn:
                    conn.execute(text("SELECT pg_sleep(10)"))

            query = run_in_fiber(slow)
            sleep(0.05)
            query.cancel()
            case.assertRaises(CancelledError, await_deferred, query)
            while pool_stats(busy_engine)["checked_out"]:
                sleep(0.01)  # the cancelled fiber's clean-up: rollback, return
            case.assertEqual(await_deferred(run_in_fiber(lambda: 7), timeout=5), 7)
            busy_engine.dispose()
            del holder

        result = self.run_sample(use_the_library)
        self.assertTrue(result.wasSuccessful(), result.errors + result.failures)
        self.assertEqual(reactor.getDelayedCalls(), [])
