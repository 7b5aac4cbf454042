"""
Tests for txfiberdb.testing's FiberTestCase.
"""

from twisted.internet.defer import CancelledError
from twisted.trial import reporter
from twisted.trial.unittest import SynchronousTestCase

from txfiberdb import await_deferred, current_fiber, in_fiber, sleep
from txfiberdb.testing import (
    FiberTestCase,
    create_database,
    drop_database,
    dsn_to_url,
)


def make_sample():
    """The sample, built here so that trial does not collect it."""

    class Sample(FiberTestCase):
        log: list = []

        def setUp(self):
            self.log.append(("setUp", in_fiber()))
            self.addCleanup(lambda: self.log.append(("cleanup", in_fiber())))

        def tearDown(self):
            self.log.append(("tearDown", in_fiber()))

        def test_body(self):
            sleep(0.01)
            self.log.append(("test", in_fiber()))

        def test_slow(self):
            try:
                sleep(30)
            except CancelledError:
                self.log.append(("cancelled", in_fiber()))
                raise

        test_slow.timeout = 0.2  # type: ignore[attr-defined]

        def test_stubborn(self):
            # Ignores its first cancellation and goes on a little.
            try:
                sleep(30)
            except CancelledError:
                sleep(0.3)
                self.log.append(("finished anyway", in_fiber()))

        test_stubborn.timeout = 0.2  # type: ignore[attr-defined]

    return Sample


def make_transactional_sample(url):
    """
    The "transaction per test" pattern of SQLAlchemy's docs: setUp opens a
    connection and a transaction, the test writes through a Session joined to
    it, tearDown rolls it all back.
    """
    from sqlalchemy import create_engine, text
    from sqlalchemy.orm import Session

    class Transactional(FiberTestCase):
        fibers: list = []

        def setUp(self):
            self.engine = create_engine(url, pool_size=1, max_overflow=0)
            self.conn = self.engine.connect()
            self.trans = self.conn.begin()
            self.session = Session(
                bind=self.conn, join_transaction_mode="create_savepoint"
            )
            self.fibers.append(current_fiber())

        def tearDown(self):
            self.fibers.append(current_fiber())
            self.session.close()
            self.trans.rollback()
            self.conn.close()
            self.engine.dispose()

        def test_write(self):
            self.fibers.append(current_fiber())
            self.session.execute(text("INSERT INTO t VALUES (1)"))
            self.session.commit()  # a savepoint: the outer transaction stays
            count = self.conn.execute(text("SELECT count(*) FROM t")).scalar()
            assert count == 1, count

    return Transactional


class FiberTestCaseTests(SynchronousTestCase):
    def run_sample(self, name):
        Sample = make_sample()
        Sample.log = []
        result = reporter.TestResult()
        Sample(name).run(result)
        return result, Sample.log

    def test_everything_runs_in_fibers(self):
        result, log = self.run_sample("test_body")
        self.assertTrue(result.wasSuccessful(), result.errors)
        self.assertEqual(
            log,
            [("setUp", True), ("test", True), ("cleanup", True), ("tearDown", True)],
        )

    def test_timeout_cancels_the_fiber(self):
        result, log = self.run_sample("test_slow")
        self.assertEqual(len(result.errors), 1)
        self.assertIn(("cancelled", True), log)

    def test_step_ignoring_its_timeout_is_waited_for(self):
        """
        The test's fiber has ended when run() returns, even when a step went
        on after its timeout: nothing of it runs into the next test.
        """
        result, log = self.run_sample("test_stubborn")
        # The test timed out, and so did the clean-up queued behind it (the
        # same 0.2 s timeout); the clean-up ran all the same, then tearDown.
        self.assertEqual(len(result.errors), 2)
        self.assertEqual(
            log,
            [
                ("setUp", True),
                ("finished anyway", True),
                ("cleanup", True),
                ("tearDown", True),
            ],
        )

    def test_await_in_test_body(self):
        # The sample's body waits on a reactor-driven Deferred.
        result, _ = self.run_sample("test_body")
        self.assertEqual(result.testsRun, 1)
        self.assertTrue(callable(await_deferred))

    def test_steps_share_one_fiber(self):
        """
        What setUp checks out stays the test's through tearDown (one fiber
        for all steps), and nothing is left behind or warned about.
        """
        import psycopg2
        from twisted.logger import globalLogPublisher

        dsn = create_database()
        self.addCleanup(drop_database, dsn)
        with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
            cur.execute("CREATE TABLE t (a int)")
        conn.close()
        logged = []
        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        Sample = make_transactional_sample(dsn_to_url(dsn))
        Sample.fibers = []
        result = reporter.TestResult()
        Sample("test_write").run(result)
        self.assertTrue(result.wasSuccessful(), result.errors + result.failures)
        self.assertEqual(len(Sample.fibers), 3)
        self.assertEqual(len(set(map(id, Sample.fibers))), 1)
        self.assertTrue(Sample.fibers[0].dead)  # ended with the test
        with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM t")
            self.assertEqual(cur.fetchone(), (0,))  # rolled back
        conn.close()
        self.assertEqual(
            [e for e in logged if "ended holding" in str(e.get("log_format"))], []
        )
