"""
Tests for txfiberdb.fiber, the greenlet bridge.
"""

import contextvars
import os
import subprocess
import sys
import traceback

import greenlet
from twisted.internet import defer, reactor, task
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import TestCase

from txfiberdb import fiber
from txfiberdb.fiber import (
    NotInFiberError,
    WaitTimeout,
    await_deferred,
    fibered,
    in_fiber,
    on_fiber_exit,
    run_in_fiber,
    shield,
    sleep,
)

var = contextvars.ContextVar("var", default="unset")


class Boom(Exception):
    pass


def later(value, seconds=0):
    return task.deferLater(reactor, seconds, lambda: value)


class ImmediateTests(TestCase):
    def test_already_fired_returns_without_parking(self):
        """A fired Deferred's result comes back without leaving the fiber."""
        parked = []

        def body():
            before = fiber.stats()["parked"]
            value = await_deferred(succeed(5))
            parked.append(fiber.stats()["parked"] - before)
            return value

        d = run_in_fiber(body)
        # Started from the hub and never parked: already finished.
        self.assertEqual(self.successResultOf(d), 5)
        self.assertEqual(parked, [0])

    def test_already_failed_raises_without_parking(self):
        def body():
            with self.assertRaises(Boom):
                await_deferred(defer.fail(Boom("x")))
            return "ok"

        self.assertEqual(self.successResultOf(run_in_fiber(body)), "ok")

    def test_runs_at_once_up_to_first_wait(self):
        steps = []
        waiting = Deferred()

        def body():
            steps.append("started")
            steps.append(await_deferred(waiting))

        d = run_in_fiber(body)
        self.assertEqual(steps, ["started"])
        self.assertNoResult(d)
        waiting.callback("resumed")
        self.assertEqual(steps, ["started", "resumed"])
        self.successResultOf(d)

    def test_on_hub_raises_clear_error(self):
        """Waiting on the reactor's greenlet fails at once, naming the fix."""
        with self.assertRaises(NotInFiberError) as ctx:
            await_deferred(Deferred())
        self.assertIn("run_in_fiber", str(ctx.exception))
        self.assertIn("freeze the reactor", str(ctx.exception))

    def test_in_fiber(self):
        self.assertFalse(in_fiber())
        self.assertTrue(self.successResultOf(run_in_fiber(in_fiber)))

    def test_other_greenlet_is_not_a_fiber(self):
        """A greenlet txfiberdb did not start cannot wait either."""
        g = greenlet.greenlet(lambda: await_deferred(Deferred()))
        self.assertRaises(NotInFiberError, g.switch)

    def test_fibered_decorator(self):
        @fibered
        def add(a, b=0):
            return a + await_deferred(succeed(b))

        self.assertEqual(add.__name__, "add")
        self.assertEqual(self.successResultOf(add(1, b=2)), 3)


class ErrorTests(TestCase):
    def test_failure_raised_as_original_exception(self):
        original = Boom("the original")

        def body():
            try:
                await_deferred(later(None).addCallback(lambda _: _raise(original)))
            except Boom as e:
                return e

        def _raise(e):
            raise e

        return run_in_fiber(body).addCallback(self.assertIs, original)

    def test_fiber_error_has_fiber_frames(self):
        def inner_function_of_fiber():
            await_deferred(later(None))
            raise Boom("from the fiber")

        def outer():
            inner_function_of_fiber()

        d = run_in_fiber(outer)

        def check(f):
            f.trap(Boom)
            tb = "".join(traceback.format_tb(f.getTracebackObject() or f.value.__traceback__))
            self.assertIn("inner_function_of_fiber", tb)
            self.assertIn("outer", tb)

        return d.addCallbacks(lambda r: self.fail("no error"), check)

    def test_error_traceback_through_wait_keeps_origin(self):
        """An error from a Deferred keeps the frame that raised it."""

        def deep_origin():
            raise Boom("deep")

        def body():
            try:
                await_deferred(later(None).addCallback(lambda _: deep_origin()))
            except Boom as e:
                return "".join(traceback.format_tb(e.__traceback__))

        return run_in_fiber(body).addCallback(
            lambda tb: self.assertIn("deep_origin", tb)
        )


class ResumeOrderTests(TestCase):
    def test_deferred_fired_in_fiber_a_resumes_fiber_b(self):
        """A fires B's Deferred: A goes on at once, B resumes from the hub."""
        events = []
        gate = Deferred()

        def fiber_b():
            events.append("b waits")
            events.append(("b got", await_deferred(gate)))
            events.append("b done")
            return "B"

        def fiber_a():
            await_deferred(later(None))
            events.append("a fires")
            gate.callback(42)
            events.append("a goes on")
            await_deferred(later(None))
            events.append("a done")
            return "A"

        db = run_in_fiber(fiber_b)
        da = run_in_fiber(fiber_a)

        def check(results):
            self.assertEqual(results, ["A", "B"])
            # A was not suspended by firing B's Deferred.
            self.assertLess(events.index("a goes on"), events.index(("b got", 42)))
            self.assertIn("a done", events)
            self.assertIn("b done", events)

        return defer.gatherResults([da, db]).addCallback(check)

    def test_many_fibers_resume_in_fire_order(self):
        gates = [Deferred() for _ in range(5)]
        order = []

        def waiter(i):
            await_deferred(gates[i])
            order.append(i)

        ds = [run_in_fiber(waiter, i) for i in range(5)]
        for i in (3, 1, 4, 0, 2):
            gates[i].callback(None)
        self.assertEqual(order, [3, 1, 4, 0, 2])
        return defer.gatherResults(ds)

    def test_start_fiber_from_fiber(self):
        """A fiber started from a fiber starts on the next reactor turn."""
        events = []

        def child():
            events.append("child runs")
            await_deferred(later(None))
            return "child result"

        def parent():
            d = run_in_fiber(child)
            events.append("parent goes on")
            return await_deferred(d)

        def check(result):
            self.assertEqual(result, "child result")
            self.assertEqual(events, ["parent goes on", "child runs"])

        return run_in_fiber(parent).addCallback(check)

    def test_contextvars_copied_into_fiber(self):
        def child():
            seen = var.get()
            var.set("child changed it")
            return seen

        def parent():
            var.set("parent value")
            seen = await_deferred(run_in_fiber(child))
            return seen, var.get()

        def on_hub():
            var.set("hub value")
            d = run_in_fiber(parent)
            return d, var.get()

        d, hub_value = contextvars.copy_context().run(on_hub)
        self.assertEqual(hub_value, "hub value")
        return d.addCallback(self.assertEqual, ("parent value", "parent value"))


class CancellationTests(TestCase):
    def test_cancel_throws_into_fiber_and_cancels_waited(self):
        cancelled = []
        waited = Deferred(cancelled.append)
        seen = []

        def body():
            try:
                await_deferred(waited)
            except CancelledError:
                seen.append("cancelled at wait")
                raise

        d = run_in_fiber(body)
        d.cancel()
        self.assertEqual(seen, ["cancelled at wait"])
        self.assertEqual(cancelled, [waited])
        self.failureResultOf(d, CancelledError)

    def test_cancel_cleanup_may_wait(self):
        """The fiber may wait while it cleans up after a cancel."""
        cleaned = Deferred()

        def body():
            try:
                await_deferred(Deferred())
            except CancelledError:
                sleep(0.01)
                cleaned.callback("cleaned")
                raise

        d = run_in_fiber(body)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        return cleaned

    def test_shield_lets_block_finish(self):
        events = []

        def body():
            with shield():
                events.append(await_deferred(later("first", 0.01)))
                events.append(await_deferred(later("second", 0.01)))
            events.append("after shield: not reached")

        d = run_in_fiber(body)
        reactor.callLater(0.005, d.cancel)

        def check():
            self.assertEqual(events, ["first", "second"])
            self.assertEqual(fiber.stats()["live"], live_before)

        live_before = fiber.stats()["live"] - 1
        # The caller hears of the cancel at once; the shielded block still
        # finishes, and the fiber ends at the shield's exit.
        self.assertFailure(d, CancelledError)
        return d.addCallback(lambda _: task.deferLater(reactor, 0.05, check))

    def test_cancel_before_start(self):
        ran = []

        def child():
            ran.append(True)

        def parent():
            d = run_in_fiber(child)  # scheduled, not started
            d.cancel()
            with self.assertRaises(CancelledError):
                await_deferred(d)
            await_deferred(later(None))
            return ran

        return run_in_fiber(parent).addCallback(self.assertEqual, [])

    def test_timeout(self):
        cancelled = []
        waited = Deferred(cancelled.append)

        def body():
            with self.assertRaises(WaitTimeout):
                await_deferred(waited, timeout=0.01)
            return "timed out"

        def check(result):
            self.assertEqual(result, "timed out")
            self.assertEqual(cancelled, [waited])

        return run_in_fiber(body).addCallback(check)

    def test_timeout_not_reached(self):
        def body():
            return await_deferred(later("fast"), timeout=5)

        d = run_in_fiber(body)
        d.addCallback(self.assertEqual, "fast")
        # No timer left behind: trial's reactor check would fail otherwise.
        return d


class ScaleAndStatsTests(TestCase):
    def test_ten_thousand_parked_fibers(self):
        before = fiber.stats()
        gate = Deferred()
        results = []

        def body(i):
            await_deferred(gate)
            results.append(i)
            await_deferred(later(None))
            return i

        ds = [run_in_fiber(body, i) for i in range(10_000)]
        mid = fiber.stats()
        self.assertEqual(mid["parked"] - before["parked"], 10_000)
        self.assertEqual(mid["live"] - before["live"], 10_000)
        gate.callback(None)

        def check(values):
            self.assertEqual(values, list(range(10_000)))
            after = fiber.stats()
            self.assertEqual(after["live"], before["live"])
            self.assertEqual(after["parked"], before["parked"])
            self.assertEqual(after["finished"] - before["finished"], 10_000)

        return defer.gatherResults(ds).addCallback(check)

    def test_exit_callbacks_run_in_fiber_and_may_wait(self):
        events = []

        def body():
            on_fiber_exit(lambda: events.append("first registered"))
            on_fiber_exit(lambda: events.append(await_deferred(later("waited"))))
            raise Boom()

        def check(f):
            f.trap(Boom)
            self.assertEqual(events, ["waited", "first registered"])

        return run_in_fiber(body).addCallbacks(lambda _: self.fail(), check)

    def test_late_exit_callbacks_run_after_the_others(self):
        events = []

        def body():
            on_fiber_exit(lambda: events.append("late 1"), late=True)
            on_fiber_exit(lambda: events.append("normal 1"))
            on_fiber_exit(lambda: events.append("late 2"), late=True)
            on_fiber_exit(lambda: events.append("normal 2"))

        self.successResultOf(run_in_fiber(body))
        self.assertEqual(events, ["normal 2", "normal 1", "late 2", "late 1"])

    def test_exit_callbacks_registered_while_exiting(self):
        events = []

        def late():
            events.append("late")
            on_fiber_exit(lambda: events.append("added by late"))

        def body():
            on_fiber_exit(late, late=True)

        self.successResultOf(run_in_fiber(body))
        self.assertEqual(events, ["late", "added by late"])

    def test_cancel_during_exit_callbacks(self):
        """
        A cancel that lands while exit callbacks wait does not interrupt
        them, and nothing is logged as a failure.
        """
        events = []
        logged = []
        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        gate = Deferred()
        live = fiber.stats()["live"]

        def body():
            on_fiber_exit(lambda: events.append("second"))
            on_fiber_exit(lambda: events.append(await_deferred(gate)))

        d = run_in_fiber(body)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        gate.callback("first")
        self.assertEqual(events, ["first", "second"])
        self.assertEqual(
            [e for e in logged if e.get("log_failure") is not None], []
        )
        self.assertEqual(fiber.stats()["live"], live)

    def test_slow_fiber_warning(self):
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        fiber.set_slow_threshold(0.01)
        self.addCleanup(fiber.set_slow_threshold, 0.1)

        def hog():
            import time

            time.sleep(0.03)

        self.successResultOf(run_in_fiber(hog))
        warnings = [e for e in events if "held the reactor" in e.get("log_format", "")]
        self.assertEqual(len(warnings), 1)
        self.assertEqual(warnings[0]["fiber"], hog.__qualname__)
        self.assertGreaterEqual(warnings[0]["held"], 0.03)


HUB_SCRIPT = r"""
import greenlet
from twisted.internet import reactor, task
from txfiberdb import run_in_fiber, await_deferred
from txfiberdb import fiber as f

def body():
    main = greenlet.getcurrent().parent
    await_deferred(task.deferLater(reactor, 0.01, lambda: None))
    return main is greenlet.getcurrent().parent and main.parent is None

def start():
    d = run_in_fiber(body)
    d.addCallback(lambda ok: print("ok" if ok and f._hub.greenlet.parent is None else "bad"))
    d.addBoth(lambda _: reactor.stop())

reactor.callWhenRunning(start)
reactor.run()
"""


class HubTests(TestCase):
    def test_hub_under_trial_is_main_greenlet(self):
        def body():
            await_deferred(later(None))
            return greenlet.getcurrent().parent

        def check(hub):
            self.assertIsNone(hub.parent)  # the main greenlet

        return run_in_fiber(body).addCallback(check)

    def test_hub_under_reactor_run(self):
        """As under twistd: reactor.run() in the main greenlet."""
        out = subprocess.run(
            [sys.executable, "-c", HUB_SCRIPT],
            capture_output=True,
            text=True,
            timeout=60,
            env=dict(os.environ),
        )
        self.assertEqual(out.stdout.strip(), "ok", out.stderr)
