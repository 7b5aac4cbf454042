# -*- test-case-name: tests.test_dbapi -*-
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
  sends no ``BEGIN``.
- ``executemany`` sends a whole batch per round trip: ``INSERT ... VALUES``
  becomes one multi-row ``INSERT`` (exact ``rowcount``); other statements are
  sent as pages of ``;``-joined statements (``rowcount`` is then -1, as PEP
  249 allows).
- Named (server-side) cursors are ``DECLARE``/``FETCH`` inside the
  transaction, fetched in batches of ``itersize`` rows.
- COPY would wedge an asynchronous connection for good: it is refused before
  anything is sent.
- ``connect_timeout`` is enforced with a reactor timer.
- Cancelling the waiting fiber sends a PostgreSQL cancel, waits for the
  server to confirm, and raises ``CancelledError``; the connection stays
  usable (its transaction, if any, must be rolled back).
- A connection the server ended (killed backend, restart) reports itself
  closed and raises psycopg2's ``OperationalError``/``InterfaceError``;
  nothing is logged as an unhandled error.

Errors are psycopg2's own classes, so ``except psycopg2.IntegrityError`` keeps
working.  Types are converted as psycopg2 converts them (json, jsonb, uuid,
arrays, numeric, ranges, ...); hstore after :meth:`Connection.register_hstore`.
"""

from __future__ import annotations

import functools
import os
import re
import select
import socket
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Optional

import psycopg2
import psycopg2.extensions
import psycopg2.extras
import psycopg2.sql
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
    TRANSACTION_STATUS_IDLE,
    TRANSACTION_STATUS_UNKNOWN,
)
from twisted.internet.defer import CancelledError, Deferred, DeferredSemaphore, fail
from twisted.logger import Logger
from twisted.python.failure import Failure
from txpostgres import txpostgres

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
extensions = psycopg2.extensions
extras = psycopg2.extras
errors = psycopg2.errors
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


class _CancelUnconfirmed(Exception):
    """The server did not answer a cancel within CANCEL_GRACE."""


class UnstorableValueError(DataError, ValueError):
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
    """``sql`` as str or bytes: a ``psycopg2.sql`` Composable is rendered."""
    if isinstance(sql, (str, bytes)):
        return sql
    if isinstance(sql, psycopg2.sql.Composable):
        return sql.as_string(raw)
    raise TypeError(
        f"a query must be str, bytes or psycopg2.sql.Composable, not "
        f"{type(sql).__name__}"
    )


def _refuse_copy(sql: Any) -> None:
    """Raise NotSupportedError if the statement (template) holds a COPY."""
    text = sql.decode("latin-1") if isinstance(sql, bytes) else sql
    if _COPY_HINT(text) and _COPY.search(text):
        raise NotSupportedError(_COPY_REFUSED)


class _Wire(txpostgres.Connection):
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
        self._fd = -1
        self.local_port: Optional[int] = None  # our end's TCP port

    # -- connecting: our own poll cycle (txpostgres's raises into the reactor
    # when libpq drops its socket half-way, e.g. while a server starts or
    # stops: "file descriptor cannot be a negative integer") -------------------

    def connect(self, params: str) -> Deferred[Any]:  # type: ignore[override]
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

    def fileno(self) -> int:
        if self._fd >= 0:
            return self._fd
        return super().fileno()  # type: ignore[no-any-return]

    def watch(self) -> None:
        if not self.watching and self._fd >= 0:
            self.watching = True
            self.reactor.addReader(self)

    def unwatch_if_idle(self) -> None:
        """Stop watching the socket if nothing needs it watched."""
        if (
            self.watching
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
        self.busy = False
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
    return Connection(wire, params)


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
        self._cursor_factory: Optional[Callable[..., Any]] = None
        self._ctl: Any = None
        # Dropped without close(): the reactor's reader and the server's
        # backend would otherwise outlive it for as long as the process.
        self._finalizer = weakref.finalize(self, _close_forgotten, wire)
        self._finalizer.atexit = False

    # -- state -------------------------------------------------------------

    @property
    def raw_connection(self) -> Any:
        """The underlying asynchronous psycopg2 connection (for type set-up)."""
        return self._raw

    @property
    def closed(self) -> int:
        """0 while open, 1 after :meth:`close`, 2 when the server ended it."""
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
        return self._raw.status  # type: ignore[no-any-return]

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
        """Whether a transaction is open on the server (ours or the user's)."""
        status = self._raw.get_transaction_status()
        return status not in (TRANSACTION_STATUS_IDLE, TRANSACTION_STATUS_UNKNOWN)

    # -- session settings ----------------------------------------------------

    def _check_no_transaction(self, what: str) -> None:
        if self.in_transaction:
            raise ProgrammingError(
                f"{what} cannot be used inside a transaction: commit() or "
                f"rollback() first"
            )

    @property
    def autocommit(self) -> bool:
        return self._autocommit

    @autocommit.setter
    def autocommit(self, value: bool) -> None:
        self._check_no_transaction("set_session")
        self._autocommit = bool(value)

    @property
    def isolation_level(self) -> Optional[int]:
        """None (the server's default) or a ``ISOLATION_LEVEL_*`` constant."""
        return self._isolation_level

    @isolation_level.setter
    def isolation_level(self, value: Any) -> None:
        self.set_session(isolation_level=value)

    @property
    def readonly(self) -> Optional[bool]:
        return self._readonly

    @readonly.setter
    def readonly(self, value: Optional[bool]) -> None:
        self.set_session(readonly=value)

    @property
    def deferrable(self) -> Optional[bool]:
        return self._deferrable

    @deferrable.setter
    def deferrable(self, value: Optional[bool]) -> None:
        self.set_session(deferrable=value)

    _UNSET: Any = object()

    def set_session(
        self,
        isolation_level: Any = _UNSET,
        readonly: Any = _UNSET,
        deferrable: Any = _UNSET,
        autocommit: Any = _UNSET,
    ) -> None:
        """
        As psycopg2's: the settings apply to the transactions begun from now
        on (``BEGIN ISOLATION LEVEL ... READ ONLY DEFERRABLE``).  Levels are
        ``ISOLATION_LEVEL_*`` constants or names (``"REPEATABLE READ"``);
        ``None``/``"DEFAULT"`` means the server's default.
        """
        self._check_no_transaction("set_session")
        if isolation_level is not self._UNSET:
            self._isolation_level = self._level(isolation_level)
        if readonly is not self._UNSET:
            self._readonly = None if readonly in (None, "DEFAULT") else bool(readonly)
        if deferrable is not self._UNSET:
            self._deferrable = (
                None if deferrable in (None, "DEFAULT") else bool(deferrable)
            )
        if autocommit is not self._UNSET:
            self._autocommit = bool(autocommit)
        parts = ["BEGIN"]
        if self._isolation_level is not None:
            parts.append("ISOLATION LEVEL " + _ISOLATION_NAMES[self._isolation_level])
        if self._readonly is not None:
            parts.append("READ ONLY" if self._readonly else "READ WRITE")
        if self._deferrable is not None:
            parts.append("DEFERRABLE" if self._deferrable else "NOT DEFERRABLE")
        self._begin = " ".join(parts)

    def set_isolation_level(self, level: Any) -> None:
        """psycopg2's older API: 0 (``ISOLATION_LEVEL_AUTOCOMMIT``) is autocommit."""
        if level == psycopg2.extensions.ISOLATION_LEVEL_AUTOCOMMIT:
            self.set_session(autocommit=True)
        else:
            self.set_session(isolation_level=level, autocommit=False)

    @staticmethod
    def _level(value: Any) -> Optional[int]:
        if value is None:
            return None
        if isinstance(value, str):
            name = value.upper().replace("_", " ")
            if name == "DEFAULT":
                return None
            if name in _ISOLATION_LEVELS:
                return _ISOLATION_LEVELS[name]
        elif value in _ISOLATION_NAMES:
            return int(value)
        raise ValueError(
            f"bad isolation level {value!r}: use one of "
            f"{sorted(_ISOLATION_LEVELS)} or psycopg2's ISOLATION_LEVEL_* constants"
        )

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
            start()
            if wire.begin():
                wire.fiber = fib
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
        if self._autocommit or self.in_transaction:
            return ""
        return self._begin + ";"

    # -- PEP 249 ------------------------------------------------------------

    def cursor(
        self,
        name: Optional[str] = None,
        cursor_factory: Optional[Callable[..., Any]] = None,
        withhold: bool = False,
        scrollable: Optional[bool] = None,
    ) -> Cursor:
        """A cursor; with ``name``, a server-side cursor (:class:`ServerCursor`)."""
        self._check_open()
        factory = cursor_factory or self._cursor_factory
        if name is not None:
            return ServerCursor(self, name, withhold=withhold, scrollable=scrollable)
        if factory is not None:
            return factory(self)  # type: ignore[no-any-return]
        return Cursor(self)

    def commit(self) -> None:
        """Commit the open transaction (no-op when none is open)."""
        self._check_open()
        if self.in_transaction:
            raw = self._control_cursor()
            self._run(lambda: raw.execute("COMMIT"))

    def rollback(self) -> None:
        """Roll back the open transaction (no-op when none is open)."""
        self._check_open()
        if self.in_transaction:
            raw = self._control_cursor()
            self._run(lambda: raw.execute("ROLLBACK"))

    def _control_cursor(self) -> Any:
        """A raw cursor kept for COMMIT and ROLLBACK."""
        if self._ctl is None:
            self._ctl = self._raw.cursor()
        return self._ctl

    def close(self) -> None:
        """Close the connection (the server rolls back an open transaction)."""
        self._finalizer.detach()
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
            self._wire.unwatch_if_idle()

    def check_alive(self) -> bool:
        """
        Whether the connection is still usable, learnt without a round trip:
        what the server sent while the connection was idle is read (a server
        that ended the connection, killed backend or restart, says so before
        it closes the socket).  False once closed.  The pool calls this at
        checkout, so a connection that died in the pool is replaced instead
        of being handed out.
        """
        return self._wire.check_idle()

    def _unsupported(self, what: str, instead: str) -> Any:
        raise NotSupportedError(
            f"{what} is not available on an asynchronous connection: {instead}"
        )

    def tpc_begin(self, xid: Any) -> None:
        self._unsupported(
            "two-phase commit through tpc_*()",
            "send PREPARE TRANSACTION / COMMIT PREPARED as SQL",
        )

    tpc_prepare = tpc_commit = tpc_rollback = tpc_recover = tpc_begin  # type: ignore[assignment]

    def lobject(self, *args: Any, **kwargs: Any) -> None:
        self._unsupported("lobject()", "use bytea columns, or lo_* SQL functions")

    def set_client_encoding(self, encoding: str) -> None:
        self._unsupported(
            "set_client_encoding()", "put client_encoding in the DSN instead"
        )

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        # As psycopg2: commit or roll back, leave the connection open.
        if exc_type is None:
            self.commit()
        else:
            self.rollback()

    def __repr__(self) -> str:
        state = "closed" if self._raw.closed else "open"
        return f"<txfiberdb.dbapi.Connection {state} {self._raw.dsn!r}>"


class Cursor:
    """A client-side cursor: each result arrives whole, fetches do no I/O."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self._raw = connection._raw.cursor()
        self.arraysize = 1
        self._rowcount_override: Optional[int] = None

    # -- results (no I/O) -----------------------------------------------------

    @property
    def description(self) -> Any:
        return self._raw.description

    @property
    def rowcount(self) -> int:
        if self._rowcount_override is not None:
            return self._rowcount_override
        return self._raw.rowcount  # type: ignore[no-any-return]

    @property
    def rownumber(self) -> int:
        return self._raw.rownumber  # type: ignore[no-any-return]

    @property
    def lastrowid(self) -> int:
        return self._raw.lastrowid  # type: ignore[no-any-return]

    @property
    def statusmessage(self) -> Optional[str]:
        return self._raw.statusmessage  # type: ignore[no-any-return]

    @property
    def query(self) -> Optional[bytes]:
        return self._raw.query  # type: ignore[no-any-return]

    @property
    def closed(self) -> bool:
        return bool(self._raw.closed)

    @property
    def name(self) -> Optional[str]:
        return None

    def fetchone(self) -> Optional[tuple[Any, ...]]:
        return self._raw.fetchone()  # type: ignore[no-any-return]

    def fetchmany(self, size: Optional[int] = None) -> list[tuple[Any, ...]]:
        return self._raw.fetchmany(self.arraysize if size is None else size)  # type: ignore[no-any-return]

    def fetchall(self) -> list[tuple[Any, ...]]:
        return self._raw.fetchall()  # type: ignore[no-any-return]

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        while True:
            row = self.fetchone()
            if row is None:
                return
            yield row

    def mogrify(self, operation: Any, parameters: Any = None) -> bytes:
        return self._raw.mogrify(operation, parameters)  # type: ignore[no-any-return]

    def setinputsizes(self, sizes: Any) -> None:
        pass

    def setoutputsize(self, size: Any, column: Any = None) -> None:
        pass

    def close(self) -> None:
        self._raw.close()

    def __enter__(self) -> Cursor:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- queries --------------------------------------------------------------

    @_refusing_unstorable
    def execute(self, operation: Any, parameters: Any = None) -> None:
        """Run one statement (or several, ``;``-separated; the last one's
        result is kept), parking the fiber until the server answers."""
        operation = _sql_text(operation, self._raw)
        _refuse_copy(operation)
        self._execute(operation, parameters)

    def _execute(self, operation: Any, parameters: Any = None) -> None:
        # execute() without the COPY check: for statements built here from a
        # checked template and row data (which may say "COPY" in a literal).
        conn = self.connection
        self._rowcount_override = None
        prefix = conn._begin_prefix()
        raw = self._raw
        if prefix:
            if parameters is not None:
                operation = raw.mogrify(operation, parameters)
                parameters = None
            if isinstance(operation, bytes):
                operation = prefix.encode() + operation
            else:
                operation = prefix + operation
        conn._run(lambda: raw.execute(operation, parameters))

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
        operation = _sql_text(operation, self._raw)
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
    needed, even in autocommit mode unless ``withhold``).  Rows never sit all
    in memory at once unless you ``fetchall()``.
    """

    def __init__(
        self,
        connection: Connection,
        name: str,
        withhold: bool = False,
        scrollable: Optional[bool] = None,
    ) -> None:
        super().__init__(connection)
        self._name = name
        self._quoted = psycopg2.extensions.quote_ident(name, connection._raw)
        self.withhold = withhold
        self.scrollable = scrollable
        self.itersize = 2000
        self._buffer: list[tuple[Any, ...]] = []
        self._pos = 0
        self._exhausted = True
        self._declared = False
        self._description: Any = None
        self._fetched = 0

    @property
    def name(self) -> Optional[str]:
        return self._name

    @property
    def description(self) -> Any:
        return self._description

    @property
    def rowcount(self) -> int:
        return self._fetched if self._declared else -1

    @property
    def rownumber(self) -> int:
        return self._fetched - (len(self._buffer) - self._pos)

    @_refusing_unstorable
    def execute(self, operation: Any, parameters: Any = None) -> None:
        operation = _sql_text(operation, self._raw)
        _refuse_copy(operation)
        if self._declared:
            raise ProgrammingError(
                "can't call .execute() on named cursors more than once"
            )
        conn = self.connection
        if conn._autocommit and not self.withhold and not conn.in_transaction:
            raise ProgrammingError(
                "can't use a named cursor outside of transactions: turn "
                "autocommit off, or declare it with cursor(name, withhold=True)"
            )
        raw = self._raw
        query = raw.mogrify(operation, parameters)
        scroll = {None: "", True: " SCROLL", False: " NO SCROLL"}[self.scrollable]
        hold = " WITH HOLD" if self.withhold else ""
        declare = f"DECLARE {self._quoted}{scroll} CURSOR{hold} FOR ".encode() + query
        begin = "" if conn._autocommit or conn.in_transaction else conn._begin + ";"
        fetch = f";FETCH FORWARD {int(self.itersize)} FROM {self._quoted}".encode()
        sql = begin.encode() + declare + fetch
        conn._run(lambda: raw.execute(sql))
        self._declared = True
        self._description = raw.description
        self._take(raw.fetchall())

    def _take(self, rows: list[tuple[Any, ...]]) -> None:
        self._buffer = rows
        self._pos = 0
        self._fetched += len(rows)
        self._exhausted = len(rows) < self.itersize

    def _fetch(self, count: Optional[int]) -> None:
        what = "ALL" if count is None else f"FORWARD {int(count)}"
        raw = self._raw
        self.connection._run(
            lambda: raw.execute(f"FETCH {what} FROM {self._quoted}".encode())
        )
        rows = raw.fetchall()
        self._take(rows)
        if count is None:
            self._exhausted = True

    def _check(self) -> None:
        if not self._declared:
            raise ProgrammingError("no results to fetch: call execute() first")

    def fetchone(self) -> Optional[tuple[Any, ...]]:
        self._check()
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
        self._check()
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
        self._check()
        out = self._buffer[self._pos :]
        self._pos = len(self._buffer)
        if not self._exhausted:
            self._fetch(None)
            out.extend(self._buffer)
            self._pos = len(self._buffer)
        return out

    def scroll(self, value: int, mode: str = "relative") -> None:
        raise NotSupportedError(
            "scroll() is not supported on txfiberdb's named cursors"
        )

    def close(self) -> None:
        """Close the server-side cursor (when its transaction is still open)."""
        conn = self.connection
        if (
            self._declared
            and not conn._raw.closed
            and conn.in_transaction
            and conn._user is None
            and in_fiber()
            and conn.get_transaction_status()
            == psycopg2.extensions.TRANSACTION_STATUS_INTRANS
        ):
            raw = self._raw
            try:
                conn._run(lambda: raw.execute(f"CLOSE {self._quoted}".encode()))
            except (psycopg2.Error, CancelledError):
                pass
        self._declared = False
        self._buffer = []
        super().close()
