"""
Tests for txfiberdb.run_blocking: fiber code called from blocking code (no
reactor running), many times in one process, against the real test server.
"""

import os
import re
import signal
import subprocess
import sys
import threading
import traceback

import greenlet
from sqlalchemy import create_engine, text
from twisted.internet import reactor, task
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase, TestCase

from txfiberdb import await_deferred, fiber, run_blocking, run_in_fiber, sleep
from txfiberdb.testing import FiberTestCase, dsn_to_url, test_server

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Boom(Exception):
    pass


def run_script(source, *args, env=None, **kwargs):
    """Run ``python -c source`` with the test server in $DATABASE_URL."""
    environ = dict(os.environ, DATABASE_URL=dsn_to_url(test_server()))
    environ.update(env or {})
    return subprocess.run(
        [sys.executable, "-c", source, *args],
        capture_output=True,
        text=True,
        env=environ,
        cwd=ROOT,
        **kwargs,
    )


def default_sigint():
    """
    In the child: SIGINT as a terminal gives it (a test runner started in
    the background has it ignored, and its children inherit that).
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def wait_for_query(dsn, prefix):
    """Until a query starting with ``prefix`` runs on the server (no timing)."""
    import psycopg2

    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            for _ in range(2400):  # a generous deadline, for a hung child only
                cur.execute(
                    "select count(*) from pg_stat_activity where state = 'active' "
                    "and query like %s and pid <> pg_backend_pid()",
                    (prefix + "%",),
                )
                if cur.fetchone()[0]:
                    return
                cur.execute("select pg_sleep(0.05)")
            raise AssertionError(f"no query like {prefix!r} ever ran")
    finally:
        conn.close()


class BridgeTests(SynchronousTestCase):
    """No database: the bridge alone (trial runs these with no reactor)."""

    def test_result_args_kwargs(self):
        def add(a, b, c=0):
            self.assertTrue(fiber.in_fiber())
            return a + b + c

        self.assertEqual(run_blocking(add, 1, 2, c=3), 6)

    def test_waits_on_the_reactor(self):
        """The function parks on Deferreds fired by the reactor's timers."""

        def body():
            sleep(0.01)
            d = Deferred()
            reactor.callLater(0, d.callback, "fired")
            return await_deferred(d)

        self.assertEqual(run_blocking(body), "fired")
        self.assertEqual(run_blocking(body), "fired")  # no ReactorNotRestartable
        self.assertFalse(reactor.running)
        self.assertEqual(reactor.getDelayedCalls(), [])

    def test_background_fiber_goes_on_in_the_next_call(self):
        done = []

        def background():
            sleep(0.01)
            done.append("background")

        def start():
            run_in_fiber(background)
            return "started"

        self.assertEqual(run_blocking(start), "started")
        self.assertEqual(done, [])
        run_blocking(lambda: await_deferred(task.deferLater(reactor, 0.05, lambda: None)))
        self.assertEqual(done, ["background"])

    def test_exception_with_fiber_traceback(self):
        def inner():
            sleep(0)
            raise Boom("from the fiber")

        with self.assertRaises(Boom) as caught:
            run_blocking(inner)
        frames = [f.name for f in traceback.extract_tb(caught.exception.__traceback__)]
        self.assertIn("inner", frames)

    def test_base_exception(self):
        """SystemExit raised by the function reaches the caller as itself."""

        def body():
            sleep(0)
            raise SystemExit(3)

        with self.assertRaises(SystemExit) as caught:
            run_blocking(body)
        self.assertEqual(caught.exception.code, 3)

    def test_refused_in_a_fiber(self):
        def nested():
            return run_blocking(lambda: None)

        with self.assertRaises(RuntimeError) as caught:
            run_blocking(nested)
        self.assertIn("inside a fiber", str(caught.exception))
        self.assertIn("call the function directly", str(caught.exception))

    def test_hub_restored(self):
        """The caller's greenlet is the hub only for the duration of the call."""
        before = fiber._hub.greenlet
        hubs = []
        run_blocking(lambda: hubs.append(fiber._hub.greenlet))
        self.assertEqual(hubs, [greenlet.getcurrent()])
        self.assertIs(fiber._hub.greenlet, before)

    def test_from_another_greenlet(self):
        """Any greenlet that is not a fiber may block (a notebook's kernel)."""
        glet = greenlet.greenlet(lambda: run_blocking(lambda: sleep(0) or 7))
        self.assertEqual(glet.switch(), 7)


class TrialTestCaseTests(TestCase):
    """
    trial calls a test method before it runs the reactor (which turns only
    while the test's Deferred is pending): run_blocking works in the method
    body, and is refused in what the reactor calls.
    """

    def test_in_the_test_method(self):
        self.assertFalse(reactor.running)
        self.assertEqual(run_blocking(lambda: sleep(0) or "ok"), "ok")

    def test_refused_on_the_reactor(self):
        def in_reactor():
            self.assertTrue(reactor.running)
            return run_blocking(lambda: None)

        d = self.assertFailure(task.deferLater(reactor, 0, in_reactor), RuntimeError)

        def check(error):
            message = str(error)
            self.assertIn("while the reactor is running", message)
            self.assertIn("run_in_fiber", message)

        return d.addCallback(check)

    def test_alternative_named_works(self):
        """What the message recommends: return run_in_fiber's Deferred."""
        d = run_in_fiber(lambda: sleep(0) or "ok")
        d.addCallback(self.assertEqual, "ok")
        return d


class RefusedInFiberTestCaseTests(FiberTestCase):
    def test_refused_in_a_fiber_test(self):
        with self.assertRaises(RuntimeError) as caught:
            run_blocking(lambda: None)
        self.assertIn("inside a fiber", str(caught.exception))


class DatabaseTests(SynchronousTestCase):
    """The engine, its pool and its connections across calls."""

    def setUp(self):
        self.engine = create_engine(dsn_to_url(test_server()))
        # Closes the pooled connections (they are idle between calls).
        self.addCleanup(self.engine.dispose)

    def backend_pid(self):
        with self.engine.connect() as conn:
            return conn.scalar(text("select pg_backend_pid()"))

    def test_pooled_connection_reused_between_calls(self):
        first = run_blocking(self.backend_pid)
        second = run_blocking(self.backend_pid)
        self.assertEqual(first, second)

    def test_error_then_next_call_works(self):
        def divide():
            with self.engine.connect() as conn:
                return conn.scalar(text("select 1/0"))

        from sqlalchemy.exc import DataError

        with self.assertRaises(DataError):
            run_blocking(divide)
        self.assertIsInstance(run_blocking(self.backend_pid), int)

    def test_unreturned_connection_given_back(self):
        """A connection the function forgets is returned when its fiber ends."""
        run_blocking(self.engine.connect)
        self.assertEqual(self.engine.pool.checkedout(), 0)
        self.assertIsInstance(run_blocking(self.backend_pid), int)

    def test_dispose_inside_and_outside(self):
        first = run_blocking(self.backend_pid)
        run_blocking(self.engine.dispose)
        second = run_blocking(self.backend_pid)
        self.assertNotEqual(first, second)
        self.engine.dispose()
        third = run_blocking(self.backend_pid)
        self.assertNotEqual(second, third)

    def test_transaction_and_session(self):
        from sqlalchemy.orm import Session

        def work():
            with Session(self.engine) as session, session.begin():
                session.execute(text("create temporary table t (x int)"))
                session.execute(text("insert into t values (1), (2)"))
                return session.scalar(text("select sum(x) from t"))

        self.assertEqual(run_blocking(work), 3)


THREE_LINES = """\
import os, sqlalchemy as sa, txfiberdb
engine = sa.create_engine(os.environ["DATABASE_URL"])
print(txfiberdb.run_blocking(lambda: engine.connect().execute(sa.text("select 41 + 1")).scalar()))
"""


class ScriptTests(SynchronousTestCase):
    """Real processes, as a user runs them."""

    def test_three_line_script(self):
        out = run_script(THREE_LINES)
        self.assertEqual((out.returncode, out.stdout, out.stderr), (0, "42\n", ""))

    def test_same_call_twice(self):
        lines = THREE_LINES.splitlines()
        out = run_script("\n".join(lines + lines[-1:]))
        self.assertEqual((out.returncode, out.stdout, out.stderr), (0, "42\n42\n", ""))

    def test_doc_example(self):
        """doc/howto/scripts.md's script runs as shown; its python -c is ours."""
        with open(os.path.join(ROOT, "doc", "howto", "scripts.md")) as f:
            doc = f.read()
        self.assertIn("python -c '" + THREE_LINES.rstrip("\n") + "'", doc)
        blocks = re.findall(r"```python\n(.*?)```", doc, re.S)
        self.assertTrue(blocks)
        for block in blocks:
            out = run_script(block)
            self.assertEqual(out.returncode, 0, out.stderr)
            self.assertEqual(out.stderr, "")

    def test_bad_url_message(self):
        out = run_script(
            THREE_LINES,
            env={"DATABASE_URL": "postgresql+txpostgres://nobody@127.0.0.1:1/x"},
        )
        self.assertEqual(out.returncode, 1)
        self.assertIn("OperationalError", out.stderr)
        self.assertNotIn("Unhandled error", out.stderr)

    def test_ctrl_c_cancels_the_query(self):
        """
        Ctrl-C while a query runs: the query is cancelled on the server, the
        caller gets KeyboardInterrupt, and the next call works.
        """
        source = """\
import os, sys, sqlalchemy as sa, txfiberdb
engine = sa.create_engine(os.environ["DATABASE_URL"])
def sleepy():
    with engine.connect() as conn:
        print("pid", conn.scalar(sa.text("select pg_backend_pid()")), flush=True)
        conn.execute(sa.text("select pg_sleep(60)"))
try:
    txfiberdb.run_blocking(sleepy)
except KeyboardInterrupt:
    print("interrupted", flush=True)
def busy():
    with engine.connect() as conn:
        return conn.scalar(sa.text(
            "select count(*) from pg_stat_activity "
            "where query like 'select pg_sleep(60)%' and state = 'active'"))
print("still sleeping:", txfiberdb.run_blocking(busy))
"""
        environ = dict(os.environ, DATABASE_URL=dsn_to_url(test_server()))
        proc = subprocess.Popen(
            [sys.executable, "-c", source],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=environ,
            cwd=ROOT,
            preexec_fn=default_sigint,
        )
        try:
            watchdog = threading.Timer(120, proc.kill)
            watchdog.start()
            self.addCleanup(watchdog.cancel)
            first = proc.stdout.readline()
            self.assertTrue(first.startswith("pid "), first)
            wait_for_query(test_server(), "select pg_sleep(60)")
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        self.assertEqual(proc.returncode, 0, err)
        self.assertEqual(out, "interrupted\nstill sleeping: 0\n")
        self.assertEqual(err, "")

    def test_ctrl_c_in_python_code(self):
        """
        Ctrl-C while the fiber computes: served at its next wait (never in
        the middle of the driver's work), then KeyboardInterrupt.
        """
        flag = os.path.abspath(self.mktemp())
        source = """\
import os, sys, txfiberdb
def spin():
    try:
        print("spinning", flush=True)
        while not os.path.exists(sys.argv[1]):
            pass
        print("waiting", flush=True)
        txfiberdb.sleep(60)
    finally:
        print("finally ran", flush=True)
try:
    txfiberdb.run_blocking(spin)
except KeyboardInterrupt:
    print("interrupted", flush=True)
print(txfiberdb.run_blocking(lambda: "next call works"))
"""
        proc = subprocess.Popen(
            [sys.executable, "-c", source, flag],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            preexec_fn=default_sigint,
        )
        try:
            watchdog = threading.Timer(120, proc.kill)
            watchdog.start()
            self.addCleanup(watchdog.cancel)
            self.assertEqual(proc.stdout.readline(), "spinning\n")
            proc.send_signal(signal.SIGINT)
            open(flag, "w").close()
            out, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        self.assertEqual((proc.returncode, err), (0, ""))
        self.assertEqual(out, "waiting\nfinally ran\ninterrupted\nnext call works\n")
