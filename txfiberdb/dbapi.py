# -*- test-case-name: tests.test_dbapi,tests.test_background_end,tests.test_prepare -*-
"""
A PEP 249 (DB-API 2.0) driver for PostgreSQL, for code running in fibers.

Calls look blocking; underneath, each query goes through txpostgres and the
reactor, and only the calling fiber waits.  Call it from a fiber
(:func:`txfiberdb.run_in_fiber`); on the reactor's greenlet every call that
talks to the server raises :exc:`txfiberdb.NotInFiberError`.

psycopg2's asynchronous mode, which txpostgres drives, differs from ordinary
psycopg2; this module hides the differences:

- Transactions as PEP 249 wants them: ``BEGIN`` (with the isolation level,
  read-only and deferrable settings of :meth:`Connection.set_session`) is sent
  in the same round trip as the first statement of a transaction; ``commit()``
  and ``rollback()`` send ``COMMIT``/``ROLLBACK``.  ``autocommit = True``
  sends no ``BEGIN`` (but ``with conn:`` does, as in psycopg2 2.9), and sends
  the session settings as the server's ``default_transaction_*``.
- Cursors are psycopg2 cursors whose ``execute`` parks the fiber: results,
  ``scroll``, ``tzinfo_factory``, ``cursor_factory`` (``DictCursor``, ...) and
  psycopg2's functions that take a cursor work as in psycopg2.
- Two-phase commit (``xid``, ``tpc_*``) with ``PREPARE TRANSACTION``.
- ``executemany`` sends a whole batch per round trip: ``INSERT ... VALUES``
  becomes one multi-row ``INSERT`` (exact ``rowcount``); other statements are
  sent as pages of ``;``-joined statements (``rowcount`` is then -1, as PEP
  249 allows).
- Named (server-side) cursors are ``DECLARE``/``FETCH`` inside the
  transaction, fetched in batches of ``itersize`` rows; a named cursor never
  executed reads one declared elsewhere (a ``refcursor``).
- COPY would wedge an asynchronous connection for good: it is refused before
  anything is sent.
- ``connect_timeout`` is enforced with a reactor timer.
- Cancelling the waiting fiber sends a PostgreSQL cancel, waits for the
  server to confirm, and raises ``CancelledError``; the connection stays
  usable (its transaction, if any, must be rolled back).
- A connection the server ended (killed backend, restart) reports itself
  closed and raises psycopg2's ``OperationalError``/``InterfaceError``;
  nothing is logged as an unhandled error.
- Two options of :func:`connect`, off by default (the SQLAlchemy dialect
  turns them on): ``background_end`` ends transactions without waiting where
  the outcome cannot matter (``rollback()``; ``commit()`` of a transaction
  that only read), and ``prepare_threshold`` prepares statements run often
  on the connection (SQL ``PREPARE``/``EXECUTE``, psycopg 3's semantics).
  doc/howto/performance.md.

Errors are psycopg2's own classes, so ``except psycopg2.IntegrityError`` keeps
working.  Types are converted as psycopg2 converts them (json, jsonb, uuid,
arrays, numeric, ranges, ...); hstore after :meth:`Connection.register_hstore`.
What still differs from psycopg2, and why: doc/howto/driver.md.
"""

from __future__ import annotations

import functools
import os
import re
import select
import socket
import sys
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Optional

import psycopg2
import psycopg2.extensions
import psycopg2.extras
import psycopg2.sql
import psycopg2.tz
from psycopg2 import (  # noqa: F401  (re-exported, PEP 249)
    BINARY,
    DATETIME,
    NUMBER,
    ROWID,
    STRING,
    Binary,
    DatabaseError,
    DataError,
    Date,
    DateFromTicks,
    Error,
    IntegrityError,
    InterfaceError,
    InternalError,
    NotSupportedError,
    OperationalError,
    ProgrammingError,
    Time,
    TimeFromTicks,
    Timestamp,
    TimestampFromTicks,
    Warning,
)
from psycopg2.extensions import (
    POLL_OK,
    POLL_READ,
    POLL_WRITE,
    STATUS_BEGIN,
    STATUS_PREPARED,
    STATUS_READY,
    TRANSACTION_STATUS_IDLE,
    TRANSACTION_STATUS_INTRANS,
    TRANSACTION_STATUS_UNKNOWN,
)
from twisted.internet.defer import CancelledError, Deferred, DeferredSemaphore, fail
from twisted.logger import Logger
from twisted.python.failure import Failure
from txpostgres import txpostgres

from txfiberdb._prepared import (
    _DDL_TAGS,
    _DROPS_PREPARED,
    _PROCESS_TOKEN,
    DEFAULT_PREPARED_MAX,
    _PreparedCache,
)
from txfiberdb.fiber import (
    NotInFiberError,
    WaitTimeout,
    await_deferred,
    current_fiber,
    in_fiber,
    park,
    shield,
    unpark,
)

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "Connection",
    "Cursor",
    "ServerCursor",
    "UnstorableValueError",
    "apilevel",
    "connect",
    "paramstyle",
    "threadsafety",
]

apilevel = "2.0"
threadsafety = 1
paramstyle = "pyformat"
# psycopg2's companion modules, as the driver's own: code written for psycopg2
# finds ``<driver>.extensions``, ``.extras``, ``.errors``, ``.sql``, ``.tz``
# here, as attributes and as modules (``import txfiberdb.dbapi.extensions``
# works, the way ``import os.path`` does).  They are psycopg2's, unchanged:
# what takes a connection takes a txfiberdb cursor or ``raw_connection``
# (doc/howto/driver.md lists which).
extensions = psycopg2.extensions
extras = psycopg2.extras
errors = psycopg2.errors
sql = psycopg2.sql
tz = psycopg2.tz
for _name in ("extensions", "extras", "errors", "sql", "tz"):
    sys.modules.setdefault(f"{__name__}.{_name}", getattr(psycopg2, _name))
__version__ = psycopg2.__version__

_log = Logger(namespace="txfiberdb.dbapi")

#: Seconds :func:`connect` waits for a connection when neither its
#: ``connect_timeout`` argument nor the DSN says (libpq waits for ever).
DEFAULT_CONNECT_TIMEOUT = 10.0

#: How long to wait for the server to confirm a cancel before giving the
#: connection up (seconds).
CANCEL_GRACE = 10.0

_ISOLATION_NAMES = {
    psycopg2.extensions.ISOLATION_LEVEL_READ_UNCOMMITTED: "READ UNCOMMITTED",
    psycopg2.extensions.ISOLATION_LEVEL_READ_COMMITTED: "READ COMMITTED",
    psycopg2.extensions.ISOLATION_LEVEL_REPEATABLE_READ: "REPEATABLE READ",
    psycopg2.extensions.ISOLATION_LEVEL_SERIALIZABLE: "SERIALIZABLE",
}
_ISOLATION_LEVELS = {name: level for level, name in _ISOLATION_NAMES.items()}
# A readonly/deferrable state as a default_transaction_* parameter value.
_GUC_STATE = {None: "default", True: "on", False: "off"}


def _parse_isolation_level(value: Any) -> Optional[int]:
    """
    An isolation level as psycopg2 accepts it: None or "default" (any case)
    for the server's default, 1-4, or a level's name (any case).
    """
    if value is None:
        return None
    if isinstance(value, int):
        if not 1 <= value <= 4:
            raise ValueError("isolation_level must be between 1 and 4")
        return int(value)
    name = value.decode() if isinstance(value, bytes) else str(value)
    if name.upper() == "DEFAULT":
        return None
    if name.upper() in _ISOLATION_LEVELS:
        return _ISOLATION_LEVELS[name.upper()]  # type: ignore[no-any-return]
    raise ValueError(
        f"bad value for isolation_level: {name!r}: use one of "
        f"{sorted(_ISOLATION_LEVELS)}, 'default', or psycopg2's "
        f"ISOLATION_LEVEL_* constants"
    )


def _parse_on_off(value: Any) -> Optional[bool]:
    """readonly/deferrable as psycopg2 accepts them: None or "default" for
    the server's default, otherwise the value's truth."""
    if value is None:
        return None
    if type(value) in (str, bytes):
        text = value.decode() if isinstance(value, bytes) else value
        if text.lower() == "default":
            return None
        raise ValueError(f"the only string accepted is 'default'; got {text!r}")
    return bool(value)


# Statements (after comments) that start with COPY, anywhere in the string.
_COPY = re.compile(
    r"(?:^|;)\s*(?:(?:--[^\n]*\n|/\*.*?\*/)\s*)*COPY\b", re.IGNORECASE | re.DOTALL
)
# A plain "INSERT ... VALUES (<one row>)" that executemany can fold into one
# multi-row INSERT.
_INSERT_VALUES = re.compile(
    r"^\s*(INSERT\s+INTO\s.+?\sVALUES\s*)(\(.*\))\s*;?\s*$", re.IGNORECASE | re.DOTALL
)
_RETURNING_OR_CONFLICT = re.compile(r"\b(RETURNING|ON\s+CONFLICT)\b", re.IGNORECASE)

_COPY_REFUSED = (
    "COPY is not possible on an asynchronous connection (psycopg2's async "
    "mode, which txpostgres uses): sending it would leave the connection "
    "unusable for good. Use INSERT ... VALUES through executemany() (batched "
    "into few round trips), or a separate blocking psycopg2 connection "
    "outside the reactor's thread for bulk loads."
)


_HSTORE_OIDS = (
    "SELECT t.oid, t.typarray FROM pg_type t "
    "JOIN pg_namespace ns ON t.typnamespace = ns.oid "
    "WHERE t.typname = 'hstore'"
)

# The backend to cancel: our pid, as seen with our client port, as our role,
# in our database.
_CANCEL_BACKEND = (
    "SELECT pg_cancel_backend(pid) FROM pg_stat_activity "
    "WHERE pid = %s AND coalesce(client_port, -1) = %s "
    "AND usename = session_user AND datname = current_database()"
)

#: Helper connections opened at once to cancel queries (more wait their turn).
CANCEL_HELPERS = 8
_cancel_helpers = DeferredSemaphore(CANCEL_HELPERS)

_COPY_HINT = re.compile("copy", re.IGNORECASE).search

# A statement that reads (background_end): its command tag, and its text.
_READ_TAGS = ("SELECT", "FETCH", "MOVE", "SHOW")
_READ_STATEMENT = re.compile(
    r"\s*(?:SELECT|VALUES|TABLE|SHOW|FETCH|MOVE)\b", re.I
).match
_INTO = re.compile(r"\bINTO\b", re.I).search


_connection_serial = 0


class _CancelUnconfirmed(Exception):
    """The server did not answer a cancel within CANCEL_GRACE."""


class UnstorableValueError(DataError, ValueError):  # type: ignore[misc]
    """
    A parameter PostgreSQL cannot store: a NUL character in text, or a
    string that is not valid Unicode (an unpaired surrogate).  psycopg2
    raises a bare ``ValueError`` before anything is sent; this is that
    ``ValueError`` and also a DB-API ``DataError``, so SQLAlchemy raises its
    ``DataError`` (a client's bad input, not a server fault).
    """


def _is_unstorable(error: ValueError) -> bool:
    return isinstance(error, UnicodeEncodeError) or "NUL (0x00)" in str(error)


def _unstorable(error: ValueError) -> UnstorableValueError:
    what = (
        "text that is not valid Unicode (an unpaired surrogate)"
        if isinstance(error, UnicodeEncodeError)
        else "a NUL (0x00) character in text"
    )
    return UnstorableValueError(
        f"a query parameter cannot be sent to PostgreSQL: {what}, which "
        f"PostgreSQL cannot store; reject or clean such input first"
    )


def _refusing_unstorable(method: Callable[..., Any]) -> Callable[..., Any]:
    """Turn psycopg2's ValueError for unstorable parameters into a DataError."""

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except UnstorableValueError:
            raise
        except ValueError as e:
            if _is_unstorable(e):
                raise _unstorable(e) from None
            raise

    return wrapper


def _sql_text(sql: Any, raw: Any) -> Any:
    """
    ``sql`` as str or bytes: a ``psycopg2.sql`` Composable is rendered with
    the raw connection ``raw``.  An empty query is refused as psycopg2 does
    (the ``BEGIN`` sent before it would otherwise hide it from the server).
    """
    if isinstance(sql, psycopg2.sql.Composable):
        sql = sql.as_string(raw)
    elif not isinstance(sql, (str, bytes)):
        raise TypeError(
            f"a query must be str, bytes or psycopg2.sql.Composable, not "
            f"{type(sql).__name__}"
        )
    if not sql or sql.isspace():
        raise ProgrammingError("can't execute an empty query")
    return sql


def _refuse_copy(sql: Any) -> None:
    """Raise NotSupportedError if the statement (template) holds a COPY."""
    text = sql.decode("latin-1") if isinstance(sql, bytes) else sql
    if _COPY_HINT(text) and _COPY.search(text):
        raise NotSupportedError(_COPY_REFUSED)


def _ensure_xid(xid: Any) -> Any:
    """An Xid as psycopg2 takes one: an Xid, or a string (parsed if psycopg2
    made it, else kept whole as the server's transaction id)."""
    if isinstance(xid, psycopg2.extensions.Xid):
        return xid
    if not isinstance(xid, (str, bytes)):
        raise TypeError("not a valid transaction id: pass conn.xid(...) or a string")
    return psycopg2.extensions.Xid.from_string(xid)


class RecoveredXid(psycopg2.extensions.Xid):  # type: ignore[misc]
    """
    A transaction id read back by :meth:`Connection.tpc_recover`: psycopg2's
    ``Xid`` (the same ``format_id``, ``gtrid``, ``bqual``, indexing and
    ``str()``), with ``prepared``, ``owner`` and ``database`` from
    ``pg_prepared_xacts``.  psycopg2 fills those in C; from Python its Xid
    can only be subclassed to carry them.
    """

    def __init__(self, gid: str, prepared: Any, owner: str, database: str) -> None:
        parsed = psycopg2.extensions.Xid.from_string(gid)
        if parsed.format_id is None:
            super().__init__(0, "", "")  # placeholders: an unparsed id
        else:
            super().__init__(parsed.format_id, parsed.gtrid, parsed.bqual)
        self._parsed = parsed
        self._gid = gid
        self._prepared = prepared
        self._owner = owner
        self._database = database

    format_id = property(lambda self: self._parsed.format_id)
    gtrid = property(lambda self: self._parsed.gtrid)
    bqual = property(lambda self: self._parsed.bqual)
    prepared = property(lambda self: self._prepared, doc="When it was prepared.")
    owner = property(lambda self: self._owner, doc="The role that prepared it.")
    database = property(lambda self: self._database, doc="Its database.")

    def __getitem__(self, index: int) -> Any:
        return self._parsed[index]

    def __len__(self) -> int:
        return 3

    def __iter__(self) -> Iterator[Any]:
        return iter(tuple(self._parsed))

    def __str__(self) -> str:
        return self._gid

    def __repr__(self) -> str:
        return repr(self._parsed)


class _Wire(txpostgres.Connection):  # type: ignore[misc]
    """
    txpostgres's Connection, with a lean path for a connection that one fiber
    owns at a time: one poll per readable event, no lock and no extra reactor
    turn per result.  Closing and NOTIFY delivery are txpostgres's own.

    The socket is watched by the reactor only while it matters: while a
    query runs, while a transaction is open, and while NOTIFY observers are
    registered.  An idle connection in a pool is not a reactor selectable
    (trial's clean-reactor check, a pool shared by many tests); whatever the
    server sent it meanwhile (its end, most often) is read by
    :meth:`check_idle`, without a round trip.
    """

    _pollingD: Optional[Deferred[Any]]

    def __init__(self, reactor: Any) -> None:
        super().__init__(reactor=reactor)
        self.busy = False  # a query is in progress
        self.fiber: Any = None  # the fiber parked on it
        self.outcome: Any = None  # its outcome, when nobody was parked
        self.lost: Optional[str] = None
        # Called with the reason when the reactor sees the server end the
        # connection while it is idle and watched (NOTIFY observers): a
        # LISTEN connection learns at once that it must reconnect.
        self.lost_observers: list[Callable[[str], Any]] = []
        self.watching = False  # the socket is registered with the reactor
        self.linger = False  # autocommit: stay watched between statements
        self.background = False  # the query running is a background end
        self._fd = -1
        self.local_port: Optional[int] = None  # our end's TCP port

    # -- connecting: our own poll cycle (txpostgres's raises into the reactor
    # when libpq drops its socket half-way, e.g. while a server starts or
    # stops: "file descriptor cannot be a negative integer") -------------------

    def connect(self, params: str) -> Deferred[Any]:
        """Start connecting; the Deferred fires with self, or fails."""
        try:
            self._connection = psycopg2.connect(params, async_=True)
        except BaseException:
            return fail()
        d: Deferred[Any] = Deferred()
        self._pollingD = d
        self._connect_step()
        return d

    def _connect_step(self) -> None:
        d = self._pollingD
        if d is None:
            return
        try:
            state = self._connection.poll()
            if state == POLL_OK:
                self._pollingD = None
                d.callback(self)
                return
            if state not in (POLL_READ, POLL_WRITE):
                raise OperationalError(f"unexpected poll() result {state!r}")
            if self._connection.closed or self._connection.fileno() < 0:
                raise OperationalError("the server closed the connection")
            if state == POLL_READ:
                self.reactor.addReader(self)
            else:
                self.reactor.addWriter(self)
        except BaseException:
            self._pollingD = None
            self._unwatch_connecting()
            d.errback(Failure())

    def _unwatch_connecting(self) -> None:
        self.reactor.removeReader(self)
        self.reactor.removeWriter(self)

    # -- connected -----------------------------------------------------------

    def adopt_socket(self) -> None:
        """
        Once connected, watch a duplicate of libpq's socket.  psycopg2 closes
        its descriptor by itself when the server goes away; the reactor would
        then hold a stale descriptor it can no longer unregister (and the
        number may be reused by the next connection).  Our duplicate stays
        valid until :meth:`_forget` unregisters and closes it.
        """
        self._unwatch_connecting()
        self._fd = os.dup(self._connection.fileno())
        try:
            with socket.socket(fileno=os.dup(self._fd)) as sock:
                local = sock.getsockname()
        except OSError:
            local = None
        self.local_port = local[1] if isinstance(local, tuple) else None

    def __repr__(self) -> str:
        # What trial's "Reactor was unclean" lists: say what holds it.
        if self._connection is None or self._connection.closed:
            return "<txfiberdb connection (closed)>"
        info = self._connection.info
        why = []
        if self.busy:
            why.append("a query running")
        if self._connection.get_transaction_status() != TRANSACTION_STATUS_IDLE:
            why.append("a transaction open")
        if self._notifyObservers:
            why.append("NOTIFY observers")
        if self.linger:
            why.append("autocommit statements since the last commit()/rollback()")
        held = f" with {', '.join(why)}" if why else ""
        return (
            f"<txfiberdb connection to {info.host}:{info.port}{held}: "
            f"commit(), rollback() or close() it (or return it to its pool) "
            f"before the test ends>"
        )

    def fileno(self) -> int:
        if self._fd >= 0:
            return self._fd
        return super().fileno()  # type: ignore[no-any-return]

    def watch(self) -> None:
        if not self.watching and self._fd >= 0:
            self.watching = True
            self.reactor.addReader(self)

    def unwatch_if_idle(self, force: bool = False) -> None:
        """
        Stop watching the socket if nothing needs it watched.  In autocommit
        mode (``linger``) the socket stays watched between statements, to
        save the reactor two calls per statement, until ``force`` (the end of
        a unit of work: ``commit()``/``rollback()``, which a pool's reset on
        return calls, or leaving autocommit).
        """
        if (
            self.watching
            and (force or not self.linger)
            and not self.busy
            and not self._notifyObservers
            and self._connection.get_transaction_status() == TRANSACTION_STATUS_IDLE
        ):
            self.watching = False
            self.reactor.removeReader(self)

    def check_idle(self) -> bool:
        """
        Whether the connection is usable, learnt without a round trip: when
        the socket is not watched, read what the server sent meanwhile (a
        notice, a NOTIFY, or the end of the connection).
        """
        if self._connection.closed or self._fd < 0:
            return False
        if self.watching or self.busy:
            return True  # the reactor reads it as it comes
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        # The server's goodbye is an error message (read as a notice), then
        # the end of the stream: a few reads, while there is something.
        for _ in range(4):
            if self._fd < 0 or not poller.poll(0):
                break
            self._read_idle()
        return not self._connection.closed and self._fd >= 0

    def close(self) -> None:
        if self._fd < 0:
            self._unwatch_connecting()
            super().close()  # still connecting: txpostgres's own
            return
        self._forget()
        if self.busy:
            self._finish(Failure(InterfaceError("the connection was closed")))

    def begin(self) -> bool:
        """Drive the query just sent; whether it is still in progress."""
        self.busy = True
        self.outcome = None
        self.watch()
        self._advance()
        return self.busy

    def finish_background(self, timeout: float = 5.0) -> bool:
        """
        Wait, blocking, for a background end to complete; whether the
        connection is then idle and unwatched.  For test harnesses only
        (trial's clean-reactor check at the end of a test): it blocks the
        reactor's thread.
        """
        deadline = time.monotonic() + timeout
        while self.busy and self._fd >= 0:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            select.select([self._fd], [], [], left)
            self._advance()
        return not self.watching

    def cancel(self) -> None:
        """The parked fiber is cancelled: wake it (the query goes on)."""
        fib, self.fiber = self.fiber, None
        if fib is not None:
            unpark(fib, Failure(CancelledError()))

    def give_up(self) -> None:
        """The server did not confirm a cancel in time: wake the fiber."""
        fib, self.fiber = self.fiber, None
        if fib is not None:
            unpark(fib, Failure(_CancelUnconfirmed()))

    def _advance(self) -> None:
        try:
            state = self._connection.poll()
        except BaseException:
            self._finish(Failure())
            return
        if state == POLL_OK:
            self._finish(None)
        elif state == POLL_WRITE:
            self.reactor.addWriter(self)
        elif state != POLL_READ:
            self._finish(
                Failure(OperationalError(f"unexpected poll() result {state!r}"))
            )

    def _finish(self, result: Any) -> None:
        self.busy = self.background = False
        if self._connection.closed and self._fd >= 0:
            self._forget()
        elif self._fd >= 0:
            self.unwatch_if_idle()
        fib, self.fiber = self.fiber, None
        if fib is not None:
            unpark(fib, result)
        else:
            self.outcome = result

    def _read_idle(self) -> None:
        # Idle: a NOTIFY, a notice, or the server ending the connection.
        try:
            self._connection.poll()
        except psycopg2.Error as e:
            self.lost = str(e).strip() or e.__class__.__name__
            _log.info(
                "connection to PostgreSQL lost while idle: {reason}",
                reason=self.lost.splitlines()[0],
            )
            self._forget()
            self._report_lost()
            return
        if self._connection.closed:
            self.lost = "the server closed the connection"
            self._forget()
            self._report_lost()

    def _report_lost(self) -> None:
        observers, self.lost_observers = self.lost_observers, []
        for observer in observers:
            try:
                observer(self.lost or "connection lost")
            except Exception:
                _log.failure("lost-connection observer {o!r} failed", o=observer)

    def doRead(self) -> None:
        if self._pollingD is not None:  # connecting
            self.reactor.removeReader(self)
            self._connect_step()
            return
        if self.busy:
            self._advance()
        elif not self._connection.closed:
            self._read_idle()
        if self._connection.notifies:
            self.checkForNotifies()

    def doWrite(self) -> None:
        self.reactor.removeWriter(self)
        if self._pollingD is not None:  # connecting
            self._connect_step()
            return
        if self.busy:
            self._advance()

    def connectionLost(self, reason: Any) -> None:
        if self._fd < 0:
            super().connectionLost(reason)
            return
        self._forget()
        if self.busy:
            self._finish(
                Failure(OperationalError("the connection to the server was lost"))
            )

    def _forget(self) -> None:
        """Stop watching the socket and close it (idempotent)."""
        if self._fd >= 0:
            self.reactor.removeReader(self)
            self.reactor.removeWriter(self)
            self.watching = False
            os.close(self._fd)
            self._fd = -1
        if not self._connection.closed:
            self._connection.close()


def connect(
    dsn: Optional[str] = None,
    connect_timeout: Optional[float] = None,
    reactor: Any = None,
    **kwargs: Any,
) -> Connection:
    """
    Open a connection, parking the calling fiber until it is ready.

    :param dsn: a libpq connection string or URL; keyword arguments (``host``,
        ``port``, ``user``, ``password``, ``dbname``, any libpq parameter) add
        to or override it.
    :param cursor_factory: the connection's default ``cursor_factory`` (a
        psycopg2 cursor class: ``DictCursor``, ...), as psycopg2's
        ``connect()`` takes it.  (``connection_factory`` is refused with
        ``NotSupportedError``.)
    :param background_end: end transactions without waiting where the
        outcome cannot matter to the caller: ``rollback()``, and ``commit()``
        of a transaction that ran only reads (see :meth:`Connection.commit`);
        the next use of the connection waits for it if needed
        (doc/howto/performance.md).  Off by default; the dialect turns it on.
    :param prepare_threshold: prepare a statement on the server (SQL
        ``PREPARE``/``EXECUTE``) once ``execute()`` has run it this many times
        on the connection; 0 prepares at once; None (the default here; the
        dialect's default is 5) never.  Turn it off behind PgBouncer in
        transaction mode.
    :param prepared_max: how many prepared statements a connection keeps
        (least recently used ones are deallocated), 100 by default.
    :param connect_timeout: seconds for the whole connection attempt; also
        read from the DSN; :data:`DEFAULT_CONNECT_TIMEOUT` (10 s) when given
        nowhere, 0 for no limit.  psycopg2 ignores it for asynchronous
        connections, so a reactor timer enforces it here
        (``OperationalError`` when it expires).
    :raise OperationalError: the server cannot be reached, refused the
        connection or did not answer in time; the message names the host and
        port, as libpq's do.
    :raise NotInFiberError: outside a fiber.
    """
    if not in_fiber():
        raise NotInFiberError(
            "txfiberdb.dbapi.connect() called outside a fiber: it waits for the "
            "server. Call it from code started with txfiberdb.run_in_fiber() "
            "or @txfiberdb.fibered (or from blocking code, through "
            "txfiberdb.run_blocking())."
        )
    if reactor is None:
        from twisted.internet import reactor
    cursor_factory = kwargs.pop("cursor_factory", None)
    background_end = _parse_flag(kwargs.pop("background_end", False), "background_end")
    prepare_threshold = _parse_threshold(kwargs.pop("prepare_threshold", None))
    prepared_max = int(kwargs.pop("prepared_max", DEFAULT_PREPARED_MAX))
    if kwargs.pop("connection_factory", None) is not None:
        raise NotSupportedError(
            "connection_factory is not supported: a txfiberdb connection wraps "
            "an asynchronous psycopg2 connection that txpostgres makes; set "
            "cursor_factory (here or on the connection) for other rows"
        )
    params = psycopg2.extensions.make_dsn(dsn, **kwargs)
    if connect_timeout is None:
        from_dsn = psycopg2.extensions.parse_dsn(params).get("connect_timeout")
        connect_timeout = (
            float(from_dsn) if from_dsn is not None else DEFAULT_CONNECT_TIMEOUT
        )
    elif isinstance(connect_timeout, str):  # from a URL's query string
        connect_timeout = float(connect_timeout)
    wire = _Wire(reactor)
    outcome: list[str] = []

    def give_up(reason: str) -> None:
        outcome.append(reason)
        if wire._connection is not None:
            wire.close()

    result: Deferred[Any] = Deferred(lambda _: give_up("cancelled"))

    def settle(r: Any) -> None:
        if outcome == ["cancelled"]:
            return  # Deferred.cancel() delivers the CancelledError
        if outcome == ["timeout"]:
            r = Failure(
                OperationalError(
                    f"{_server_name(params, wire._connection)} failed: timed out "
                    f"after {connect_timeout:g} s (connect_timeout)"
                )
            )
        elif isinstance(r, Failure) and r.check(psycopg2.OperationalError):
            r = Failure(_with_server_name(r.value, params, wire._connection))  # type: ignore[arg-type]
        if isinstance(r, Failure):
            result.errback(r)
        else:
            result.callback(r)

    timer = None
    if connect_timeout:
        timer = reactor.callLater(connect_timeout, give_up, "timeout")
    wire.connect(params).addBoth(settle)
    try:
        await_deferred(result)
    except BaseException:
        if wire._connection is not None and not wire._connection.closed:
            wire.close()
        raise
    finally:
        if timer is not None and timer.active():
            timer.cancel()
    try:
        wire.adopt_socket()
        psycopg2.extras.register_uuid(conn_or_curs=wire._connection)
    except BaseException:
        wire.close()
        raise
    conn = Connection(wire, params)
    if cursor_factory is not None:
        conn.cursor_factory = cursor_factory
    conn.background_end = background_end
    conn.set_prepare_threshold(prepare_threshold, prepared_max)
    return conn


def _parse_flag(value: Any, name: str) -> bool:
    """A boolean option, also as a URL query string gives it ("true", "0")."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off", ""):
            return False
        raise ValueError(f"{name} must be true or false, not {value!r}")
    return bool(value)


def _parse_threshold(value: Any) -> Optional[int]:
    """prepare_threshold: None (or "none", "off", "") for never, else an int >= 0."""
    if value is None:
        return None
    if isinstance(value, str):
        if value.strip().lower() in ("none", "null", "off", ""):
            return None
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(
            f"prepare_threshold must be None (never prepare) or an int >= 0, "
            f"not {value!r}"
        )
    return value


def _server_name(params: str, raw: Any) -> str:
    """``connection to server at "host", port N``, as libpq words it."""
    host = port = None
    if raw is not None:
        try:
            host, port = raw.info.host, raw.info.port
        except (psycopg2.Error, AttributeError):
            pass
    if not host:
        parsed = psycopg2.extensions.parse_dsn(params)
        host = (
            parsed.get("hostaddr")
            or parsed.get("host")
            or os.environ.get("PGHOST", "/var/run/postgresql")
        )
        port = parsed.get("port") or os.environ.get("PGPORT", "5432")
    if str(host).startswith("/"):
        return f'connection to server on socket "{host}/.s.PGSQL.{port}"'
    return f'connection to server at "{host}", port {port}'


def _with_server_name(error: Exception, params: str, raw: Any) -> Exception:
    """
    ``error`` with the server named, when libpq did not (its messages for
    asynchronous connections often say only "Connection refused").
    """
    message = str(error).strip()
    if message.startswith("connection to server"):
        return error
    named = type(error)(f"{_server_name(params, raw)} failed: {message}")
    named.__cause__ = error
    return named


def _close_forgotten(wire: _Wire) -> None:
    # A Connection was garbage-collected while open.  This may run anywhere
    # (the collector runs at arbitrary points): close on the reactor's next
    # turn, not in the middle of whatever is running now.
    raw = wire._connection
    if raw is None or raw.closed:
        return
    _log.warn(
        "a txfiberdb.dbapi connection was garbage-collected while open; "
        "closing it. Close connections (or return them to their pool) "
        "when done."
    )
    wire.reactor.callLater(0, wire.close)


class Connection:
    """
    A DB-API connection.  One fiber uses it at a time (a second fiber using
    it meanwhile gets ``ProgrammingError``); hand connections out through a
    pool.
    """

    Warning = Warning
    Error = Error
    InterfaceError = InterfaceError
    DatabaseError = DatabaseError
    DataError = DataError
    OperationalError = OperationalError
    IntegrityError = IntegrityError
    InternalError = InternalError
    ProgrammingError = ProgrammingError
    NotSupportedError = NotSupportedError

    def __init__(self, wire: _Wire, params: str = "") -> None:
        self._wire = wire
        self._params = params  # to open a connection that cancels this one's query
        self._raw = wire._connection
        self._autocommit = False
        self._isolation_level: Optional[int] = None
        self._readonly: Optional[bool] = None
        self._deferrable: Optional[bool] = None
        self._begin = "BEGIN"
        self._user: Any = None
        self._ctl: Any = None
        #: Default ``cursor_factory`` of :meth:`cursor` (as psycopg2's).
        self.cursor_factory: Optional[Callable[..., Any]] = None
        self._entered = False  # inside ``with conn:``
        self._tpc_xid: Any = None  # the Xid of tpc_begin()
        self._tpc_prepared = False  # after tpc_prepare()
        self._closed_by_user = False
        self._gucs: set[str] = set()  # default_transaction_* we set (autocommit)
        # The end of a transaction sent without waiting (background_end):
        # "COMMIT" or "ROLLBACK" while in flight or not yet collected.
        self._background: Optional[str] = None
        self.background_end = False
        self._prepared_max = DEFAULT_PREPARED_MAX
        # Whether every statement of the transaction in progress was a read,
        # as its command tag says (see _note_tag).
        self._reads_only = False
        self._prepared: Optional[_PreparedCache] = None
        global _connection_serial
        _connection_serial += 1
        self._serial = _connection_serial
        #: Counted by the driver: ``round_trips``, statements a caller waited
        #: for (whether or not the answer was there at once); ``sent``, all
        #: statements sent (background ends included); ``waits``, times a
        #: fiber parked for this connection.
        self.round_trips = 0
        self.sent = 0
        self.waits = 0
        # Dropped without close(): the reactor's reader and the server's
        # backend would otherwise outlive it for as long as the process.
        self._finalizer = weakref.finalize(self, _close_forgotten, wire)
        self._finalizer.atexit = False

    # -- state -------------------------------------------------------------

    @property
    def raw_connection(self) -> Any:
        """
        The underlying asynchronous psycopg2 connection, for psycopg2's
        functions that want a psycopg2 connection (``register_type``,
        ``extras.register_uuid``, ``quote_ident``, ``sql.Composable.as_string``;
        doc/howto/driver.md lists them).  Run no queries on it: they would
        not wait for the server.
        """
        return self._raw

    @property
    def closed(self) -> int:
        """0 while open, 1 after :meth:`close`, 2 when the server ended it
        (and :meth:`close` was not called since), as psycopg2's."""
        if self._closed_by_user:
            return 1
        return int(self._raw.closed)

    @property
    def info(self) -> Any:
        return self._raw.info

    @property
    def notices(self) -> list[str]:
        return self._raw.notices  # type: ignore[no-any-return]

    @property
    def dsn(self) -> str:
        return self._raw.dsn  # type: ignore[no-any-return]

    @property
    def server_version(self) -> int:
        return self._raw.server_version  # type: ignore[no-any-return]

    @property
    def encoding(self) -> str:
        return self._raw.encoding  # type: ignore[no-any-return]

    @property
    def encoding_python(self) -> str:
        """The Python codec of the connection's client encoding."""
        return psycopg2.extensions.encodings.get(self._raw.encoding, "utf-8")  # type: ignore[no-any-return]

    @property
    def status(self) -> int:
        """
        psycopg2's ``STATUS_READY``, ``STATUS_BEGIN`` (inside a transaction
        the driver began: outside autocommit, or in a ``with conn:`` block)
        or ``STATUS_PREPARED`` (after :meth:`tpc_prepare`).
        """
        if self._tpc_prepared:
            return STATUS_PREPARED  # type: ignore[no-any-return]
        if (not self._autocommit or self._entered) and self.in_transaction:
            return STATUS_BEGIN  # type: ignore[no-any-return]
        return STATUS_READY  # type: ignore[no-any-return]

    def get_backend_pid(self) -> int:
        return self._raw.get_backend_pid()  # type: ignore[no-any-return]

    def get_parameter_status(self, name: str) -> Optional[str]:
        return self._raw.get_parameter_status(name)  # type: ignore[no-any-return]

    def get_transaction_status(self) -> int:
        return self._raw.get_transaction_status()  # type: ignore[no-any-return]

    def get_dsn_parameters(self) -> dict[str, str]:
        return self._raw.get_dsn_parameters()  # type: ignore[no-any-return]

    @property
    def in_transaction(self) -> bool:
        """Whether a transaction is open on the server (ours or the user's).
        False while its end runs in the background (``background_end``)."""
        if self._background is not None:
            return False
        status = self._raw.get_transaction_status()
        return status not in (TRANSACTION_STATUS_IDLE, TRANSACTION_STATUS_UNKNOWN)

    # -- session settings ----------------------------------------------------

    def _check_settable(self, what: str) -> None:
        """psycopg2's checks before a session setting changes."""
        self._check_open()
        if self.status != STATUS_READY:
            raise ProgrammingError(f"{what} cannot be used inside a transaction")

    @property
    def autocommit(self) -> bool:
        return self._autocommit

    @autocommit.setter
    def autocommit(self, value: Any) -> None:
        self._check_settable("set_session")
        self._set_session(autocommit=bool(value))

    @property
    def isolation_level(self) -> Optional[int]:
        """None (the server's default) or a ``ISOLATION_LEVEL_*`` constant."""
        return self._isolation_level

    @isolation_level.setter
    def isolation_level(self, value: Any) -> None:
        self._check_settable("set_session")
        self._set_session(isolation_level=_parse_isolation_level(value))

    @property
    def readonly(self) -> Optional[bool]:
        return self._readonly

    @readonly.setter
    def readonly(self, value: Any) -> None:
        self._check_settable("set_session")
        self._set_session(readonly=_parse_on_off(value))

    @property
    def deferrable(self) -> Optional[bool]:
        return self._deferrable

    @deferrable.setter
    def deferrable(self, value: Any) -> None:
        self._check_settable("set_session")
        self._set_session(deferrable=_parse_on_off(value))

    def set_session(
        self,
        isolation_level: Any = None,
        readonly: Any = None,
        deferrable: Any = None,
        autocommit: Any = None,
    ) -> None:
        """
        As psycopg2's: ``None`` leaves a setting unchanged; ``"default"``
        means the server's default.  Levels are ``ISOLATION_LEVEL_*``
        constants (1-4) or their names (``"REPEATABLE READ"``).  Outside
        autocommit the settings go into the ``BEGIN`` of each transaction;
        in autocommit mode they are sent at once as the session's
        ``default_transaction_*`` parameters, so each statement's implicit
        transaction has them (as psycopg2 does).
        """
        self._check_settable("set_session")
        changes: dict[str, Any] = {}
        if isolation_level is not None:
            changes["isolation_level"] = _parse_isolation_level(isolation_level)
        if readonly is not None:
            changes["readonly"] = _parse_on_off(readonly)
        if deferrable is not None:
            changes["deferrable"] = _parse_on_off(deferrable)
        if autocommit is not None:
            changes["autocommit"] = bool(autocommit)
        self._set_session(**changes)

    def _set_session(self, **changes: Any) -> None:
        """
        Apply checked settings, as psycopg2's ``conn_set_session``: in
        autocommit mode (or entering it) the given characteristics become the
        session's defaults on the server; leaving autocommit resets the
        non-default ones, so that ``BEGIN`` alone decides.
        """
        autocommit = changes.get("autocommit", self._autocommit)
        gucs: list[tuple[str, str]] = []
        if autocommit:
            if "isolation_level" in changes:
                level = changes["isolation_level"]
                gucs.append(
                    (
                        "default_transaction_isolation",
                        "default" if level is None else _ISOLATION_NAMES[level],
                    )
                )
            for key, guc in (
                ("readonly", "default_transaction_read_only"),
                ("deferrable", "default_transaction_deferrable"),
            ):
                if key in changes:
                    gucs.append((guc, _GUC_STATE[changes[key]]))
        elif self._autocommit:
            # psycopg2 resets every non-default one; those never sent are at
            # their default already (so toggling autocommit, as pool pings
            # do, costs no round trip).
            gucs.extend((name, "default") for name in sorted(self._gucs))
        if gucs:
            sql = ";".join(
                f"SET {name} TO DEFAULT"
                if value == "default"
                else f"SET {name} TO '{value}'"
                for name, value in gucs
            )
            raw = self._control_cursor()
            self._run(lambda: raw.execute(sql))
            for name, value in gucs:
                if value == "default":
                    self._gucs.discard(name)
                else:
                    self._gucs.add(name)
        if "autocommit" in changes:
            self._autocommit = changes["autocommit"]
            self._wire.linger = self._autocommit
            if not self._autocommit:
                self._wire.unwatch_if_idle(force=True)
        if "isolation_level" in changes:
            self._isolation_level = changes["isolation_level"]
        if "readonly" in changes:
            self._readonly = changes["readonly"]
        if "deferrable" in changes:
            self._deferrable = changes["deferrable"]
        parts = ["BEGIN"]
        if self._isolation_level is not None:
            parts.append("ISOLATION LEVEL " + _ISOLATION_NAMES[self._isolation_level])
        if self._readonly is not None:
            parts.append("READ ONLY" if self._readonly else "READ WRITE")
        if self._deferrable is not None:
            parts.append("DEFERRABLE" if self._deferrable else "NOT DEFERRABLE")
        self._begin = " ".join(parts)

    def set_isolation_level(self, level: Any) -> None:
        """
        psycopg2's older API: rolls back the transaction in progress, then
        0 (``ISOLATION_LEVEL_AUTOCOMMIT``) turns autocommit on, 1-4 turn it
        off with that level, None turns it off with the server's default.
        """
        self._check_open()
        if self._tpc_prepared:
            raise ProgrammingError(
                "isolation_level cannot be used with a prepared two-phase transaction"
            )
        if level is None:
            parsed: Optional[int] = None
        elif isinstance(level, int):
            if not 0 <= level <= 4:
                raise ValueError("isolation level must be between 0 and 4")
            parsed = level
        else:
            parsed = _parse_isolation_level(level)
        if self.in_transaction:
            self._rollback()
        if parsed == psycopg2.extensions.ISOLATION_LEVEL_AUTOCOMMIT:
            self._set_session(autocommit=True)
        else:
            self._set_session(autocommit=False, isolation_level=parsed)

    # -- the wire -----------------------------------------------------------

    def _check_open(self) -> None:
        if self._raw.closed:
            why = (
                f": the server ended it while it was idle ({self._wire.lost})"
                if self._wire.lost
                else ""
            )
            raise InterfaceError("connection already closed" + why)

    def _run(self, start: Callable[[], Any]) -> None:
        """Send a query with ``start()`` and park until it completes."""
        fib = current_fiber()
        if fib is None:
            raise NotInFiberError(
                "a txfiberdb connection was used outside a fiber: queries wait "
                "for the server. Run the code with txfiberdb.run_in_fiber() or "
                "@txfiberdb.fibered."
            )
        if self._user is not None:
            raise ProgrammingError(
                f"this connection is in use by another fiber ({self._user!r}): "
                f"a connection serves one fiber at a time; give each fiber its "
                f"own (a pool does)"
            )
        self._check_open()
        self._user = fib
        wire = self._wire
        try:
            if self._background is not None:
                self._settle_background(fib)
            start()
            self.sent += 1
            self.round_trips += 1
            if wire.begin():
                wire.fiber = fib
                self.waits += 1
                try:
                    park(wire)
                except BaseException:
                    if wire.busy:
                        self._interrupted(fib)
                    raise
            else:  # answered at once
                outcome, wire.outcome = wire.outcome, None
                if isinstance(outcome, Failure):
                    outcome.raiseException()
        finally:
            self._user = None

    def _interrupted(self, fib: Any) -> None:
        """The fiber stopped waiting (cancelled) mid-query: cancel it."""
        wire = self._wire
        with shield():
            self._send_cancel()
            if wire.busy:
                timer = wire.reactor.callLater(CANCEL_GRACE, wire.give_up)
                wire.fiber = fib
                try:
                    park(wire)
                except psycopg2.Error:
                    pass  # QueryCanceledError, expected
                except _CancelUnconfirmed:
                    _log.warn(
                        "PostgreSQL did not confirm a cancel within {grace} s: "
                        "closing the connection",
                        grace=CANCEL_GRACE,
                    )
                    wire.close()
                finally:
                    if timer.active():
                        timer.cancel()
            wire.outcome = None

    def _send_cancel(self) -> None:
        """
        Ask the server to cancel this connection's query, from a fiber,
        without blocking the reactor: ``pg_cancel_backend()`` from a
        short-lived connection of our own.  (libpq's ``PQcancel``, which
        psycopg2 and txpostgres call, connects to the server and waits for it
        on the reactor's thread, holding the GIL.)

        The backend is identified by its pid *and* by the client port the
        server sees (our socket's local port; -1 over a unix socket), so a
        helper that reaches another server (a host list, a load balancer) or
        a pooler in between (PgBouncer, whose pids are its own) cancels
        nothing; then, and when the helper cannot connect for any reason but
        a timeout (no free connection slot, a pooler refusing it),
        ``PQcancel`` does it.  When the server does not answer in time
        (connecting, or the helper's query), nothing more is sent: the
        caller's grace timer gives the connection up.
        """
        try:
            await_deferred(_cancel_helpers.acquire(), timeout=CANCEL_GRACE)
        except WaitTimeout:
            _log.warn(
                "no cancel sent: {n} cancels already in progress", n=CANCEL_HELPERS
            )
            return
        try:
            fallback = self._cancel_from_helper()
        finally:
            _cancel_helpers.release()
        if fallback is not None and not self.closed:
            _log.info(
                "cancelling with PQcancel, which blocks the reactor for a round "
                "trip to the server ({reason})",
                reason=fallback,
            )
            try:
                self._raw.cancel()
            except psycopg2.Error:
                pass

    def _cancel_from_helper(self) -> Optional[str]:
        """
        Cancel this connection's backend from a new connection.  Returns why
        ``PQcancel`` should do it instead, or None when nothing more is to be
        sent (cancelled, or the server does not answer).
        """
        wire = self._wire
        reactor = wire.reactor
        pid = self._raw.get_backend_pid()
        port = -1 if wire.local_port is None else wire.local_port
        helper_dsn = psycopg2.extensions.make_dsn(
            self._params, application_name="txfiberdb cancel"
        )
        try:
            helper = connect(helper_dsn, connect_timeout=CANCEL_GRACE, reactor=reactor)
        except psycopg2.Error as e:
            reason = str(e).strip()
            if "(connect_timeout)" in reason:
                _log.warn(
                    "no cancel sent: the server did not answer ({reason})",
                    reason=reason,
                )
                return None
            return reason
        timer = reactor.callLater(CANCEL_GRACE, helper.close)
        try:
            helper.autocommit = True
            cur = helper.cursor()
            cur.execute(_CANCEL_BACKEND, (pid, port))
            if any(row[0] for row in cur.fetchall()):
                return None
            return "backend not found from a new connection"
        except psycopg2.Error as e:
            if not timer.active():  # it closed the helper
                _log.warn(
                    "no cancel sent: the server did not answer within {grace} s",
                    grace=CANCEL_GRACE,
                )
                return None
            return str(e).strip()
        finally:
            if timer.active():
                timer.cancel()
            helper.close()

    def _begin_prefix(self) -> str:
        """
        What to send before a statement: ``BEGIN ...;`` when it opens a
        transaction.  A prepared two-phase transaction allows no statement.
        """
        if self._tpc_prepared:
            raise ProgrammingError(
                "execute cannot be used with a prepared two-phase transaction"
            )
        if (self._autocommit and not self._entered) or self.in_transaction:
            return ""
        self._reads_only = True
        return self._begin + ";"

    # -- PEP 249 ------------------------------------------------------------

    def cursor(
        self,
        name: Optional[str] = None,
        cursor_factory: Optional[Callable[..., Any]] = None,
        withhold: bool = False,
        scrollable: Optional[bool] = None,
    ) -> Cursor:
        """
        A cursor; with ``name``, a server-side cursor (:class:`ServerCursor`).

        ``cursor_factory`` (or the connection's :attr:`cursor_factory`) is a
        subclass of ``psycopg2.extensions.cursor``: psycopg2.extras'
        ``DictCursor``, ``RealDictCursor``, ``NamedTupleCursor`` or your own.
        The cursor returned is an instance of it (and of :class:`Cursor`):
        its rows are the factory's, its queries park the fiber.
        """
        self._check_open()
        if name is None and withhold is not False:
            raise ProgrammingError("trying to set .withhold on unnamed cursor")
        if name is None and scrollable is not None:
            raise ProgrammingError("trying to set .scrollable on unnamed cursor")
        factory = cursor_factory or self.cursor_factory
        cls = _cursor_class(ServerCursor if name is not None else Cursor, factory)
        if name is None:
            return cls(self)  # type: ignore[no-any-return]
        cur = cls(self, name)
        cur.withhold = withhold
        cur.scrollable = scrollable
        return cur  # type: ignore[no-any-return]

    def commit(self) -> None:
        """Commit the open transaction (no-op when none is open)."""
        self._check_open()
        if self._tpc_xid is not None:
            raise ProgrammingError(
                "commit cannot be used during a two-phase transaction"
            )
        if self._background is not None:
            return  # the transaction is ending already
        if self.in_transaction:
            if self._commit_in_background():
                return
            raw = self._control_cursor()
            self._reads_only = False
            self._run(lambda: raw.execute("COMMIT"))
        self._wire.unwatch_if_idle(force=True)

    def rollback(self) -> None:
        """Roll back the open transaction (no-op when none is open)."""
        self._check_open()
        if self._tpc_xid is not None:
            raise ProgrammingError(
                "rollback cannot be used during a two-phase transaction"
            )
        self._rollback()

    def _rollback(self) -> None:
        if self._background is not None:
            return  # the transaction is ending already
        if self.in_transaction:
            if self.background_end and self._tpc_xid is None:
                self.end_in_background("ROLLBACK")
                return
            raw = self._control_cursor()
            self._reads_only = False
            self._run(lambda: raw.execute("ROLLBACK"))
        self._wire.unwatch_if_idle(force=True)

    def _control_cursor(self) -> Any:
        """A raw cursor kept for COMMIT and ROLLBACK."""
        if self._ctl is None:
            self._ctl = self._raw.cursor()
        return self._ctl

    # -- the end of a transaction, in the background ---------------------------

    def end_in_background(self, command: str = "ROLLBACK") -> None:
        """
        Send ``command`` (``"ROLLBACK"`` or ``"COMMIT"``) to end the open
        transaction, and return at once: nobody waits for the answer.  The
        next use of the connection (a query, :meth:`check_alive` at a pool's
        checkout, :meth:`commit`) waits for it only if it has not arrived
        yet; if the server refused it or the connection was lost, the
        connection is closed then (the pool replaces it), with a log line.
        Callable from the reactor's greenlet: nothing waits.  No-op when no
        transaction is open.
        """
        if command not in ("COMMIT", "ROLLBACK"):
            raise ValueError(
                f"end_in_background takes COMMIT or ROLLBACK, not {command!r}"
            )
        self._check_open()
        if self._user is not None:
            raise ProgrammingError(
                f"this connection is in use by another fiber ({self._user!r})"
            )
        self._reads_only = False
        if self._background is not None or not self.in_transaction:
            return
        wire = self._wire
        raw = self._control_cursor()
        try:
            raw.execute(command)
        except psycopg2.Error:
            wire.close()  # lost: the server ends the transaction itself
            return
        self.sent += 1
        self._background = command
        wire.begin()  # the outcome waits in wire.outcome when nobody parks
        wire.background = wire.busy

    @property
    def ending(self) -> Optional[str]:
        """``"COMMIT"``/``"ROLLBACK"`` while the end of the last transaction
        runs in the background and its outcome is not collected yet."""
        return self._background

    def _commit_in_background(self) -> bool:
        """
        With ``background_end``: COMMIT a transaction whose statements were
        all reads (their command tags) without waiting.  Not at SERIALIZABLE,
        where a read-only transaction's COMMIT may report a serialization
        failure that its reads must not outlive.
        """
        if (
            self.background_end
            and self._reads_only
            and self._isolation_level
            != psycopg2.extensions.ISOLATION_LEVEL_SERIALIZABLE
            and self._tpc_xid is None
        ):
            self.end_in_background("COMMIT")
            return True
        return False

    def _settle_background(self, fib: Any) -> None:
        """
        Collect the outcome of the background end, parking ``fib`` while it
        is still running.  A failed end closes the connection and raises
        ``OperationalError``; a cancel while parked leaves it pending.
        """
        command = self._background
        wire = self._wire
        failure: Any = None
        if wire.busy:
            if fib is None:
                raise NotInFiberError(
                    "a txfiberdb connection was used outside a fiber while its "
                    "last transaction was still ending: run this code in a fiber"
                )
            wire.fiber = fib
            self.waits += 1
            try:
                park(wire)
            except CancelledError:
                if wire.busy:
                    wire.fiber = None
                    raise  # still running: the next use waits for it
                failure = Failure()
            except Exception:
                failure = Failure()
        else:
            failure, wire.outcome = wire.outcome, None
        self._background = None
        if not isinstance(failure, Failure):
            return
        text = str(failure.value).strip()
        reason = text.splitlines()[0] if text else type(failure.value).__name__
        if command == "COMMIT":
            _log.error(
                "a COMMIT sent in the background failed ({reason}): the "
                "transaction had run only reads (by their command tags), but "
                "whatever a function it called wrote is lost; the connection "
                "is closed. Commit such transactions explicitly or turn "
                "background_end off (doc/howto/performance.md)",
                reason=reason,
            )
        else:
            _log.info(
                "a ROLLBACK sent in the background failed ({reason}): the "
                "connection is closed",
                reason=reason,
            )
        wire.close()
        raise OperationalError(
            f"the {command} that ended the previous transaction in the "
            f"background failed ({reason}): the connection was closed"
        )

    # -- auto-prepare ----------------------------------------------------------

    @property
    def prepare_threshold(self) -> Optional[int]:
        """
        Run a statement this many times on this connection, then prepare it
        on the server (SQL ``PREPARE``; later runs send ``EXECUTE``); 0
        prepares at once, None never (as psycopg 3's attribute of that name;
        doc/howto/performance.md).  Setting it forgets what was prepared.
        """
        return None if self._prepared is None else self._prepared.threshold

    @prepare_threshold.setter
    def prepare_threshold(self, value: Any) -> None:
        self.set_prepare_threshold(_parse_threshold(value), self.prepared_max)

    @property
    def prepared_max(self) -> int:
        """How many prepared statements this connection keeps at most."""
        return self._prepared_max

    @prepared_max.setter
    def prepared_max(self, value: int) -> None:
        self.set_prepare_threshold(self.prepare_threshold, int(value))

    def set_prepare_threshold(self, threshold: Optional[int], maxsize: int) -> None:
        self._prepared_max = int(maxsize)
        old = self._prepared
        if threshold is None:
            self._prepared = None
        else:
            self._prepared = _PreparedCache(
                threshold,
                self._prepared_max,
                f"{_PROCESS_TOKEN}_{self._serial}",
                self._raw.server_version,
            )
            if old is not None:  # keep the names unique
                self._prepared.serial = old.serial
        if old is not None and self._prepared is not None:
            self._prepared.deallocate = [e.name for e in old.names.values()]
            self._prepared.deallocate.extend(old.deallocate)

    def _note_tag(self, operation: Any, tag: Optional[str]) -> None:
        """After a statement of a transaction: is it still read-only?"""
        if not (
            isinstance(operation, str)
            and tag is not None
            and tag.startswith(_READ_TAGS)
            and _READ_STATEMENT(operation) is not None
            and ";" not in operation
            and _INTO(operation) is None
        ):
            self._reads_only = False

    def close(self) -> None:
        """Close the connection (the server rolls back an open transaction)."""
        self._finalizer.detach()
        self._closed_by_user = True
        if self._wire._connection is not None:
            self._wire.close()

    def cancel(self) -> None:
        """
        Ask the server to cancel the query running on this connection.  From
        a fiber, through ``pg_cancel_backend()`` on a short-lived connection
        (the fiber waits, the reactor goes on).  On the hub, with libpq's
        ``PQcancel``, which connects to the server and waits for it on the
        reactor's thread (about a millisecond on a local server; as long as
        the server takes to answer otherwise).
        """
        self._check_open()
        if in_fiber():
            with shield():
                self._send_cancel()
        else:
            self._raw.cancel()

    def hstore_oids(self) -> Optional[tuple[int, int]]:
        """
        The OIDs of the hstore type and of its array type, or None when the
        extension is not installed, looked up with an ordinary query
        (psycopg2's ``HstoreAdapter.get_oids`` runs a hidden one, which breaks
        an asynchronous connection).
        """
        cur = self.cursor()
        try:
            cur.execute(_HSTORE_OIDS)
            row = cur.fetchone()
        finally:
            cur.close()
        return (row[0], row[1]) if row else None

    def register_hstore(self, oids: Optional[tuple[int, int]] = None) -> bool:
        """
        Convert hstore values to and from dicts on this connection.

        :param oids: ``(oid, array_oid)``, as :meth:`hstore_oids` returns;
            looked up when not given.
        :return: False when the hstore extension is not installed.
        """
        if oids is None:
            oids = self.hstore_oids()
            if oids is None:
                return False
        psycopg2.extras.register_hstore(self._raw, oid=oids[0], array_oid=oids[1])
        return True

    def add_notify_observer(self, observer: Callable[[Any], Any]) -> None:
        """
        Call ``observer(notify)`` for each NOTIFY received (after LISTEN).
        While a connection has observers, the reactor watches its socket, so
        notifications arrive as they are sent, also while it is idle.
        """
        self._wire.addNotifyObserver(observer)
        self._wire.watch()

    def add_lost_observer(self, observer: Callable[[str], Any]) -> None:
        """
        Call ``observer(reason)`` once, on the reactor's greenlet, when the
        server ends this connection while it is idle and watched (while it
        has NOTIFY observers), e.g. a killed backend or a server restart.
        A query that fails on a lost connection raises as usual instead.
        For a LISTEN connection, which must reconnect at once.
        """
        self._wire.lost_observers.append(observer)

    def remove_notify_observer(self, observer: Callable[[Any], Any]) -> None:
        self._wire.removeNotifyObserver(observer)
        if not self._raw.closed:
            self._wire.unwatch_if_idle(force=True)

    def check_alive(self, wait: bool = False) -> bool:
        """
        Whether the connection is still usable, learnt without a round trip:
        what the server sent while the connection was idle is read (a server
        that ended the connection, killed backend or restart, says so before
        it closes the socket).  False once closed.  The pool calls this at
        checkout, so a connection that died in the pool is replaced instead
        of being handed out.  A transaction's end that ran in the background
        (``background_end``) is collected: when it failed, the connection is
        closed and this returns False.  One still running is waited for with
        ``wait=True`` (from a fiber: the pool's checkout); otherwise this
        returns True and the next query waits for it.
        """
        if self._background is not None and self._user is None:
            fib = current_fiber()
            if self._wire.busy and (not wait or fib is None):
                return True  # the next query (or a checkout) waits for it
            self._user = fib
            try:
                self._settle_background(fib)
            except psycopg2.Error:
                return False
            finally:
                self._user = None
        return self._wire.check_idle()

    # -- two-phase commit (PEP 249's optional tpc_* extension) -----------------

    def xid(self, format_id: int, gtrid: str, bqual: str) -> Any:
        """A transaction id for :meth:`tpc_begin`: psycopg2's own ``Xid``."""
        self._check_open()
        return psycopg2.extensions.Xid(format_id, gtrid, bqual)

    def tpc_begin(self, xid: Any) -> None:
        """
        Begin a two-phase transaction with ``xid`` (an :meth:`xid` or a
        string, used as the server's transaction id as it is).  As psycopg2,
        refused inside a transaction and in autocommit mode.  PostgreSQL
        needs ``max_prepared_transactions`` > 0 for :meth:`tpc_prepare`.
        """
        self._check_open()
        if self.status != STATUS_READY:
            raise ProgrammingError("tpc_begin cannot be used inside a transaction")
        xid = _ensure_xid(xid)
        if self._autocommit:
            raise ProgrammingError("tpc_begin can't be called in autocommit mode")
        raw = self._control_cursor()
        self._run(lambda: raw.execute(self._begin))
        self._tpc_xid = xid

    def tpc_prepare(self) -> None:
        """``PREPARE TRANSACTION`` the two-phase transaction: from now on only
        :meth:`tpc_commit` or :meth:`tpc_rollback` may follow."""
        self._check_open()
        if self._tpc_prepared:
            raise ProgrammingError(
                "tpc_prepare cannot be used with a prepared two-phase transaction"
            )
        if self._tpc_xid is None:
            raise ProgrammingError(
                "prepare must be called inside a two-phase transaction"
            )
        self._tpc_command("PREPARE TRANSACTION", self._tpc_xid)
        self._tpc_prepared = True

    def tpc_commit(self, xid: Any = None) -> None:
        """
        Without ``xid``: commit the two-phase transaction (``COMMIT`` before
        :meth:`tpc_prepare`, ``COMMIT PREPARED`` after).  With ``xid``
        (from :meth:`tpc_recover`, or a string): ``COMMIT PREPARED`` a
        transaction prepared earlier, outside any transaction.
        """
        self._tpc_finish(xid, "COMMIT", "COMMIT PREPARED")

    def tpc_rollback(self, xid: Any = None) -> None:
        """As :meth:`tpc_commit`, with ``ROLLBACK`` / ``ROLLBACK PREPARED``."""
        self._tpc_finish(xid, "ROLLBACK", "ROLLBACK PREPARED")

    def tpc_recover(self) -> list[Any]:
        """
        The transactions prepared on the server (``pg_prepared_xacts``), as
        ``Xid`` objects with ``prepared``, ``owner`` and ``database`` set.
        Ids that psycopg2 did not make come back unparsed: ``format_id`` and
        ``bqual`` None, ``gtrid`` the server's id.
        """
        self._check_open()
        if self._tpc_prepared:
            raise ProgrammingError(
                "tpc_recover cannot be used with a prepared two-phase transaction"
            )
        before = self.status
        cur = Cursor(self)
        try:
            cur.execute("SELECT gid, prepared, owner, database FROM pg_prepared_xacts")
            rows = cur.fetchall()
        finally:
            cur.close()
        if before == STATUS_READY and self.status == STATUS_BEGIN:
            self._rollback()  # the query began a transaction: end it
        return [RecoveredXid(*row) for row in rows]

    def _tpc_finish(self, xid: Any, one_phase: str, prepared: str) -> None:
        self._check_open()
        if xid is not None:
            xid = _ensure_xid(xid)
            if self.status != STATUS_READY:
                raise ProgrammingError(
                    "tpc_commit/tpc_rollback with a xid must be called outside a "
                    "transaction"
                )
            self._tpc_command(prepared, xid)
            return
        if self._tpc_xid is None:
            raise ProgrammingError(
                "tpc_commit/tpc_rollback with no parameter must be called in a "
                "two-phase transaction"
            )
        status = self.status
        if status == STATUS_BEGIN:
            raw = self._control_cursor()
            self._run(lambda: raw.execute(one_phase))
        elif status == STATUS_PREPARED:
            self._tpc_command(prepared, self._tpc_xid)
        else:
            raise InterfaceError("unexpected state in tpc_commit/tpc_rollback")
        self._tpc_xid = None
        self._tpc_prepared = False

    def _tpc_command(self, command: str, xid: Any) -> None:
        """Send ``command 'transaction id'`` as it is (no BEGIN before it)."""
        raw = self._control_cursor()
        sql = raw.mogrify(f"{command} %s", (str(xid),))
        self._run(lambda: raw.execute(sql))

    # -- not available -------------------------------------------------------

    def _unsupported(self, what: str, instead: str) -> Any:
        raise NotSupportedError(
            f"{what} is not available on an asynchronous connection: {instead}"
        )

    def lobject(self, *args: Any, **kwargs: Any) -> None:
        self._unsupported("lobject()", "use bytea columns, or lo_* SQL functions")

    def set_client_encoding(self, encoding: str) -> None:
        self._unsupported(
            "set_client_encoding()", "put client_encoding in the DSN instead"
        )

    def __enter__(self) -> Connection:
        """
        As psycopg2 2.9: the block is one transaction, committed when it ends
        normally and rolled back when it raises, even in autocommit mode; the
        connection stays open.  Blocks do not nest.
        """
        self._check_open()
        if self._entered:
            raise ProgrammingError("the connection cannot be re-entered recursively")
        self._entered = True
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self._entered = False
        if exc_type is None:
            self.commit()
        else:
            self.rollback()

    def __repr__(self) -> str:
        state = "closed" if self._raw.closed else "open"
        return f"<txfiberdb.dbapi.Connection {state} {self._raw.dsn!r}>"


_PGCursor: Any = psycopg2.extensions.cursor


class Cursor(_PGCursor):  # type: ignore[misc]
    """
    A client-side cursor: each result arrives whole, fetches do no I/O.

    It *is* a psycopg2 cursor (a ``psycopg2.extensions.cursor`` on the
    connection's asynchronous psycopg2 connection) whose queries park the
    fiber: what psycopg2 does with a result (fetches, ``scroll``,
    ``description``, ``tzinfo_factory``, ``cast``, ``mogrify``) is psycopg2's
    own, and psycopg2's functions that take a cursor (``register_type``,
    ``quote_ident``, ``extras.register_*``, typecasters) accept it.
    ``connection`` is the :class:`Connection`.
    """

    def __init__(self, connection: Connection, name: Optional[str] = None) -> None:
        if name is not None:
            raise ProgrammingError(
                f"Cursor() makes client-side cursors: for a named one, call "
                f"connection.cursor({name!r})"
            )
        super().__init__(connection._raw)
        self.scrollable: Optional[bool] = None  # as psycopg2's cursor() does
        self._conn = connection
        self._rowcount_override: Optional[int] = None

    @property
    def connection(self) -> Connection:
        """The :class:`Connection` this cursor belongs to."""
        return self._conn

    @property
    def _raw(self) -> Any:
        """psycopg2's own cursor methods (or the cursor factory's)."""
        return super()

    @property
    def rowcount(self) -> int:
        if self._rowcount_override is not None:
            return self._rowcount_override
        return self._raw.rowcount  # type: ignore[no-any-return]

    # -- queries --------------------------------------------------------------

    @_refusing_unstorable
    def execute(self, operation: Any, parameters: Any = None) -> None:
        """Run one statement (or several, ``;``-separated; the last one's
        result is kept), parking the fiber until the server answers."""
        operation = _sql_text(operation, self._conn._raw)
        _refuse_copy(operation)
        cache = self._conn._prepared
        if cache is not None and type(operation) is str:
            if cache.names and _DROPS_PREPARED(operation):
                self._execute(operation, parameters)
                cache.clear()
                return
            key = cache.key(operation, parameters)
            if key is not None and self._execute_prepared(
                cache, key, operation, parameters
            ):
                return
            self._execute(operation, parameters)
            # DDL on this connection may change what a prepared statement
            # returns: forget them all, as psycopg 3 does.
            if cache.names and (self._raw.statusmessage or "").startswith(_DDL_TAGS):
                cache.clear()
                cache.deallocate.append("ALL")
            return
        self._execute(operation, parameters)

    def _execute_prepared(
        self, cache: _PreparedCache, key: Any, operation: str, parameters: Any
    ) -> bool:
        """
        Run ``operation`` as a prepared statement, preparing it first when
        its time has come; False when it is to run unprepared instead.
        """
        entry = cache.names.get(key)
        if entry is None:
            if not cache.should_prepare(key):
                return False
            built = cache.build(key, operation, parameters)
            if built is None:
                cache.refuse(key)
                return False
            prepare, entry = built
            if not self._prepare(cache, key, prepare):
                return False
            cache.add(key, entry)
        else:
            cache.names.move_to_end(key)
        conn = self.connection
        self._rowcount_override = None
        prefix = conn._begin_prefix()
        raw = self._raw
        args = entry.args(parameters)
        sql = prefix + entry.execute if prefix else entry.execute
        try:
            conn._run(lambda: raw.execute(sql, args))
        except psycopg2.Error as e:
            if not self._stale_plan(cache, key, e):
                raise
            # The statement failed before doing anything; the user's query
            # is run again unprepared when nothing else was undone with it:
            # its transaction began in the same round trip, or there is none.
            if prefix:
                ctl = conn._control_cursor()
                conn._run(lambda: ctl.execute("ROLLBACK"))
            elif conn.in_transaction:
                raise
            self._execute(operation, parameters)
            return True
        if conn._reads_only:
            conn._note_tag(operation, raw.statusmessage)
        return True

    def _stale_plan(self, cache: _PreparedCache, key: Any, error: Exception) -> bool:
        """Whether ``error`` says the server's prepared statement is stale or
        gone (then it is forgotten, to be prepared again)."""
        code = getattr(error, "pgcode", None)
        if code == "0A000" and "cached plan must not change result type" in str(error):
            cache.forget(key)
            return True
        if code == "26000":  # prepared statement does not exist
            cache.clear()
            cache.lost += 1
            if cache.lost >= 3:
                _log.warn(
                    "auto-prepare turned off on a connection: the server lost "
                    "its prepared statements {n} times (a pooler such as "
                    "PgBouncer in transaction mode?); set prepare_threshold="
                    "None for such servers",
                    n=cache.lost,
                )
                self.connection._prepared = None
            return True
        return False

    def _prepare(self, cache: _PreparedCache, key: Any, prepare: str) -> bool:
        """
        Send ``PREPARE`` (and the deallocation of evicted statements) in a
        round trip of its own, before the statement's first ``EXECUTE``.
        Outside a transaction it runs alone; inside one, in a savepoint, so
        that a statement PREPARE refuses (a parameter type it cannot infer)
        aborts nothing: it is then run unprepared for good.
        """
        conn = self.connection
        raw = conn._control_cursor()
        drops = "".join(f"DEALLOCATE {name};" for name in cache.deallocate)
        cache.deallocate = []
        in_tx = conn.in_transaction
        if in_tx and conn.get_transaction_status() != TRANSACTION_STATUS_INTRANS:
            return False  # an aborted transaction: nothing can run
        if in_tx:
            sql = (
                f"SAVEPOINT _txf_prepare;{drops}{prepare};"
                f"RELEASE SAVEPOINT _txf_prepare"
            )
        else:
            sql = drops + prepare
        try:
            conn._run(lambda: raw.execute(sql))
        except psycopg2.Error:
            if in_tx and conn.in_transaction:
                conn._run(
                    lambda: raw.execute(
                        "ROLLBACK TO SAVEPOINT _txf_prepare;"
                        "RELEASE SAVEPOINT _txf_prepare"
                    )
                )
            if not drops:
                cache.refuse(key)
            return False
        return True

    def _execute(self, operation: Any, parameters: Any = None) -> None:
        # execute() without the COPY check: for statements built here from a
        # checked template and row data (which may say "COPY" in a literal).
        conn = self.connection
        self._rowcount_override = None
        prefix = conn._begin_prefix()
        raw = self._raw
        text = operation
        if prefix:
            if parameters is not None:
                operation = raw.mogrify(operation, parameters)
                parameters = None
            if isinstance(operation, bytes):
                sent = prefix.encode() + operation
            else:
                sent = prefix + operation
        else:
            sent = operation
        conn._run(lambda: raw.execute(sent, parameters))
        if conn._reads_only:
            conn._note_tag(text, raw.statusmessage)

    @_refusing_unstorable
    def executemany(self, operation: Any, seq_of_parameters: Sequence[Any]) -> None:
        """
        Run ``operation`` for each parameter set, in as few round trips as
        possible: a plain ``INSERT ... VALUES (...)`` becomes one multi-row
        INSERT per ``page_size`` rows; anything else is sent as pages of
        statements joined by ``;``.
        """
        self.executemany_batched(operation, seq_of_parameters)

    def executemany_batched(
        self, operation: Any, seq_of_parameters: Sequence[Any], page_size: int = 1000
    ) -> None:
        operation = _sql_text(operation, self._conn._raw)
        _refuse_copy(operation)
        rows = list(seq_of_parameters)
        if not rows:
            self._rowcount_override = 0
            return
        text = operation.decode() if isinstance(operation, bytes) else operation
        match = _INSERT_VALUES.match(text)
        if match and not _RETURNING_OR_CONFLICT.search(match.group(2)):
            head = match.group(1).encode(self.connection.encoding_python)
            template = match.group(2)
            total = 0
            for start in range(0, len(rows), page_size):
                page = rows[start : start + page_size]
                values = b",".join(self._raw.mogrify(template, p) for p in page)
                self._execute(head + values)
                total += self._raw.rowcount
            self._rowcount_override = total
            return
        for start in range(0, len(rows), page_size // 10 or 1):
            page = rows[start : start + (page_size // 10 or 1)]
            sql = b";".join(self._raw.mogrify(text, p) for p in page)
            self._execute(sql)
        self._rowcount_override = self._raw.rowcount if len(rows) == 1 else -1

    @_refusing_unstorable
    def callproc(self, procname: str, parameters: Any = None) -> Any:
        conn = self.connection
        raw = self._raw
        if conn._begin_prefix():
            conn._run(lambda: raw.execute(conn._begin))
        conn._reads_only = False
        conn._run(lambda: raw.callproc(procname, parameters))
        return parameters

    def _copy(self, *args: Any, **kwargs: Any) -> None:
        raise NotSupportedError(_COPY_REFUSED)

    copy_from = copy_to = copy_expert = _copy

    def __repr__(self) -> str:
        return f"<txfiberdb.dbapi.Cursor of {self.connection!r}>"


class ServerCursor(Cursor):
    """
    A named cursor: ``DECLARE`` at :meth:`execute`, then ``FETCH`` in batches
    of ``itersize`` rows, inside the transaction (which ``execute`` begins if
    needed).  Rows never sit all in memory at once unless you
    ``fetchall()``.  Fetching from a named cursor never executed reads the
    server cursor of that name declared elsewhere (``DECLARE`` in SQL, a
    function returning a ``refcursor``), as psycopg2 does.
    """

    def __init__(self, connection: Connection, name: str) -> None:
        super().__init__(connection)
        self._name = name
        self._quoted = psycopg2.extensions.quote_ident(name, connection._raw)
        self._withhold = False
        self._scrollable: Optional[bool] = None
        self._buffer: list[tuple[Any, ...]] = []
        self._pos = 0
        self._exhausted = False
        self._executed = False
        self._used = False
        self._description: Any = None
        self._fetched = 0  # rows fetched so far (or the row scrolled to)
        self._server_row = 0  # the server cursor's position
        self._past_end = False  # ... after its last row

    @property
    def name(self) -> Optional[str]:
        return self._name

    @property
    def withhold(self) -> bool:
        """``DECLARE ... WITH HOLD``: the cursor outlives its transaction."""
        return self._withhold

    @withhold.setter
    def withhold(self, value: Any) -> None:
        self._withhold = bool(value)

    @property
    def scrollable(self) -> Optional[bool]:
        """``SCROLL`` (True), ``NO SCROLL`` (False) or the server's default."""
        return self._scrollable

    @scrollable.setter
    def scrollable(self, value: Any) -> None:
        self._scrollable = None if value is None else bool(value)

    @property
    def description(self) -> Any:
        return self._description

    @property
    def rowcount(self) -> int:
        return self._fetched if self._used else -1

    @property
    def rownumber(self) -> int:
        return self._fetched - (len(self._buffer) - self._pos)

    @_refusing_unstorable
    def execute(self, operation: Any, parameters: Any = None) -> None:
        if self._executed:
            raise ProgrammingError(
                "can't call .execute() on named cursors more than once"
            )
        conn = self.connection
        if conn._autocommit and not self.withhold:
            raise ProgrammingError(
                "can't use a named cursor outside of transactions: turn "
                "autocommit off, or declare it with cursor(name, withhold=True)"
            )
        operation = _sql_text(operation, conn._raw)
        _refuse_copy(operation)
        raw = self._raw
        query = raw.mogrify(operation, parameters)
        scroll = {None: "", True: " SCROLL", False: " NO SCROLL"}[self.scrollable]
        hold = " WITH HOLD" if self.withhold else ""
        declare = f"DECLARE {self._quoted}{scroll} CURSOR{hold} FOR ".encode() + query
        fetch = f";FETCH FORWARD {int(self.itersize)} FROM {self._quoted}".encode()
        sql = conn._begin_prefix().encode() + declare + fetch
        conn._run(lambda: raw.execute(sql))
        self._executed = self._used = True
        self._description = raw.description
        self._take(raw.fetchall(), self.itersize)

    def executemany(self, operation: Any, seq_of_parameters: Sequence[Any]) -> None:
        raise ProgrammingError("can't call .executemany() on named cursors")

    def callproc(self, procname: str, parameters: Any = None) -> Any:
        raise ProgrammingError("can't call .callproc() on named cursors")

    def _take(self, rows: list[tuple[Any, ...]], requested: Optional[int]) -> None:
        """Buffer the rows of a FETCH of ``requested`` rows (None: ALL)."""
        self._buffer = rows
        self._pos = 0
        self._fetched += len(rows)
        self._server_row += len(rows)
        self._past_end = requested is None or len(rows) < requested
        self._exhausted = self._past_end

    def _send(self, sql: str) -> None:
        """A FETCH/MOVE on the server cursor, in a transaction unless held."""
        conn = self.connection
        if not self.withhold:
            sql = conn._begin_prefix() + sql
        raw = self._raw
        conn._run(lambda: raw.execute(sql.encode()))
        self._used = True

    def _fetch(self, count: Optional[int]) -> None:
        what = "ALL" if count is None else f"FORWARD {int(count)}"
        self._send(f"FETCH {what} FROM {self._quoted}")
        raw = self._raw
        if raw.description is not None:
            self._description = raw.description
        self._take(raw.fetchall(), count)

    def fetchone(self) -> Optional[tuple[Any, ...]]:
        if self._pos >= len(self._buffer):
            if self._exhausted:
                return None
            self._fetch(self.itersize)
            if not self._buffer:
                return None
        row = self._buffer[self._pos]
        self._pos += 1
        return row

    def fetchmany(self, size: Optional[int] = None) -> list[tuple[Any, ...]]:
        size = self.arraysize if size is None else size
        out: list[tuple[Any, ...]] = []
        while len(out) < size:
            if self._pos >= len(self._buffer):
                if self._exhausted:
                    break
                self._fetch(max(self.itersize, size - len(out)))
                if not self._buffer:
                    break
            take = self._buffer[self._pos : self._pos + size - len(out)]
            self._pos += len(take)
            out.extend(take)
        return out

    def fetchall(self) -> list[tuple[Any, ...]]:
        out = self._buffer[self._pos :]
        self._pos = len(self._buffer)
        if not self._exhausted:
            self._fetch(None)
            out.extend(self._buffer)
            self._pos = len(self._buffer)
        return out

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        return self

    def __next__(self) -> tuple[Any, ...]:
        row = self.fetchone()
        if row is None:
            raise StopIteration
        return row

    def scroll(self, value: int, mode: str = "relative") -> None:
        """
        Move in the result with ``MOVE`` on the server, as psycopg2 does;
        backwards needs ``scrollable=True``.  ``relative`` counts from the
        current row (rows already read ahead into the batch are accounted
        for), ``absolute`` from the start.
        """
        server = self._server_row + self._past_end
        if mode == "absolute":
            target = int(value)
            move = f"MOVE ABSOLUTE {target} FROM {self._quoted}"
        else:  # psycopg2 takes any other mode as relative on named cursors
            # Where psycopg2, which reads no rows ahead, would be.
            current = server if self._pos >= len(self._buffer) else self.rownumber
            target = current + int(value)
            move = f"MOVE {target - server} FROM {self._quoted}"
        self._send(move)
        self._buffer, self._pos, self._exhausted = [], 0, False
        self._fetched = self._server_row = target
        self._past_end = False

    def close(self) -> None:
        """
        Close the server-side cursor when it still exists: one this cursor
        declared, while its transaction is open (or held); one declared
        elsewhere and never executed here, when the server has it
        (``pg_cursors``), as psycopg2 does.
        """
        conn = self.connection
        raw = self._raw
        if (
            not self.closed
            and conn._user is None
            and in_fiber()
            and conn.get_transaction_status()
            in (TRANSACTION_STATUS_IDLE, TRANSACTION_STATUS_INTRANS)
        ):
            try:
                if self._executed:
                    needed = self.withhold or conn.in_transaction
                else:
                    conn._run(
                        lambda: raw.execute(
                            "SELECT 1 FROM pg_catalog.pg_cursors WHERE name = %s",
                            (self._name,),
                        )
                    )
                    needed = bool(raw.fetchall())
                if needed:
                    conn._run(lambda: raw.execute(f"CLOSE {self._quoted}".encode()))
            except (psycopg2.Error, CancelledError):
                pass
        self._executed = False
        self._buffer = []
        super().close()

    def __repr__(self) -> str:
        return f"<txfiberdb.dbapi.ServerCursor {self._name!r} of {self.connection!r}>"


# psycopg2 cursor classes that need a kind of connection this driver has not.
_REFUSED_FACTORIES = (
    (
        psycopg2.extras.LoggingCursor,
        "it logs through psycopg2.extras.LoggingConnection, which an "
        "asynchronous connection cannot be: log statements with the logging "
        "module (SQLAlchemy's echo=True) instead",
    ),
    (
        psycopg2.extras.ReplicationCursor,
        "replication needs a blocking replication connection "
        "(psycopg2.extras.LogicalReplicationConnection)",
    ),
)
_cursor_classes: dict[tuple[type, type], type] = {}


def _cursor_class(base: type, factory: Any) -> Any:
    """
    The class of a cursor made with ``cursor_factory``: ``base``
    (:class:`Cursor` or :class:`ServerCursor`) combined with the factory, a
    ``psycopg2.extensions.cursor`` subclass, so the factory's row handling
    (DictCursor's rows, NamedTupleCursor's records) applies to results that
    arrive through the fiber.  Made once per factory.
    """
    if factory is None or factory is _PGCursor:
        return base
    if not (isinstance(factory, type) and issubclass(factory, _PGCursor)):
        raise TypeError(
            f"cursor factory must be subclass of psycopg2.extensions.cursor, "
            f"not {factory!r} (psycopg2.extras.DictCursor, RealDictCursor, "
            f"NamedTupleCursor or a subclass of txfiberdb.dbapi.Cursor work)"
        )
    if issubclass(factory, base):
        return factory
    for refused, why in _REFUSED_FACTORIES:
        if issubclass(factory, refused):
            raise NotSupportedError(f"cursor_factory={factory.__name__}: {why}")
    cls = _cursor_classes.get((base, factory))
    if cls is None:
        cls = type(
            factory.__name__,
            (base, factory),
            {
                "__module__": __name__,
                "__doc__": f"{base.__name__} with {factory.__name__}'s rows.",
            },
        )
        _cursor_classes[(base, factory)] = cls
    return cls
