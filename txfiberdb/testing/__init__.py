# -*- test-case-name: tests.test_testing -*-
"""
Helpers for testing code that uses txfiberdb.

- :class:`FiberTestCase`: a trial TestCase whose ``setUp``, test methods and
  ``tearDown`` run in a fiber, so they read as ordinary synchronous code.
- A pytest plugin (:mod:`txfiberdb.testing.pytest_plugin`, loaded by the
  ``pytest11`` entry point) that runs tests marked ``@pytest.mark.fiber`` in a
  fiber under pytest-twisted, :func:`fiber_fixture` for fixtures whose set-up
  and tear-down run in a fiber of their scope, and ``postgres_dsn``,
  ``postgres_url`` and ``fresh_database_dsn`` fixtures.
- :class:`TemporaryPostgres`: a throwaway PostgreSQL server;
  :class:`TemporaryPgBouncer`: a throwaway PgBouncer in front of one;
  :class:`TemporaryReplica`: a streaming replica of one.
- :func:`test_server`, :func:`create_database`, :func:`drop_database`: the
  server the tests of this process use (``$TXFIBERDB_TEST_DSN`` if set, else
  a :class:`TemporaryPostgres` started on first use and removed at exit), and
  fresh databases on it, so that test order never matters.
"""

from __future__ import annotations

import functools
import inspect
import os
import sys
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Optional

import greenlet
from twisted.internet.defer import Deferred, DeferredQueue
from twisted.python.failure import Failure
from twisted.trial import util as _trial_util
from twisted.trial.unittest import TestCase

from txfiberdb.fiber import _cancel_fiber, await_deferred, current_fiber, run_in_fiber
from txfiberdb.testing._pgbouncer import (
    PgBouncerUnavailable,
    TemporaryPgBouncer,
    find_pgbouncer,
)
from txfiberdb.testing._postgres import (
    PostgresUnavailable,
    TemporaryPostgres,
    find_postgres_bindir,
)
from txfiberdb.testing._replica import TemporaryReplica

__all__ = [
    "ConnectionLeftOpen",
    "FiberTestCase",
    "PgBouncerUnavailable",
    "PostgresUnavailable",
    "TemporaryPgBouncer",
    "TemporaryPostgres",
    "TemporaryReplica",
    "create_database",
    "drop_database",
    "dsn_to_url",
    "fiber_fixture",
    "find_pgbouncer",
    "find_postgres_bindir",
    "test_server",
]

_server: Optional[TemporaryPostgres] = None


def __getattr__(name: str) -> Any:
    # fiber_fixture lives in the pytest plugin; imported on use so that
    # trial users need no pytest.
    if name == "fiber_fixture":
        from txfiberdb.testing.pytest_plugin import fiber_fixture

        return fiber_fixture
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def test_server() -> str:
    """
    The libpq DSN of the server this process tests against:
    ``$TXFIBERDB_TEST_DSN`` (a URL or ``key=value`` string) when set,
    otherwise a :class:`TemporaryPostgres` started now (once per process) and
    removed when the process exits.
    """
    global _server
    dsn = os.environ.get("TXFIBERDB_TEST_DSN")
    if dsn:
        return dsn
    if _server is None:
        _server = TemporaryPostgres().start()
    return _server.dsn()


test_server.__test__ = False  # type: ignore[attr-defined]


def _admin(sql: str) -> None:
    # Test set-up, before any fiber runs: a blocking connection is fine here.
    import psycopg2

    conn = psycopg2.connect(test_server())
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(sql)
    finally:
        conn.close()


def create_database(prefix: str = "txfiberdb_test") -> str:
    """
    Create a new, empty database on :func:`test_server` and return its DSN.

    Blocking (a plain psycopg2 connection): call it where no fiber serves
    requests yet.  trial has no ``setUpClass``: call it at module level
    (``DSN = create_database()``) or in a class attribute, once for all the
    tests there, or in ``setUp`` with ``self.addCleanup(drop_database, dsn)``
    for a database per test.  Under pytest, use it in a session- or
    module-scoped fixture (``fresh_database_dsn`` does it per test).
    """
    from psycopg2.extensions import make_dsn

    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    _admin(f'CREATE DATABASE "{name}" TEMPLATE template0')
    return make_dsn(test_server(), dbname=name)  # type: ignore[no-any-return]


def drop_database(dsn: str) -> None:
    """Drop the database of ``dsn`` (made by :func:`create_database`)."""
    from psycopg2.extensions import parse_dsn

    name = parse_dsn(dsn)["dbname"]
    _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def dsn_to_url(dsn: str, driver: str = "txpostgres") -> str:
    """A SQLAlchemy URL (``postgresql+<driver>://``) for a libpq DSN."""
    from urllib.parse import quote

    from psycopg2.extensions import parse_dsn

    p = parse_dsn(dsn)
    auth = quote(p.get("user", ""), safe="")
    if p.get("password"):
        auth += ":" + quote(p["password"], safe="")
    host = p.get("host", "")
    query = ""
    if host.startswith("/"):
        query = "?host=" + quote(host, safe="")
        host = ""
    port = f":{p['port']}" if p.get("port") and host else ""
    if p.get("port") and not host:
        query += ("&" if query else "?") + f"port={p['port']}"
    at = "@" if auth else ""
    return f"postgresql+{driver}://{auth}{at}{host}{port}/{p.get('dbname', '')}{query}"


class FiberTestCase(TestCase):
    """
    A trial TestCase whose ``setUp``, test method, cleanups and ``tearDown``
    run in a fiber: they may call :func:`txfiberdb.await_deferred` and any
    txfiberdb-backed SQLAlchemy code directly.

    All the steps of one test run in turn in *one* fiber, so what ``setUp``
    opens (a connection, a transaction the test joins and ``tearDown`` rolls
    back) stays the test's until the end; when the test is over the fiber
    ends, and the pool takes back what is still checked out.  A step that
    returns a Deferred has it waited on.  trial's ``timeout`` cancels the
    step running (:exc:`~twisted.internet.defer.CancelledError` where it
    waits).  (Needs Twisted 25.5 or later, whose trial runs a test through a
    coroutine this class hooks; should that hook go away, each step runs in
    a fiber of its own.)

    Under pytest with pytest-twisted (whose greenlet runs the reactor for the
    whole session, for pytest-twisted and fiber tests alike), the test waits
    on that reactor instead of running one of its own, and trial's check for
    a dirty reactor is left out: the reactor, its timers and connections
    belong to the pytest session, whose session-scoped fixtures may hold
    some.
    """

    _steps: Optional[_StepFiber] = None

    def _wait(self, d: Deferred[Any], *args: Any, **kwargs: Any) -> None:
        _wait_for_test(self, TestCase._wait, d, *args, **kwargs)

    def _cleanUp(self, result: Any) -> None:
        if _pytest_twisted_hub() is None:
            for problem in _close_connections_left_watched():
                result.addError(self, Failure(ConnectionLeftOpen(problem)))
                self._passed = False
        with _janitor_for_pytest():
            super()._cleanUp(result)  # type: ignore[no-untyped-call]

    def _classCleanUp(self, result: Any) -> None:
        with _janitor_for_pytest():
            super()._classCleanUp(result)  # type: ignore[no-untyped-call]

    if inspect.iscoroutinefunction(getattr(TestCase, "_deferSetUp", None)):

        async def _deferSetUp(self, result: Any) -> None:
            steps = self._steps = _StepFiber()
            try:
                await super()._deferSetUp(result)  # type: ignore[no-untyped-call]
            finally:
                self._steps = None
                from twisted.internet import reactor

                # Bounded: an exit callback or a step that ignored its
                # cancellation must not hang trial.
                ended = steps.stop().addTimeout(self.getTimeout(), reactor)  # type: ignore[no-untyped-call]
                try:
                    await ended
                except BaseException:
                    result.addError(self, Failure())
                    self._passed = False

    def _run(self, *args: Any) -> Any:
        # trial's hook that runs setUp, the test method, tearDown and each
        # cleanup: ``_run(func, description, result)`` (Twisted >= 25.5) or
        # ``_run(methodName, result)`` (older).
        if callable(args[0]):
            steps = self._steps
            step = steps.runner(args[0]) if steps else _in_fiber(args[0])
            return super()._run(step, *args[1:])  # type: ignore[no-untyped-call]
        name = args[0]
        setattr(self, name, _in_fiber(getattr(self, name)))
        try:
            return super()._run(*args)  # type: ignore[no-untyped-call]
        finally:
            delattr(self, name)


def _pytest_twisted_hub() -> Any:
    """
    pytest-twisted's reactor greenlet when this runs under it (and outside
    it), else None.
    """
    module = sys.modules.get("pytest_twisted")
    if module is None:
        return None
    hub = module._instances.gr_twisted
    if hub is None or hub.dead or module._config.external_reactor:
        return None
    if greenlet.getcurrent() is hub:
        return None
    return hub


class ConnectionLeftOpen(RuntimeError):
    """
    A :class:`FiberTestCase` test ended with a txfiberdb connection that the
    reactor still watches (a transaction open, LISTEN observers); it was
    closed.
    """


def _close_connections_left_watched() -> list[str]:
    """
    Close the txfiberdb connections the reactor still watches now that the
    test's fiber has ended, and say why each was left, and what to do.

    Idle connections (in a pool, or not) are not reactor selectables, so an
    engine shared by many tests leaves nothing behind; a connection in a
    transaction or with NOTIFY observers is.  trial's janitor would remove
    it from the reactor and report "Reactor was unclean", after which the
    connection could never hear from its server again (the next test using
    it would hang): it is closed here instead, so that its next use fails at
    once.
    """
    dbapi = sys.modules.get("txfiberdb.dbapi")
    if dbapi is None:
        return []
    from twisted.internet import reactor as _reactor

    reactor: Any = _reactor
    problems = []
    for selectable in list(reactor.getReaders()):
        if not isinstance(selectable, dbapi._Wire):
            continue
        if selectable.background and selectable.finish_background():
            continue  # a pool's ROLLBACK (background_end), now done
        if selectable.busy:
            why = "a query still running"
        elif selectable._notifyObservers:
            why = "NOTIFY observers (LISTEN) registered"
        elif selectable._connection.get_transaction_status():
            why = "a transaction open"
        else:
            why = "its socket watched by the reactor while idle"
        dsn = selectable._connection.dsn
        selectable.close()
        problems.append(
            f"a txfiberdb connection to {dsn!r} was left with {why} after the "
            "test; it has been closed. Close connections and "
            "Sessions the test opened (rollback/close in tearDown or "
            "self.addCleanup), or engine.dispose() an engine made for the "
            "test; a pool's idle connections may stay between tests."
        )
    return problems


def _wait_for_test(
    case: TestCase,
    trial_wait: Callable[..., None],
    d: Deferred[Any],
    *args: Any,
    **kwargs: Any,
) -> None:
    """
    trial's ``_wait`` (which runs the reactor until ``d`` fires), or under
    pytest-twisted, whose greenlet runs the reactor already, a wait on it.
    """
    if _pytest_twisted_hub() is None:
        trial_wait(case, d, *args, **kwargs)
        return
    import pytest_twisted

    pytest_twisted.blockon(d)


def share_pytest_reactor(case: TestCase) -> None:
    """
    Let one trial ``TestCase`` (an asynchronous one, not a
    :class:`FiberTestCase`, which does this by itself) run under pytest
    with pytest-twisted: it waits on pytest-twisted's reactor instead of
    running the reactor itself (``ReactorAlreadyRunning``, then a crashed
    reactor for every later test) and leaves the reactor, which belongs to
    the pytest session, as it is.  The pytest plugin calls it for each
    such test.
    """
    cls: Any = type(case)

    def clean_up(result: Any) -> None:
        with _janitor_for_pytest():
            cls._cleanUp(case, result)

    def class_clean_up(result: Any) -> None:
        with _janitor_for_pytest():
            cls._classCleanUp(case, result)

    # Instance attributes: the user's class stays as it is.
    vars(case).update(
        _wait=functools.partial(_wait_for_test, case, cls._wait),
        _cleanUp=clean_up,
        _classCleanUp=class_clean_up,
    )


@contextmanager
def _janitor_for_pytest() -> Iterator[None]:
    """
    Under pytest-twisted, trial's janitor must neither spin the reactor
    (pytest-twisted's greenlet runs it) nor empty it (it is the session's):
    use one that reports a clean reactor.
    """
    if _pytest_twisted_hub() is None:
        yield
        return
    real = _trial_util._Janitor
    _trial_util._Janitor = _SessionJanitor  # type: ignore[misc]
    try:
        yield
    finally:
        _trial_util._Janitor = real  # type: ignore[misc]


class _SessionJanitor(_trial_util._Janitor):
    def postCaseCleanup(self) -> bool:
        return True

    def postClassCleanup(self) -> None:
        return None


class _StepFiber:
    """
    One fiber that runs the steps of a test one after the other: each step
    handed to :meth:`runner` runs in it, and :meth:`stop` ends it.
    """

    def __init__(self, name: Optional[str] = None) -> None:
        self._queue: DeferredQueue[Any] = DeferredQueue()
        self._running: Optional[Deferred[Any]] = None  # the step's Deferred
        loop: Any = self._loop
        if name is not None:  # the fiber's name, in the pool's warnings

            def loop() -> None:
                self._loop()

            loop.__qualname__ = name
        self.ended: Deferred[None] = run_in_fiber(loop)

    def _loop(self) -> None:
        from twisted.internet import reactor as _reactor

        reactor: Any = _reactor
        fib: Any = current_fiber()
        while True:
            step = await_deferred(self._queue.get())
            if step is None:
                return
            # A step whose time ran out while it waited behind a step that
            # overran its own still runs (clean-ups matter); stop() waits for
            # it, within the test's timeout.
            f, out = step
            self._running = out
            try:
                outcome = f()
                if isinstance(outcome, Deferred):
                    outcome = await_deferred(outcome)
            except BaseException:
                outcome = Failure()
            finally:
                self._running = None
                fib.cancel_pending = False  # a cancel meant for this step only
            # Reported from the hub: trial's own machinery runs there.
            reactor.callLater(0, _report, out, outcome)

    def runner(self, f: Callable[[], Any]) -> Callable[[], Deferred[Any]]:
        """``f`` as a trial step that runs in this fiber."""

        @functools.wraps(f)
        def step() -> Deferred[Any]:
            out: Deferred[Any] = Deferred(lambda d: self._cancel_step(d))

            def timed_out(failure: Failure) -> Failure:
                # trial's timeout errbacks the step's Deferred.
                self._cancel_step(out)
                return failure

            self._queue.put((f, out))
            out.addErrback(timed_out)
            return out

        return step

    def _cancel_step(self, out: Deferred[Any]) -> None:
        """Cancel the step of ``out`` if it is the one running now."""
        if self._running is out:
            _cancel_fiber(self.ended)

    def stop(self) -> Deferred[None]:
        """
        End the fiber (its exit callbacks run); the Deferred returned fires
        when it has ended.
        """
        self._queue.put(None)
        if self._running is not None:
            # A step that timed out is still running: cancel what it waits
            # on now, once more.
            _cancel_fiber(self.ended)
        return self.ended


def _report(out: Deferred[Any], outcome: Any) -> None:
    if out.called:
        return  # timed out: trial reported it already
    if isinstance(outcome, Failure):
        out.errback(outcome)
    else:
        out.callback(outcome)


def _in_fiber(f: Callable[[], Any]) -> Callable[[], Any]:
    """
    ``f`` run in a fiber, as a Deferred that trial may time out: trial's
    timeout errbacks the Deferred instead of cancelling it, so the fiber is
    cancelled here when that happens.
    """

    @functools.wraps(f)
    def start() -> Any:
        running = run_in_fiber(f)
        if running.called:
            return running
        outer: Deferred[Any] = Deferred(lambda _: running.cancel())

        def stop_fiber(failure: Failure) -> Failure:
            if not running.called:
                running.cancel()
            return failure

        outer.addErrback(stop_fiber)

        def relay(result: Any) -> None:
            if outer.called:
                return  # timed out: the fiber's CancelledError is expected
            if isinstance(result, Failure):
                outer.errback(result)
            else:
                outer.callback(result)

        running.addBoth(relay)
        return outer

    return start
