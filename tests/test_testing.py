"""
Tests for txfiberdb.testing's FiberTestCase.
"""

from twisted.internet.defer import CancelledError
from twisted.trial import reporter
from twisted.trial.unittest import SynchronousTestCase

from txfiberdb import await_deferred, in_fiber, sleep
from txfiberdb.testing import FiberTestCase


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

    return Sample


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

    def test_await_in_test_body(self):
        # The sample's body waits on a reactor-driven Deferred.
        result, _ = self.run_sample("test_body")
        self.assertEqual(result.testsRun, 1)
        self.assertTrue(callable(await_deferred))
