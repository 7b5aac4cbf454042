# -*- test-case-name: tests.test_blocking -*-
"""
The front door from blocking code: :func:`run_blocking`.

Scripts, cron jobs, Alembic's ``env.py``, notebooks and other programs that
do not run a reactor call ``run_blocking(f, *args, **kwargs)``: ``f`` runs in
a fiber while this thread turns the reactor with ``reactor.iterate()`` until
``f`` is done, then its result is returned (or its exception raised).  The
reactor is never *started*, so the call can be made again and again in one
process (``reactor.run()`` cannot be restarted), and a program may still
call ``reactor.run()`` later.

Why ``iterate()`` on the caller's thread rather than a reactor in a thread
of its own (crochet's way): the data path stays on one thread (the rule of
this project), ``f`` sees the caller's context variables, objects made in
one call (an Engine, its pooled connections, ORM instances) are used by the
next on the same thread with no locking, and nothing keeps running behind
the caller's back between calls.  ``doc/howto/scripts.md`` has the
details and the caveats.

This module knows Twisted and greenlet only (the bridge's floor).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from typing import Any, Optional, ParamSpec, TypeVar

import greenlet
from twisted.internet.defer import CancelledError
from twisted.python.failure import Failure

from txfiberdb.fiber import _Fiber, _hub, _reactor, _runs_reactor, run_in_fiber

__all__ = ["run_blocking"]

_T = TypeVar("_T")
_P = ParamSpec("_P")

#: After ``f`` returns, how many reactor turns may go to work that is due at
#: once (a fiber resumed with ``callLater(0)``, a connection handed back to
#: the pool) before the caller gets its result.
_SETTLE_TURNS = 10


def run_blocking(f: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
    """
    Run ``f(*args, **kwargs)`` in a fiber and block until it is done: return
    its result, or raise its exception (with the fiber's frames in its
    traceback).

    For code that runs no reactor: a script, a cron job, Alembic's
    ``env.py``, a notebook, a trial ``SynchronousTestCase``.  It turns the
    reactor with ``reactor.iterate()`` on this thread while ``f`` waits, and
    may be called any number of times; an Engine and its pooled connections
    carry over from one call to the next (idle in between).

    Ctrl-C cancels ``f`` where it waits (now, or at its next wait if it is
    running Python code: never in the middle of the driver's work, which
    would leave a query running on the server), lets it finish its
    clean-up, then raises :exc:`KeyboardInterrupt`.  A second Ctrl-C
    raises :exc:`KeyboardInterrupt` at once, wherever the code is (for a
    fiber that computes without ever waiting).

    Delayed calls that are not due yet when ``f`` returns (a pool's timer,
    say) stay scheduled: they run during the next call, or once the program
    runs the reactor.

    :raise RuntimeError: when the call would deadlock: made inside a fiber
        (call ``f`` directly there), or while the reactor runs (on its own
        greenlet: return ``run_in_fiber(f)``'s Deferred instead; from
        another thread: use ``blockingCallFromThread(reactor, run_in_fiber,
        f)``).
    """
    return _block_on(_blocking_greenlet(), f, args, kwargs)


def _blocking_greenlet() -> greenlet.greenlet:
    """The calling greenlet, if it may turn the reactor; else a clear error."""
    current = greenlet.getcurrent()
    if isinstance(current, _Fiber):
        raise RuntimeError(
            "run_blocking() called inside a fiber: this code may already use "
            "the database; call the function directly instead"
        )
    reactor = _reactor()
    if reactor.running or _runs_reactor():
        from twisted.python import threadable

        if not threadable.isInIOThread():
            raise RuntimeError(
                "run_blocking() called while the reactor runs in another "
                "thread: use twisted.internet.threads.blockingCallFromThread("
                "reactor, txfiberdb.run_in_fiber, f) instead"
            )
        raise RuntimeError(
            "run_blocking() called while the reactor is running: waiting here "
            "would freeze it. Start the work with txfiberdb.run_in_fiber(f) and "
            "return its Deferred (trial: use txfiberdb.testing.FiberTestCase; "
            "pytest: mark the test with @pytest.mark.fiber)"
        )
    return current


class _Interrupts:
    """
    Ctrl-C requests, served by the hub at the fiber's next wait.
    ``immediate``: raise :exc:`KeyboardInterrupt` at once instead (the
    shell sets it while it waits for input).
    """

    def __init__(self) -> None:
        self.pending = False
        self.cancelled = False
        self.immediate = False


def _block_on(
    hub: greenlet.greenlet,
    f: Callable[..., _T],
    args: Any,
    kwargs: Any,
    on_interrupt: Optional[Callable[[_Fiber], None]] = None,
    interrupts: Optional[_Interrupts] = None,
) -> _T:
    """
    Run ``f`` in a fiber and turn the reactor on ``hub`` (the caller) until
    the fiber is over.  Ctrl-C while the fiber waits: by default, cancel the
    fiber once and raise :exc:`KeyboardInterrupt` when it is over; with
    ``on_interrupt``, call it with the fiber at each of its waits that a
    Ctrl-C came before instead (the shell: cancel the statement's wait, go
    on).
    """
    reactor = _reactor()
    previous_hub = _hub.greenlet
    _hub.greenlet = hub
    outcome: list[Any] = []
    if interrupts is None:
        interrupts = _Interrupts()
    restore = _catch_sigint(reactor, interrupts, on_interrupt is None)
    try:
        d = run_in_fiber(f, *args, **kwargs)
        fib: _Fiber = d._txfiber  # type: ignore[attr-defined]
        d.addBoth(outcome.append)
        # Until the fiber is over: a cancelled fiber's Deferred fires at
        # once, but its clean-up (the query cancelled, the rollback) is
        # still to come.
        while not fib.dead:
            if interrupts.pending and fib.waiting_on is not None:
                interrupts.pending = False
                if on_interrupt is not None:
                    on_interrupt(fib)
                elif not interrupts.cancelled:
                    interrupts.cancelled = True
                    d.cancel()
                continue
            _turn(reactor)
        for _ in range(_SETTLE_TURNS):
            if reactor.timeout() != 0:
                break
            reactor.iterate(0)
    finally:
        restore()
        _hub.greenlet = previous_hub
    result = outcome[0]
    if interrupts.cancelled or (interrupts.pending and on_interrupt is None):
        if isinstance(result, Failure) and not result.check(CancelledError):
            raise KeyboardInterrupt() from result.value
        raise KeyboardInterrupt()
    if isinstance(result, Failure):
        exc = result.value
        assert exc is not None
        if exc.__traceback__ is None and result.tb is not None:
            exc = exc.with_traceback(result.tb)
        try:
            raise exc
        finally:
            del exc, result, outcome
    return result  # type: ignore[no-any-return]


def _turn(reactor: Any) -> None:
    """One turn: due timers, then wait for I/O until the next timer."""
    timeout: Optional[float] = reactor.timeout()
    reactor.iterate(timeout if timeout is not None else 1.0)


def _catch_sigint(
    reactor: Any,
    interrupts: _Interrupts,
    once: bool,
) -> Callable[[], None]:
    """
    Make Ctrl-C a request (as ``reactor.run()`` does), served when the fiber
    waits, so that it never lands in the middle of the reactor reading a
    connection or of the driver sending a query; a second Ctrl-C before the
    request is served (or, with ``once``, after it) raises at once.  Only
    on the main thread, and only when SIGINT has Python's default handler.
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        return lambda: None

    def on_sigint(signum: int, frame: Any) -> None:
        if interrupts.immediate:
            raise KeyboardInterrupt()
        if interrupts.pending or (once and interrupts.cancelled):
            raise KeyboardInterrupt()
        interrupts.pending = True
        reactor.wakeUp()

    signal.signal(signal.SIGINT, on_sigint)

    def restore() -> None:
        signal.signal(signal.SIGINT, signal.default_int_handler)

    return restore
