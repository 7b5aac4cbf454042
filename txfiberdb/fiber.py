# -*- test-case-name: tests.test_fiber -*-
"""
The bridge between Twisted's Deferreds and synchronous code in greenlets.

A *fiber* is a greenlet started by :func:`run_in_fiber` (or a function
decorated with :func:`fibered`).  Inside a fiber, :func:`await_deferred` parks
the fiber until a Deferred fires and then returns its result (or raises its
exception), while the reactor goes on serving everybody else.

The *hub* is the greenlet that runs the reactor: the main greenlet under
``twistd`` and ``trial``, a greenlet of its own under pytest-twisted.  Rules
kept here, so callers need not think about them:

- fibers are only ever resumed from the hub; a Deferred that fires inside
  fiber A and wakes fiber B hands B to the hub (``callLater(0)``) instead of
  switching A to B, which would leave A suspended for ever;
- waiting on the hub raises :exc:`NotInFiberError` at once instead of
  freezing the reactor;
- cancelling the Deferred of :func:`run_in_fiber` throws
  :exc:`~twisted.internet.defer.CancelledError` into the fiber at its wait and
  cancels what it waited on; :func:`shield` protects a block of work;
- a fiber that holds the reactor longer than :func:`set_slow_threshold`
  without waiting is reported through :mod:`twisted.logger`.

This module knows Twisted and greenlet only.
"""

from __future__ import annotations

import contextvars
import functools
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Optional, ParamSpec, Protocol, TypeVar

import greenlet
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.defer import TimeoutError as DeferredTimeoutError
from twisted.logger import Logger
from twisted.python.failure import Failure

__all__ = [
    "FiberStats",
    "NotInFiberError",
    "WaitTimeout",
    "await_deferred",
    "current_fiber",
    "fibered",
    "in_fiber",
    "on_fiber_exit",
    "park",
    "run_in_fiber",
    "set_hub",
    "set_slow_threshold",
    "shield",
    "sleep",
    "stats",
    "unpark",
]

_T = TypeVar("_T")
_P = ParamSpec("_P")
_log = Logger(namespace="txfiberdb.fiber")
_getcurrent = greenlet.getcurrent
_perf = time.perf_counter


class NotInFiberError(RuntimeError):
    """
    A call that waits was made outside a fiber (on the reactor's greenlet, or
    in a greenlet that txfiberdb did not start).
    """


class WaitTimeout(DeferredTimeoutError):
    """
    :func:`await_deferred` gave up after its ``timeout``; what it waited on has
    been cancelled.
    """


class _Hub:
    """Where the reactor runs, and the counters of :func:`stats`."""

    greenlet: Optional[greenlet.greenlet] = None
    learning = False
    slow_threshold: Optional[float] = 0.1
    started = 0
    finished = 0
    parked = 0
    longest_hold = 0.0


_hub = _Hub()


def _reactor() -> Any:
    from twisted.internet import reactor

    return reactor


def set_hub(glet: Optional[greenlet.greenlet]) -> None:
    """
    Declare which greenlet runs the reactor.

    Rarely needed: txfiberdb learns it on the reactor's first turn, and the
    pytest plugin sets it for pytest-twisted.  ``None`` forgets it.
    """
    _hub.greenlet = glet


def _learn_hub() -> None:
    _hub.greenlet = _getcurrent()


def _get_hub() -> greenlet.greenlet:
    hub = _hub.greenlet
    if hub is not None and not hub.dead:
        return hub
    if not _hub.learning:
        # The first reactor turn tells us which greenlet runs the reactor;
        # until then the thread's main greenlet is the best guess (twistd and
        # trial run the reactor there).
        _hub.learning = True
        reactor = _reactor()
        if reactor.running:
            reactor.callLater(0, _learn_hub)
        else:
            reactor.callWhenRunning(_learn_hub)
    glet = _getcurrent()
    if not isinstance(glet, _Fiber) and _runs_reactor():
        _hub.greenlet = glet
        return glet
    while glet.parent is not None:
        glet = glet.parent
    return glet


def _runs_reactor() -> bool:
    """Whether the reactor's loop is on the current greenlet's stack."""
    frame: Any = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "mainLoop" and frame.f_globals.get(
            "__name__", ""
        ).startswith("twisted.internet"):
            return True
        frame = frame.f_back
    return False


_NOTHING: Any = object()


class Waiter(Protocol):
    """What a parked fiber waits on: anything that can be cancelled."""

    def cancel(self) -> Any: ...


class _Fiber(greenlet.greenlet):  # type: ignore[misc]
    """A greenlet that waits through the bridge."""

    __slots__ = (
        "deferred",
        "waiting_on",
        "cancel_pending",
        "shield_depth",
        "exit_callbacks",
        "late_exit_callbacks",
        "name",
        "early",
    )

    def __init__(
        self,
        run: Callable[..., Any],
        parent: greenlet.greenlet,
        deferred: Deferred[Any],
        name: str,
    ) -> None:
        super().__init__(run, parent)
        self.deferred = deferred
        self.waiting_on: Optional[Waiter] = None
        self.cancel_pending = False
        self.shield_depth = 0
        self.exit_callbacks: list[Callable[[], Any]] = []
        self.late_exit_callbacks: list[Callable[[], Any]] = []
        self.name = name
        self.early: Any = _NOTHING

    def got(self, result: Any, d: Deferred[Any]) -> None:
        """The callback of the Deferred this fiber waits on."""
        if self.waiting_on is d:
            unpark(self, result)
        else:  # fired before the fiber parked on it
            self.early = result

    def __repr__(self) -> str:
        state = "dead" if self.dead else ("parked" if self.waiting_on else "ready")
        return f"<fiber {self.name} {state}>"


def current_fiber() -> Optional[greenlet.greenlet]:
    """The fiber running now, or ``None`` outside a fiber."""
    cur = _getcurrent()
    return cur if isinstance(cur, _Fiber) else None


def in_fiber() -> bool:
    """Whether the caller runs in a fiber (and may wait)."""
    return isinstance(_getcurrent(), _Fiber)


def _resume(fib: _Fiber, value: Any) -> None:
    """Switch from the hub into ``fib``; deliver its outcome if it ended."""
    if fib.dead:
        return
    start = _perf()
    outcome = fib.switch(value)
    held = _perf() - start
    if held > _hub.longest_hold:
        _hub.longest_hold = held
    threshold = _hub.slow_threshold
    if threshold is not None and held > threshold:
        _log.warn(
            "fiber {fiber} held the reactor for {held:.3f}s without waiting "
            "(threshold {threshold}s): move CPU-heavy work out of the "
            "reactor's thread or split it",
            fiber=fib.name,
            held=held,
            threshold=threshold,
        )
    if fib.dead:
        _deliver(fib, outcome)


def _deliver(fib: _Fiber, outcome: Any) -> None:
    _hub.finished += 1
    d = fib.deferred
    if d.called:
        # Cancelled: the caller has had its CancelledError already.
        if isinstance(outcome, Failure) and not outcome.check(CancelledError):
            _log.failure(
                "fiber {fiber} failed after it was cancelled",
                outcome,
                fiber=fib.name,
            )
        return
    if isinstance(outcome, Failure):
        d.errback(outcome)
    else:
        d.callback(outcome)


def park(waiter: Waiter) -> Any:
    """
    Low level: park the current fiber until :func:`unpark` resumes it; return
    the value given there, or raise it if it is a Failure.  Cancelling the
    fiber calls ``waiter.cancel()``, which must lead to an :func:`unpark`
    (with a ``CancelledError`` failure, or the outcome).  For drivers that
    wait on their own events without a Deferred per wait; everybody else
    uses :func:`await_deferred`.
    """
    fib = _getcurrent()
    if not isinstance(fib, _Fiber):
        raise NotInFiberError(
            f"park() called outside a fiber (here: {fib!r}); waiting on the "
            "reactor's greenlet would freeze the reactor. Run this code in a "
            "fiber with txfiberdb.run_in_fiber(f) or @txfiberdb.fibered."
        )
    if fib.cancel_pending and not fib.shield_depth:
        fib.cancel_pending = False
        waiter.cancel()
        raise CancelledError()
    fib.waiting_on = waiter
    _hub.parked += 1
    result = fib.parent.switch()
    if isinstance(result, Failure):
        _raise(result)
    return result


def unpark(fib: greenlet.greenlet, value: Any) -> None:
    """
    Resume a fiber parked by :func:`park` (or :func:`await_deferred`) with
    ``value``: at once when called on the hub, on the next reactor turn
    otherwise (fibers are resumed from the hub only).  No-op for a fiber
    that is not parked.
    """
    assert isinstance(fib, _Fiber)
    if fib.waiting_on is None:
        return
    fib.waiting_on = None
    _hub.parked -= 1
    if _getcurrent() is fib.parent:
        _resume(fib, value)
    else:
        _reactor().callLater(0, _resume, fib, value)


def _raise(failure: Failure) -> None:
    exc = failure.value
    assert exc is not None
    if exc.__traceback__ is None and failure.tb is not None:
        exc = exc.with_traceback(failure.tb)
    raise exc


def run_in_fiber(
    f: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs
) -> Deferred[_T]:
    """
    Run ``f(*args, **kwargs)`` in a new fiber.

    The fiber gets a copy of the caller's :mod:`contextvars`.  Called on the
    hub, ``f`` runs at once up to its first wait; called from a fiber (or any
    other greenlet), it starts on the reactor's next turn.

    :return: a Deferred that fires with ``f``'s result, or with its failure
        (whose traceback holds the fiber's frames).  Cancelling it throws
        :exc:`CancelledError` into the fiber where it waits.
    """
    hub = _get_hub()
    ctx = contextvars.copy_context()
    d: Deferred[_T] = Deferred(_cancel_fiber)

    def body(_: Any = None) -> Any:
        try:
            try:
                result = f(*args, **kwargs)
            finally:
                _run_exit_callbacks(fib)
        except BaseException:
            return Failure()
        return result

    fib = _Fiber(body, hub, d, getattr(f, "__qualname__", repr(f)))
    fib.gr_context = ctx
    d._txfiber = fib  # type: ignore[attr-defined]
    _hub.started += 1
    if _getcurrent() is hub:
        _resume(fib, None)
    else:
        _reactor().callLater(0, _resume, fib, None)
    return d


def fibered(f: Callable[_P, _T]) -> Callable[_P, Deferred[_T]]:
    """
    Decorate ``f`` so that each call runs it in a new fiber and returns a
    Deferred (for Klein routes, service start-up, trial tests).
    """

    @functools.wraps(f)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> Deferred[_T]:
        return run_in_fiber(f, *args, **kwargs)

    return wrapper


def _cancel_fiber(d: Deferred[Any]) -> None:
    fib: _Fiber = d._txfiber  # type: ignore[attr-defined]
    if fib.dead:
        return
    if not fib:
        # Not started yet: it never will; its scheduled start finds a no-op.
        fib.run = lambda *_: None
        return
    waiting = fib.waiting_on
    if waiting is None or fib.shield_depth:
        # Running now (it cancelled itself), or shielded: it lands at the
        # next unshielded wait.
        fib.cancel_pending = True
        return
    waiting.cancel()


@contextmanager
def shield() -> Iterator[None]:
    """
    Let the enclosed block finish even if the fiber is cancelled meanwhile.

    A cancellation that arrives inside the block is held back and raised as
    :exc:`CancelledError` when the block ends (or at the next wait after it).
    """
    fib = _getcurrent()
    if not isinstance(fib, _Fiber):
        raise NotInFiberError(
            "shield() is only meaningful inside a fiber: start the work with "
            "txfiberdb.run_in_fiber() or @txfiberdb.fibered"
        )
    fib.shield_depth += 1
    try:
        yield
    finally:
        fib.shield_depth -= 1
    if not fib.shield_depth and fib.cancel_pending:
        fib.cancel_pending = False
        raise CancelledError("cancelled while shielded")


def on_fiber_exit(callback: Callable[[], Any], late: bool = False) -> None:
    """
    Call ``callback()`` in the current fiber when its function returns or
    raises, before its Deferred fires (last registered, first called).  The
    callback may wait; a cancellation that arrives meanwhile does not
    interrupt it.  Errors are logged.

    :param late: run after every callback registered without ``late`` (last
        registered, first called among the late ones).  For what must see the
        application's own clean-up done first: the pool gives back what a
        fiber forgot to return once Sessions closed at fiber exit have
        returned theirs.
    """
    fib = _getcurrent()
    if not isinstance(fib, _Fiber):
        raise NotInFiberError(
            "on_fiber_exit() needs a fiber: start the work with "
            "txfiberdb.run_in_fiber() or @txfiberdb.fibered"
        )
    (fib.late_exit_callbacks if late else fib.exit_callbacks).append(callback)


def _run_exit_callbacks(fib: _Fiber) -> None:
    # Shielded as a whole: a cancellation that arrives now is moot (the
    # fiber's function is over) and must not cut a clean-up short.
    fib.shield_depth += 1
    try:
        # Until both lists are empty: a callback may register more.
        while fib.exit_callbacks or fib.late_exit_callbacks:
            callbacks = fib.exit_callbacks or fib.late_exit_callbacks
            callback = callbacks.pop()
            try:
                callback()
            except BaseException:
                _log.failure(
                    "exit callback {callback!r} of fiber {fiber} failed",
                    callback=callback,
                    fiber=fib.name,
                )
    finally:
        fib.shield_depth -= 1
        fib.cancel_pending = False


def await_deferred(d: Deferred[_T], timeout: Optional[float] = None) -> _T:
    """
    Park the current fiber until ``d`` fires; return its result or raise its
    exception.  An already-fired Deferred returns without parking.  Waiting
    consumes ``d``'s result, as ``await`` does.

    :param timeout: seconds after which ``d`` is cancelled and
        :exc:`WaitTimeout` raised.
    :raise NotInFiberError: outside a fiber.
    """
    fib = _getcurrent()
    if not isinstance(fib, _Fiber):
        raise NotInFiberError(
            f"await_deferred() called outside a fiber (here: {fib!r}); waiting on "
            "the reactor's greenlet would freeze the reactor. Run this code in "
            "a fiber with txfiberdb.run_in_fiber(f) or @txfiberdb.fibered, or "
            "use the Deferred's callbacks."
        )
    d.addBoth(fib.got, d)
    result = fib.early
    if result is not _NOTHING:
        fib.early = _NOTHING
    elif fib.cancel_pending and not fib.shield_depth:
        fib.cancel_pending = False
        d.cancel()
        result = fib.early
        fib.early = _NOTHING
        if result is _NOTHING:  # a Deferred that ignores cancellation
            result = Failure(CancelledError())
    else:
        fib.waiting_on = d
        _hub.parked += 1
        if timeout is None:
            result = fib.parent.switch()
        else:
            timed_out = []

            def expire() -> None:
                timed_out.append(True)
                d.cancel()

            timer = _reactor().callLater(timeout, expire)
            result = fib.parent.switch()
            if timer.active():
                timer.cancel()
            if (
                timed_out
                and isinstance(result, Failure)
                and result.check(CancelledError)
            ):
                raise WaitTimeout(
                    f"gave up waiting for {d!r} after {timeout} s"
                ) from result.value
    if isinstance(result, Failure):
        _raise(result)
    return result  # type: ignore[no-any-return]


def sleep(seconds: float) -> None:
    """Park the current fiber for ``seconds`` (the reactor keeps running)."""
    from twisted.internet.task import deferLater

    await_deferred(deferLater(_reactor(), seconds, lambda: None))


def set_slow_threshold(seconds: Optional[float]) -> None:
    """
    Warn (through twisted.logger) when a fiber runs longer than ``seconds``
    without waiting, holding up the reactor.  ``None`` turns it off.  The
    default is 0.1 s.
    """
    _hub.slow_threshold = seconds


class FiberStats(dict):  # type: ignore[type-arg]
    """What :func:`stats` returns: a plain dict, typed for readers."""


def stats() -> FiberStats:
    """
    Counters of the bridge: ``started`` and ``finished`` fibers (totals),
    ``live`` (started, not finished), ``parked`` (waiting on a Deferred now),
    ``longest_hold`` (the longest a fiber held the reactor, in seconds).
    """
    return FiberStats(
        started=_hub.started,
        finished=_hub.finished,
        live=_hub.started - _hub.finished,
        parked=_hub.parked,
        longest_hold=_hub.longest_hold,
    )
