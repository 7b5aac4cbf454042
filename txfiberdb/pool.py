# -*- test-case-name: tests.test_pool -*-
"""
A greenlet-aware connection pool: SQLAlchemy's ``QueuePool`` whose waits park
the calling fiber instead of blocking the reactor's thread.

SQLAlchemy's stock ``QueuePool``, used under Twisted, blocks the whole reactor
for ``pool_timeout`` when it is exhausted, and the fiber holding the
connection can never give it back.  :class:`FiberQueuePool` changes only what
must change, as SQLAlchemy's own ``AsyncAdaptedQueuePool`` does for asyncio:

- the queue (:class:`FiberQueue`): a fiber that finds no idle connection parks
  on a Deferred; connections returned are handed to waiting fibers first come
  first served; ``pool_timeout`` raises SQLAlchemy's ``TimeoutError`` while
  the reactor goes on;
- SQLAlchemy's once-only connect set-up (the dialect's first-connect
  queries, ``on_connect``) runs under a mutex that parks fibers instead of a
  ``threading.Lock``, which a parked fiber would hold while a second one
  blocked the reactor's thread for good (:func:`install_fiber_mutexes`; the
  dialect installs it on any pool class);
- a connection still checked out when its fiber ends (an error, a forgotten
  Session, a cancel) is rolled back and returned when the fiber ends, with a
  warning: no registration by the application, no reliance on the garbage
  collector;
- a checkout outside a fiber fails at once with :exc:`NotInFiberError`.

Options and names are SQLAlchemy's: ``pool_size``, ``max_overflow``,
``pool_timeout``, ``pool_recycle``, ``pool_pre_ping``, ``pool_use_lifo``.
"""

from __future__ import annotations

import collections
import time
from typing import Any, Optional

from sqlalchemy.pool import QueuePool
from sqlalchemy.util.queue import Empty, Full, QueueCommon
from twisted.internet.defer import Deferred, DeferredLock
from twisted.logger import Logger

from txfiberdb.fiber import (
    NotInFiberError,
    WaitTimeout,
    await_deferred,
    current_fiber,
    on_fiber_exit,
)
from txfiberdb.fiber import stats as fiber_stats

__all__ = ["FiberQueue", "FiberQueuePool", "install_fiber_mutexes", "pool_stats"]

_log = Logger(namespace="txfiberdb.pool")


class FiberQueue(QueueCommon[Any]):
    """
    The queue of idle connections.  ``get`` parks the calling fiber when the
    queue is empty; ``put`` hands the item to the longest-waiting fiber.
    """

    def __init__(self, maxsize: int = 0, use_lifo: bool = False) -> None:
        self.maxsize = maxsize
        self.use_lifo = use_lifo
        self._items: collections.deque[Any] = collections.deque()
        self._waiters: collections.deque[tuple[Deferred[Any], float]] = (
            collections.deque()
        )
        self.longest_wait = 0.0

    def empty(self) -> bool:
        return not self._items

    def full(self) -> bool:
        return 0 < self.maxsize <= len(self._items)

    def qsize(self) -> int:
        return len(self._items)

    @property
    def waiting(self) -> int:
        """Fibers parked waiting for a connection."""
        return len(self._waiters)

    def oldest_wait(self) -> float:
        """How long the longest-waiting fiber has waited so far (seconds)."""
        if not self._waiters:
            return 0.0
        return time.monotonic() - self._waiters[0][1]

    def put_nowait(self, item: Any) -> None:
        while self._waiters:
            d, _ = self._waiters.popleft()
            if not d.called:
                d.callback(item)
                return
        if self.full():
            raise Full()
        self._items.append(item)

    def put(
        self, item: Any, block: bool = True, timeout: Optional[float] = None
    ) -> None:
        self.put_nowait(item)

    def get_nowait(self) -> Any:
        if not self._items:
            raise Empty()
        return self._items.pop() if self.use_lifo else self._items.popleft()

    def get(self, block: bool = True, timeout: Optional[float] = None) -> Any:
        if self._items or not block:
            return self.get_nowait()
        d: Deferred[Any] = Deferred()
        started = time.monotonic()
        entry = (d, started)
        self._waiters.append(entry)
        try:
            return await_deferred(d, timeout=timeout)
        except WaitTimeout:
            raise Empty() from None
        finally:
            waited = time.monotonic() - started
            if waited > self.longest_wait:
                self.longest_wait = waited
            try:
                self._waiters.remove(entry)
            except ValueError:
                pass


class _FiberMutex:
    """
    A mutex for SQLAlchemy's once-only events: a fiber that finds it taken
    parks (first come, first served) instead of blocking the thread.  Taken
    uncontended, it never waits, so the hub may take it too.
    """

    def __init__(self) -> None:
        self._lock = DeferredLock()

    def __enter__(self) -> bool:
        if self._lock.locked and current_fiber() is None:
            raise NotInFiberError(
                "a txfiberdb engine's connect set-up is running in a fiber "
                "and this call, outside any fiber, would have to wait for it: "
                "run this code with txfiberdb.run_in_fiber(f) or "
                "@txfiberdb.fibered"
            )
        acquired = self._lock.acquire()
        if not acquired.called:
            await_deferred(acquired)
        return True

    def __exit__(self, *exc: Any) -> None:
        self._lock.release()


def install_fiber_mutexes(pool: Any) -> None:
    """
    Make ``pool``'s once-only ``first_connect`` and ``connect`` event runs
    wait fiber-style.  :class:`FiberQueuePool` does it for itself; the
    ``postgresql+txpostgres`` dialect does it for any other pool class
    (``NullPool``, ``StaticPool``, ...) and again after ``Engine.dispose()``.
    """
    for name in ("first_connect", "connect"):
        listeners = getattr(pool.dispatch, name).for_modify(pool.dispatch)
        if not isinstance(listeners._exec_once_mutex, _FiberMutex):
            listeners._exec_once_mutex = _FiberMutex()


class FiberQueuePool(QueuePool):
    """
    ``QueuePool`` for fibers; the default pool of ``postgresql+txpostgres``.
    Same arguments as :class:`sqlalchemy.pool.QueuePool`.
    """

    _queue_class = FiberQueue

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._held: dict[Any, list[Any]] = {}
        install_fiber_mutexes(self)

    def connect(self) -> Any:
        fib = current_fiber()
        if fib is None:
            raise NotInFiberError(
                "a txfiberdb engine was used outside a fiber: talking to "
                "PostgreSQL waits, and waiting on the reactor's greenlet would "
                "freeze it. Run this code with txfiberdb.run_in_fiber(f) or "
                "decorate it with @txfiberdb.fibered."
            )
        fairy = super().connect()
        held = self._held.get(fib)
        if held is None:
            held = self._held[fib] = []
            on_fiber_exit(lambda: self._return_leftovers(fib), late=True)
        else:
            held[:] = [f for f in held if f.dbapi_connection is not None]
        held.append(fairy)
        return fairy

    def _return_leftovers(self, fib: Any) -> None:
        for fairy in self._held.pop(fib, ()):
            if fairy.dbapi_connection is None or fairy._connection_record is None:
                continue  # given back already
            _log.warn(
                "fiber {fiber} ended holding a pooled connection; it was "
                "rolled back and returned to the pool. Close Sessions and "
                "Connections before the fiber ends (use 'with Session(engine) "
                "as session:')",
                fiber=getattr(fib, "name", fib),
            )
            fairy._checkin()

    def stats(self) -> dict[str, Any]:
        """The pool's counters (see :func:`pool_stats`)."""
        queue: FiberQueue = self._pool  # type: ignore[assignment]
        return {
            "size": self.size(),
            "checked_out": self.checkedout(),
            "idle": sweep_idle(queue._items),
            "overflow": max(self.overflow(), 0),
            "waiting": queue.waiting,
            "oldest_wait": queue.oldest_wait(),
            "longest_wait": queue.longest_wait,
        }


def sweep_idle(records: Any) -> int:
    """
    How many of the idle connection ``records`` are alive.  The dead ones
    (the server ended them while they waited in the pool) are invalidated,
    so that the pool reconnects them on their next checkout instead of
    counting them as open.  No round trip: the driver reads what the server
    sent them.
    """
    alive = 0
    for record in list(records):
        conn = record.dbapi_connection
        if conn is None:
            continue
        check = getattr(conn, "check_alive", None)
        if check is None or check():
            alive += 1
        else:
            record.invalidate(_DiedIdle("the server ended it while it was idle"))
    return alive


class _DiedIdle(Exception):
    """Why a pooled connection was invalidated: it died while idle."""


def pool_stats(engine_or_pool: Any) -> dict[str, Any]:
    """
    Pool and fiber counters in one dict, for a metrics endpoint: ``size``,
    ``checked_out``, ``idle`` (live idle connections: those the server ended
    while they were idle are not counted, and are replaced on their next
    checkout), ``open`` (``checked_out`` + ``idle``), ``overflow``,
    ``waiting`` (fibers parked for a connection), ``oldest_wait`` and
    ``longest_wait`` (seconds), and the
    bridge's ``fibers_live``, ``fibers_parked``, ``fibers_started``,
    ``fibers_finished``, ``longest_hold``.
    """
    pool = getattr(engine_or_pool, "pool", engine_or_pool)
    out: dict[str, Any] = {}
    if isinstance(pool, FiberQueuePool):
        out.update(pool.stats())
        out["open"] = out["checked_out"] + out["idle"]
    else:
        out["checked_out"] = pool.checkedout() if hasattr(pool, "checkedout") else None
    f = fiber_stats()
    out.update(
        fibers_live=f["live"],
        fibers_parked=f["parked"],
        fibers_started=f["started"],
        fibers_finished=f["finished"],
        longest_hold=f["longest_hold"],
    )
    return out
