# -*- test-case-name: tests.test_notify -*-
"""
PostgreSQL's LISTEN/NOTIFY for sequential fiber code.

>>> with listen(engine, "stock", "orders") as notes:     # doctest: +SKIP
...     for note in notes:                              # parks between notes
...         if note.missed:                             # a gap: reload state
...             reload()
...         else:
...             handle(note.channel, note.payload)

:func:`listen` subscribes the calling fiber to one or more channels and
returns a :class:`Subscription`: iterate it (forever, until it is closed),
take one note at a time with :meth:`Subscription.get` (``timeout=`` raises
:exc:`~txfiberdb.fiber.WaitTimeout`), or iterate
:meth:`Subscription.notifies` with ``timeout=`` and ``stop_after=``, as
psycopg 3's ``Connection.notifies()`` does.  Cancelling the fiber (Klein
does when the client leaves) raises ``CancelledError`` at the wait.

How it works, and what it promises:

- **One connection per engine** serves every subscriber: not one per
  subscriber, never one of the pool's.  It is opened from the engine's URL
  (so ``postgresql+txpostgres://`` options apply) when the first subscriber
  arrives, and closed when the last one leaves, when the engine is disposed,
  or when its :class:`~txfiberdb.service.EngineService` stops.  Channels are
  LISTENed as subscribers come and UNLISTENed as they go.
- **Delivery** is in the order PostgreSQL sends them (commit order); a
  notification sent in a transaction that rolls back is never sent at all.
  Each :class:`Notification` carries ``seq``, its position in this process's
  stream from the listener, and the listener's ``epoch`` (a new one each time
  the connection is opened, so ``(epoch, seq)`` unchanged means nothing was
  received meanwhile).
- **Never silent about gaps.**  When the connection drops, the listener
  reconnects with exponential backoff (0.1 s doubling up to 10 s, with
  jitter), LISTENs again, then puts a :class:`Missed` marker
  (``note.missed`` is true, ``reason="reconnected"``) into every
  subscriber's stream: what was sent meanwhile is lost, so reload.
- **A slow subscriber** holds at most ``max_queued`` notes (1,000 by
  default).  When its queue overflows, the queued notes are dropped and a
  :class:`Missed` marker (``reason="overflow"``) takes their place; the other
  subscribers are unaffected and memory stays bounded.
- Channel names are exact (case-sensitive, quoted as identifiers), as
  ``pg_notify(channel, payload)`` takes them; an empty name, a NUL or a name
  over 63 bytes (PostgreSQL would truncate it, and it would never match) is
  refused with ``ValueError``.

Limits (PostgreSQL's): a payload is at most 8,000 bytes; LISTEN needs a
session of its own on the server, so it does **not** work through PgBouncer
in transaction (or statement) mode: point the engine that listens at
PostgreSQL directly, or at a PgBouncer pool in session mode.
"""

from __future__ import annotations

import random
import time
import uuid
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Optional, Union

from sqlalchemy import event
from twisted.internet.defer import CancelledError, Deferred, DeferredLock
from twisted.logger import Logger

from txfiberdb._errors import first_line
from txfiberdb.fiber import WaitTimeout, await_deferred, run_in_fiber, sleep

__all__ = [
    "Listener",
    "ListenerClosed",
    "Missed",
    "Notification",
    "Subscription",
    "close_listener",
    "listen",
    "listener_stats",
]

_log = Logger(namespace="txfiberdb.notify")

#: Notes a subscriber may have queued before it gets a :class:`Missed` marker.
DEFAULT_MAX_QUEUED = 1000
#: Reconnection backoff: first delay and ceiling, in seconds.
BACKOFF_FIRST = 0.1
BACKOFF_MAX = 10.0
#: PostgreSQL's identifier limit (NAMEDATALEN - 1): longer names are truncated.
MAX_CHANNEL_BYTES = 63


@dataclass(frozen=True, slots=True)
class Notification:
    """One NOTIFY: ``channel``, ``payload`` (a str), the sender's ``pid``."""

    channel: str
    payload: str
    pid: int
    #: Position in this process's stream from the listener (1, 2, ...).
    seq: int
    #: The listener connection it came through (see :attr:`Listener.epoch`).
    epoch: str

    #: Always False: this is a notification, not a gap.
    missed = False


@dataclass(frozen=True, slots=True)
class Missed:
    """
    A marker in a subscriber's stream: notifications may have been missed
    here (``reason``: ``"reconnected"`` after the connection dropped,
    ``"overflow"`` when this subscriber fell behind).  Reload what you keep.
    """

    reason: str
    #: The listener's ``seq`` when the gap was noticed.
    seq: int
    epoch: str

    #: Always True.
    missed = True


Note = Union[Notification, Missed]


class ListenerClosed(Exception):
    """
    The subscription ended: closed by its owner, or its listener closed (the
    engine was disposed, the service stopped).  Iterating a subscription
    just stops; :meth:`Subscription.get` raises this.
    """


def _check_channel(name: Any) -> str:
    if not isinstance(name, str):
        raise TypeError(f"a channel name must be a str, not {type(name).__name__}")
    if not name:
        raise ValueError("a channel name must not be empty")
    if "\x00" in name:
        raise ValueError("a channel name must not contain NUL characters")
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        raise ValueError("a channel name must be valid Unicode text") from None
    if size > MAX_CHANNEL_BYTES:
        raise ValueError(
            f"channel name of {size} bytes is over PostgreSQL's limit of "
            f"{MAX_CHANNEL_BYTES} (it would be truncated and never match)"
        )
    return name


def _quote(name: str) -> str:
    """``name`` as a quoted SQL identifier (exact, case-sensitive)."""
    return '"' + name.replace('"', '""') + '"'


class Subscription:
    """
    One subscriber's stream of notes (:class:`Notification` or
    :class:`Missed`), from :func:`listen`.  A context manager (leaving it
    closes the subscription) and an iterator (it stops when closed).
    """

    # Slots: a live page holds one per open browser tab.
    __slots__ = (
        "listener",
        "channels",
        "max_queued",
        "closed",
        "overflows",
        "_queue",
        "_waiter",
        "_gap",
        "_why",
    )

    def __init__(self, listener: Listener, channels: tuple[str, ...], max_queued: int):
        self.listener = listener
        self.channels = channels
        self.max_queued = max_queued
        self.closed = False
        #: How many times this subscriber's queue overflowed.
        self.overflows = 0
        # A list, not a deque: mostly empty (a parked subscriber takes each
        # note directly), and an empty list costs a tenth of an empty deque.
        self._queue: list[Note] = []
        self._waiter: Optional[Deferred[Note]] = None
        self._gap = False  # owes a Missed marker once the listener is back
        self._why = "the subscription was closed"

    # -- the subscriber's side ------------------------------------------

    @property
    def pending(self) -> int:
        """Notes queued, not yet taken."""
        return len(self._queue)

    @property
    def waiting(self) -> bool:
        """Whether a fiber is parked in :meth:`get` now."""
        return self._waiter is not None

    def get(self, timeout: Optional[float] = None) -> Note:
        """
        The next note, parking the fiber until there is one.

        :raise WaitTimeout: none came within ``timeout`` seconds.
        :raise ListenerClosed: the subscription or its listener is closed.
        :raise CancelledError: the fiber was cancelled while it waited.
        :raise RuntimeError: another fiber waits on this subscription.
        """
        if self._queue:
            return self._queue.pop(0)
        if self.closed:
            raise ListenerClosed(self._why)
        if self._waiter is not None:
            raise RuntimeError(
                "another fiber is already waiting on this subscription: give "
                "each fiber its own (txfiberdb.listen() in each)"
            )
        d: Deferred[Note] = Deferred(self._forget_waiter)
        self._waiter = d
        return await_deferred(d, timeout=timeout)

    def _forget_waiter(self, d: Deferred[Note]) -> None:
        if self._waiter is d:
            self._waiter = None

    def __iter__(self) -> Iterator[Note]:
        while True:
            try:
                yield self.get()
            except ListenerClosed:
                return

    def notifies(
        self, timeout: Optional[float] = None, stop_after: Optional[int] = None
    ) -> Iterator[Note]:
        """
        Iterate notes, as psycopg 3's ``Connection.notifies()``: stop after
        ``timeout`` seconds in all, or after ``stop_after`` notes, or when the
        subscription is closed (whichever comes first).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        count = 0
        while stop_after is None or count < stop_after:
            left = None
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0 and not self._queue:
                    return
            try:
                note = self.get(timeout=max(left, 0.001) if left is not None else None)
            except (WaitTimeout, ListenerClosed):
                return
            count += 1
            yield note

    def close(self) -> None:
        """Stop receiving (UNLISTEN follows in the background).  Idempotent."""
        if not self.closed:
            self.listener._unsubscribe(self)
            self._end("the subscription was closed")

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- the listener's side --------------------------------------------

    def _push(self, note: Note) -> Optional[Deferred[Note]]:
        """
        Queue ``note``, or hand back the waiter it is for: the caller fires
        it once every subscriber has had the note (a woken fiber runs at
        once, and must find the others' queues up to date).
        """
        if self.closed:
            return None
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            return waiter
        if len(self._queue) >= self.max_queued:
            # Fallen behind: what is queued is stale once the subscriber
            # reloads, so it goes, and one marker takes its place.
            self.overflows += 1
            self._queue.clear()
            listener = self.listener
            self._queue.append(Missed("overflow", listener.seq, listener.epoch))
        self._queue.append(note)
        return None

    def _end(self, why: str) -> None:
        self.closed = True
        self._why = why
        waiter, self._waiter = self._waiter, None
        if waiter is not None:
            waiter.errback(ListenerClosed(why))

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{len(self._queue)} queued"
        return f"<Subscription {', '.join(self.channels)} ({state})>"


class Listener:
    """
    The LISTEN connection of one engine and its subscribers (see the module's
    documentation).  Get it with :func:`listen` rather than directly.
    """

    def __init__(self, engine: Any) -> None:
        dialect = engine.dialect
        dbapi = getattr(dialect, "loaded_dbapi", None)
        if (
            dbapi is None
            or not hasattr(dbapi, "Connection")
            or not hasattr(dbapi.Connection, "add_notify_observer")
        ):
            raise TypeError(
                "txfiberdb.listen() needs an engine on postgresql+txpostgres:// "
                f"(this one is {engine.url.drivername!r})"
            )
        # The dialect and URL only: the engine may be collected meanwhile.
        self._dialect = dialect
        self._url = engine.url
        self._conn: Any = None
        self._subs: dict[str, set[Subscription]] = {}
        self._listening: set[str] = set()
        self._lock = DeferredLock()
        self._dirty = False
        self._syncer: Optional[Deferred[None]] = None
        self._reconnector: Optional[Deferred[None]] = None
        self.closed = False
        #: Notifications received so far (the last one's ``seq``).
        self.seq = 0
        #: A new token each time the connection is opened.
        self.epoch = ""
        #: Times the connection was lost and opened again.
        self.reconnects = 0
        self.failed_attempts = 0

    # -- state -----------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._conn is not None and not self._conn.closed

    def subscriptions(self) -> set[Subscription]:
        """The open subscriptions."""
        return {s for group in self._subs.values() for s in group}

    def stats(self) -> dict[str, Any]:
        """Figures for a status page or metrics."""
        subs = self.subscriptions()
        return {
            "connected": self.connected,
            "subscribers": len(subs),
            "channels": sorted(self._listening),
            "received": self.seq,
            "reconnects": self.reconnects,
            "queued": sum(s.pending for s in subs),
            "overflows": sum(s.overflows for s in subs),
        }

    # -- subscribers ------------------------------------------------------

    def subscribe(self, channels: tuple[str, ...], max_queued: int) -> Subscription:
        """Add a subscriber; returns once its channels are LISTENed."""
        if self.closed:
            raise ListenerClosed("the listener is closed (engine disposed)")
        sub = Subscription(self, channels, max_queued)
        for ch in channels:
            self._subs.setdefault(ch, set()).add(sub)
        try:
            self._sync()
        except BaseException:
            self._unsubscribe(sub)
            sub._end("could not subscribe")
            raise
        return sub

    def _unsubscribe(self, sub: Subscription) -> None:
        for ch in sub.channels:
            group = self._subs.get(ch)
            if group is not None:
                group.discard(sub)
                if not group:
                    del self._subs[ch]
        if not self.closed:
            self._schedule_sync()

    def _schedule_sync(self) -> None:
        self._dirty = True
        if self._syncer is None:
            d = run_in_fiber(self._sync_loop)
            if not d.called:
                self._syncer = d
            d.addErrback(self._log_failure, "background LISTEN/UNLISTEN")

    def _sync_loop(self) -> None:
        try:
            while self._dirty and not self.closed:
                self._dirty = False
                try:
                    self._sync()
                except CancelledError:
                    return
                except Exception:
                    pass  # logged by _lost; the reconnector takes over
        finally:
            self._syncer = None

    @staticmethod
    def _log_failure(failure: Any, what: str) -> None:
        if not failure.check(CancelledError):
            _log.failure("{what} failed", failure, what=what)

    # -- the connection ---------------------------------------------------

    def _sync(self) -> None:
        """
        Make the server's LISTENs match the subscribers' channels, connecting
        first if needed (and closing when nobody listens).  Serialised: one
        fiber talks to the connection at a time.
        """
        await_deferred(self._lock.acquire())
        try:
            if self.closed:
                return
            wanted = set(self._subs)
            if not wanted:
                self._close_connection()
                return
            conn = self._conn
            if conn is not None and conn.closed:
                # Ended unnoticed (e.g. during a query): a gap for everyone.
                self._lost(conn, "the connection was closed")
                conn = None
            if conn is None:
                conn = self._connect()
            try:
                cursor = conn.cursor()
                for ch in sorted(wanted - self._listening):
                    cursor.execute("LISTEN " + _quote(ch))
                    self._listening.add(ch)
                for ch in sorted(self._listening - wanted):
                    cursor.execute("UNLISTEN " + _quote(ch))
                    self._listening.discard(ch)
            except CancelledError:
                raise
            except Exception as e:
                if conn.closed:
                    self._lost(conn, first_line(e))
                raise
            self._mark_gaps()
        finally:
            self._lock.release()

    def _connect(self) -> Any:
        self._conn = None
        self._listening = set()
        cargs, cparams = self._dialect.create_connect_args(self._url)
        cparams = dict(cparams)
        cparams.setdefault("application_name", "txfiberdb listener")
        # A peer that vanishes without a word (a cable, a firewall) is
        # noticed by TCP keepalives within about a minute.
        cparams.setdefault("keepalives", 1)
        cparams.setdefault("keepalives_idle", 30)
        cparams.setdefault("keepalives_interval", 10)
        cparams.setdefault("keepalives_count", 3)
        conn = self._dialect.loaded_dbapi.connect(*cargs, **cparams)
        if self.closed:  # closed while connecting
            conn.close()
            raise ListenerClosed("the listener is closed (engine disposed)")
        conn.autocommit = True
        conn.add_notify_observer(self._on_notify)
        conn.add_lost_observer(lambda reason: self._lost(conn, reason))
        self._conn = conn
        self.epoch = uuid.uuid4().hex[:8]
        return conn

    def _mark_gaps(self) -> None:
        """LISTENing again after a loss: tell those who were there before."""
        owed = [s for s in self.subscriptions() if s._gap]
        for sub in owed:
            sub._gap = False
        _deliver(Missed("reconnected", self.seq, self.epoch), owed)

    def _on_notify(self, notify: Any) -> None:
        if self.closed:
            return
        self.seq += 1
        note = Notification(
            notify.channel, notify.payload, notify.pid, self.seq, self.epoch
        )
        group = self._subs.get(notify.channel)
        if group:
            _deliver(note, group)

    def _lost(self, conn: Any, reason: str) -> None:
        """The server ended the connection (idle or mid-query): reconnect."""
        if conn is not self._conn:
            return
        self._conn = None
        self._listening = set()
        try:
            conn.close()
        except Exception:
            pass
        if self.closed:
            return
        for sub in self.subscriptions():
            sub._gap = True
        _log.warn(
            "LISTEN connection lost ({reason}); reconnecting",
            reason=reason.splitlines()[0] if reason else "unknown",
        )
        self._start_reconnecting()

    def _start_reconnecting(self) -> None:
        if self._reconnector is not None or self.closed or not self._subs:
            return
        d = run_in_fiber(self._reconnect_loop)
        if not d.called:
            self._reconnector = d
        d.addErrback(self._log_failure, "LISTEN reconnection")

    def _reconnect_loop(self) -> None:
        delay = BACKOFF_FIRST
        attempts = 0
        try:
            while not self.closed and self._subs and not self.connected:
                sleep(delay * random.uniform(0.5, 1.0))
                attempts += 1
                try:
                    self._sync()
                except CancelledError:
                    return
                except Exception as e:
                    self.failed_attempts += 1
                    if attempts & (attempts - 1) == 0:  # 1, 2, 4, 8...: bounded log
                        _log.warn(
                            "LISTEN reconnection attempt {n} failed: {reason}",
                            n=attempts,
                            reason=first_line(e),
                        )
                    delay = min(delay * 2, BACKOFF_MAX)
            if self.connected:
                self.reconnects += 1
                _log.info("LISTEN connection restored after {n} attempt(s)", n=attempts)
        except CancelledError:
            return
        finally:
            self._reconnector = None

    def _close_connection(self) -> None:
        conn, self._conn = self._conn, None
        self._listening = set()
        if conn is not None:
            try:
                conn.remove_notify_observer(self._on_notify)
                conn.close()
            except Exception:
                pass

    def close(self) -> None:
        """
        Close the connection and end every subscription (their iterations
        stop, :meth:`Subscription.get` raises :exc:`ListenerClosed`).
        Callable from anywhere, never waits.
        """
        if self.closed:
            return
        self.closed = True
        for d in (self._reconnector, self._syncer):
            if d is not None:
                d.cancel()
        self._close_connection()
        subs = self.subscriptions()
        self._subs.clear()
        for sub in subs:
            sub._end("the listener was closed (engine disposed or service stopped)")


def _deliver(note: Note, subs: Iterable[Subscription]) -> None:
    """Give ``note`` to each of ``subs``, then wake those who were waiting."""
    woken = []
    for sub in list(subs):
        waiter = sub._push(note)
        if waiter is not None:
            woken.append((sub, waiter))
    for sub, waiter in woken:
        if waiter.called:
            # Its wait ended meanwhile (a fiber woken before it cancelled
            # it, or its timeout): keep the note for its next get().
            if not sub.closed:
                sub._queue.insert(0, note)
        else:
            waiter.callback(note)


_listeners: weakref.WeakKeyDictionary[Any, Listener] = weakref.WeakKeyDictionary()
_watched: weakref.WeakSet[Any] = weakref.WeakSet()


def _listener_for(engine: Any) -> Listener:
    listener = _listeners.get(engine)
    if listener is None or listener.closed:
        listener = _listeners[engine] = Listener(engine)
        if engine not in _watched:
            _watched.add(engine)
            event.listen(engine, "engine_disposed", close_listener)
    return listener


def listen(
    engine: Any, *channels: str, max_queued: int = DEFAULT_MAX_QUEUED
) -> Subscription:
    """
    Subscribe the calling fiber to ``channels``; returns once they are
    LISTENed (a NOTIFY committed after this returns is delivered).  Use the
    result as a context manager, and iterate it.

    :param engine: a SQLAlchemy Engine on ``postgresql+txpostgres://``, or
        an :class:`~txfiberdb.service.EngineService`.
    :param max_queued: notes this subscriber may fall behind by before its
        queue is replaced by a :class:`Missed` marker.
    :raise ValueError: no channel, or a bad channel name.
    :raise OperationalError: the listener could not connect.
    :raise NotInFiberError: outside a fiber.
    """
    engine = getattr(engine, "engine", engine)
    if engine is None:
        raise ValueError("the EngineService is not started: it has no engine yet")
    if not channels:
        raise ValueError("listen() needs at least one channel name")
    if max_queued < 1:
        raise ValueError(f"max_queued must be at least 1, not {max_queued}")
    names = tuple(dict.fromkeys(_check_channel(ch) for ch in channels))
    return _listener_for(engine).subscribe(names, max_queued)


def close_listener(engine: Any) -> None:
    """
    Close ``engine``'s listener, if it has one: its connection closes and
    every subscription ends.  Runs when the engine is disposed; an
    :class:`~txfiberdb.service.EngineService` calls it when it stops, so
    that fibers waiting for notifications end instead of holding up the
    shutdown.  A later :func:`listen` opens a new one.
    """
    listener = _listeners.pop(engine, None)
    if listener is not None:
        listener.close()


def listener_stats(engine: Any) -> dict[str, Any]:
    """
    The figures of ``engine``'s listener (:meth:`Listener.stats`):
    ``connected``, ``subscribers``, ``channels``, ``received``,
    ``reconnects``, ``queued``, ``overflows``.
    """
    engine = getattr(engine, "engine", engine)
    listener = _listeners.get(engine) if engine is not None else None
    if listener is None:
        return {
            "connected": False,
            "subscribers": 0,
            "channels": [],
            "received": 0,
            "reconnects": 0,
            "queued": 0,
            "overflows": 0,
        }
    return listener.stats()
