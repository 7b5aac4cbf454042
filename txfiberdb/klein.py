# -*- test-case-name: tests.test_klein -*-
"""
Klein glue: run a route in a fiber, with a Session per request.

>>> app = Klein()                                          # doctest: +SKIP
>>> db = EngineService("postgresql+txpostgres://...")      # doctest: +SKIP
>>> routes = FiberRoutes(db, app)                          # doctest: +SKIP
>>> @routes.route("/products/<int:product_id>", methods=["GET"])  # doctest: +SKIP
... def get_product(request, session, product_id):
...     product = session.get(Product, product_id)
...     if product is None:
...         raise NotFound(f"no product {product_id}")
...     return {"id": product.id, "name": product.name}

(``@app.route(...)`` over ``@routes.handler()`` does the same.)

The handler is ordinary synchronous SQLAlchemy code, run in a fiber of the
:class:`~txfiberdb.service.EngineService` (so shutdown waits for it).  Its
Session commits when it returns and rolls back when it raises (with the
dialect's defaults, a transaction that only read, and every rollback, end
without the request waiting for the server: doc/howto/performance.md).  A dict or
list is sent as JSON; ``bytes``/``str`` as they are; ``None`` as an empty
body (set the code with ``request.setResponseCode``: 201, 204...).

Errors become JSON answers (``{"error": message}``) that leak nothing:

- :class:`HTTPError` and its subclasses: their own code and message (and
  ``details``, when given);
- werkzeug's HTTP exceptions: their code and description;
- an exhausted pool (SQLAlchemy's ``TimeoutError``), the service shutting
  down, a route at its ``concurrency`` limit, a database that cannot be
  reached or gave up (``OperationalError``: lost connection, refused
  connection, statement timeout, deadlock; ``InterfaceError`` or any error
  that invalidated its connection): 503 with ``Retry-After``;
- ``NoResultFound`` (``Result.scalar_one()`` and friends): 404;
- a conflict with existing data (``IntegrityError``): 409;
- data the database refused or could not take (``DataError``: out of
  range, bad format, a NUL character in text): 400;
- anything else: 500 with an error id, which is also in the log with the
  traceback.

Logging: unexpected errors are logged with their traceback and error id.
Expected failures (database unavailable, pool exhausted, route busy,
shutting down) are one warning line each, without traceback, SQL or
parameters; repeats of the same kind on the same route within
``summary_interval`` seconds are counted and reported in the next line of
that kind (``... (37 more like it in the last 10 s)``), so an outage does not
flood the log.

A long-lived answer (Server-Sent Events) is written from the fiber as it
goes: :class:`EventStream` (see there); the handler returns when the stream
is over, or is cancelled when the client leaves.

A route can bound its share of the pool: ``@routes.route(url,
concurrency=5)`` lets at most 5 requests of that route run at once; the
others wait up to ``concurrency_timeout`` seconds for a turn, holding no
connection, then get a 503.  A slow route cannot starve the others.

When the client goes away, Klein cancels the route's Deferred: the fiber gets
``CancelledError`` where it waits, its running query is cancelled on the
server, its transaction rolled back and its connection returned to the pool.
A handler declared with ``shield=True`` finishes its work instead (for writes
that must not be cut in half); commit and rollback are always shielded.
"""

from __future__ import annotations

import datetime
import decimal
import functools
import json
import re
import time
import uuid
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any, Optional

from sqlalchemy import exc as sa_exc
from twisted.internet.defer import CancelledError, Deferred, DeferredSemaphore, fail
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from zope.interface import implementer

from txfiberdb._errors import first_line
from txfiberdb.fiber import WaitTimeout, await_deferred
from txfiberdb.fiber import shield as shield_block
from txfiberdb.service import EngineService, ServiceStopping

__all__ = [
    "BadRequest",
    "ClientStalled",
    "Conflict",
    "EventStream",
    "FiberRoutes",
    "HTTPError",
    "LogSummary",
    "NotFound",
    "PayloadTooLarge",
    "RouteBusy",
    "read_json",
]

_log = Logger(namespace="txfiberdb.klein")

#: The largest request body :func:`read_json` accepts by default (bytes).
DEFAULT_MAX_BODY = 64 * 1024


class HTTPError(Exception):
    """
    An error with an HTTP status; its message (and ``details``, any JSON
    value) are shown to the client as ``{"error": message, "details": ...}``.
    """

    code = 500

    def __init__(
        self, message: str, code: Optional[int] = None, details: Any = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.details = details
        if code is not None:
            self.code = code

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"error": self.message}
        if self.details is not None:
            body["details"] = self.details
        return body


class BadRequest(HTTPError):
    code = 400


class NotFound(HTTPError):
    code = 404


class Conflict(HTTPError):
    code = 409


class PayloadTooLarge(HTTPError):
    code = 413


class RouteBusy(HTTPError):
    """A route is at its ``concurrency`` limit and no turn came in time."""

    code = 503


class LogSummary:
    """
    Rate-limits log lines that repeat: of the lines with one key, the first
    is logged at once, and the ones that follow within ``interval`` seconds
    are counted into the next line with that key (``(37 more like it in the
    last 10 s)``).  For expected failures during an outage, which would
    otherwise write a line per request.
    """

    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval
        self._seen: dict[Any, tuple[float, int]] = {}

    def admit(self, key: Any) -> Optional[int]:
        """
        None if a line with ``key`` is to be dropped (counted); else how many
        were dropped since the last one logged.
        """
        now = time.monotonic()
        logged_at, repeats = self._seen.get(key, (None, 0))
        if logged_at is not None and now - logged_at < self.interval:
            self._seen[key] = (logged_at, repeats + 1)
            return None
        self._seen[key] = (now, 0)
        return repeats

    def suffix(self, repeats: int) -> str:
        """The text to append to a line that follows ``repeats`` dropped ones."""
        if not repeats:
            return ""
        return f" ({repeats} more like it in the last {self.interval:g} s)"

    def warn(self, kind: str, route: str, what: str) -> None:
        """Log ``route: what`` at warn level, summarised per (kind, route)."""
        repeats = self.admit((kind, route))
        if repeats is not None:
            _log.warn(
                "{route}: {what}{repeated}",
                route=route,
                what=what,
                repeated=self.suffix(repeats),
                failure_kind=kind,
            )


def _database_unavailable(error: Optional[BaseException]) -> bool:
    """An error that says the database cannot serve now (try again later)."""
    if isinstance(error, sa_exc.DBAPIError):
        return bool(error.connection_invalidated) or isinstance(
            error, (sa_exc.OperationalError, sa_exc.InterfaceError)
        )
    try:
        import psycopg2
    except ImportError:  # pragma: no cover
        return False
    return isinstance(error, (psycopg2.OperationalError, psycopg2.InterfaceError))


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def read_json(request: Any, max_bytes: int = DEFAULT_MAX_BODY) -> Any:
    """
    The request body parsed as JSON.

    :raise PayloadTooLarge: the body (or its announced ``Content-Length``) is
        over ``max_bytes``.
    :raise BadRequest: it is empty, not UTF-8, or not JSON.
    """
    length = request.getHeader(b"content-length")
    if length is not None:
        try:
            announced = int(length)
        except ValueError:
            raise BadRequest("invalid Content-Length header") from None
        if announced > max_bytes:
            raise PayloadTooLarge(
                f"request body of {announced} bytes is over the limit of "
                f"{max_bytes} bytes"
            )
    content = request.content
    if content is None:
        body = b""
    else:
        content.seek(0)
        body = content.read(max_bytes + 1)
    if len(body) > max_bytes:
        raise PayloadTooLarge(f"request body is over the limit of {max_bytes} bytes")
    if not body.strip():
        raise BadRequest("empty request body: a JSON document is expected")
    try:
        return json.loads(body.decode("utf-8"), parse_constant=_no_constant)
    except UnicodeDecodeError:
        raise BadRequest("request body is not UTF-8") from None
    except RecursionError:
        raise BadRequest("malformed JSON body: nested too deeply") from None
    except ValueError as e:
        raise BadRequest(f"malformed JSON body: {e}") from None


def _json_default(value: Any) -> Any:
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _find_request(args: tuple[Any, ...]) -> tuple[int, Any]:
    for i, arg in enumerate(args):
        if IRequest.providedBy(arg):
            return i, arg
    raise TypeError("a FiberRoutes handler needs Klein's request among its arguments")


class FiberRoutes:
    """
    Runs Klein route handlers in fibers of an :class:`EngineService`.

    :param service: the EngineService whose fibers and Sessions serve.
    :param app: the Klein app that :meth:`route` adds routes to (optional
        when only :meth:`handler` is used).
    :param retry_after: seconds sent in ``Retry-After`` with a 503.
    :param on_response: called as ``on_response(name, status, seconds)``
        after each request (for metrics); ``status`` is 499 when the client
        went away first.
    :param summary_interval: seconds over which repeated expected failures
        (database unavailable, pool exhausted, ...) of a route are logged as
        one line with a count.
    """

    def __init__(
        self,
        service: EngineService,
        app: Any = None,
        retry_after: int = 1,
        on_response: Optional[Callable[[str, int, float], None]] = None,
        summary_interval: float = 10.0,
    ) -> None:
        self.service = service
        self.app = app
        self.retry_after = retry_after
        self.on_response = on_response
        self._summary = LogSummary(summary_interval)

    def route(
        self,
        url: str,
        *args: Any,
        session: bool = True,
        shield: bool = False,
        concurrency: Optional[int] = None,
        concurrency_timeout: float = 5.0,
        read_only: bool = False,
        **kwargs: Any,
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """
        ``@app.route(url, *args, **kwargs)`` and :meth:`handler` in one
        decorator.
        """
        if self.app is None:
            raise TypeError(
                "FiberRoutes.route() needs the Klein app: FiberRoutes(service, app)"
            )

        def decorate(f: Callable[..., Any]) -> Callable[..., Any]:
            wrapped = self.handler(
                session=session,
                shield=shield,
                concurrency=concurrency,
                concurrency_timeout=concurrency_timeout,
                read_only=read_only,
            )(f)
            self.app.route(url, *args, **kwargs)(wrapped)
            return wrapped

        return decorate

    def handler(
        self,
        session: bool = True,
        shield: bool = False,
        concurrency: Optional[int] = None,
        concurrency_timeout: float = 5.0,
        read_only: bool = False,
    ) -> Callable[[Callable[..., Any]], Callable[..., Deferred[Any]]]:
        """
        Decorate a Klein route handler (under ``@app.route``) to run in a
        fiber.  With ``session``, a Session is passed right after the request
        and committed when the handler returns.  With ``shield``, the
        handler's work is finished even if the client goes away (its answer
        is then dropped).  With ``concurrency``, at most that many requests
        of this route run at once; the others wait up to
        ``concurrency_timeout`` seconds for a turn (holding no connection),
        then get a 503 (:exc:`RouteBusy`).  With ``read_only``, the Session
        reads on a replica of the service's (``EngineService(replicas=...)``;
        the primary when there is none or none answers) until it writes:
        then it reads and writes on the primary.
        """
        if concurrency is not None and concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, not {concurrency}")
        if concurrency_timeout <= 0:
            raise ValueError("concurrency_timeout must be positive")

        def decorate(f: Callable[..., Any]) -> Callable[..., Deferred[Any]]:
            name = f.__name__
            limit = (
                (DeferredSemaphore(concurrency), concurrency_timeout)
                if concurrency is not None
                else None
            )

            @functools.wraps(f)
            def wrapper(*args: Any, **kwargs: Any) -> Deferred[Any]:
                index, request = _find_request(args)
                if session:
                    args = args[: index + 1] + (None,) + args[index + 1 :]
                started = time.monotonic()
                gone: list[bool] = []
                request.notifyFinish().addBoth(lambda _: gone.append(True))
                try:
                    d = self.service.run(
                        self._call,
                        f,
                        index + 1 if session else None,
                        (shield, read_only),
                        limit,
                        args,
                        kwargs,
                    )
                except ServiceStopping as e:
                    d = fail(e)
                d.addCallbacks(
                    self._respond,
                    self._fail,
                    callbackArgs=(request, name, started, gone),
                    errbackArgs=(request, name, started, gone),
                )
                return d

            return wrapper

        return decorate

    def _call(
        self,
        f: Callable[..., Any],
        session_index: Optional[int],
        shielded: tuple[bool, bool],
        limit: Optional[tuple[DeferredSemaphore, float]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        if limit is None:
            return self._call_handler(f, session_index, shielded, args, kwargs)
        semaphore, timeout = limit
        try:
            await_deferred(semaphore.acquire(), timeout=timeout)
        except WaitTimeout:
            raise RouteBusy(
                "too many requests for this route at once, try again later"
            ) from None
        try:
            return self._call_handler(f, session_index, shielded, args, kwargs)
        finally:
            semaphore.release()

    def _call_handler(
        self,
        f: Callable[..., Any],
        session_index: Optional[int],
        options: tuple[bool, bool],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        shielded, read_only = options
        with shield_block() if shielded else nullcontext():
            if session_index is None:
                return f(*args, **kwargs)
            maker = (
                self.service.read_sessionmaker
                if read_only and self.service.read_sessionmaker is not None
                else self.service.sessionmaker
            )
            assert maker is not None
            session = maker()
            args = args[:session_index] + (session,) + args[session_index + 1 :]
            try:
                result = f(*args, **kwargs)
                with shield_block():
                    session.commit()
                return result
            except BaseException:
                with shield_block():
                    session.rollback()
                raise
            finally:
                with shield_block():
                    session.close()

    def _observe(self, name: str, code: int, started: float) -> None:
        if self.on_response is not None:
            try:
                self.on_response(name, code, time.monotonic() - started)
            except Exception:
                _log.failure("on_response hook failed")

    def _respond(
        self, result: Any, request: Any, name: str, started: float, gone: list[bool]
    ) -> Any:
        if gone:
            # A shielded handler finished after its client went away.
            self._observe(name, 499, started)
            return None
        try:
            if isinstance(result, (dict, list)):
                request.setHeader(b"content-type", b"application/json")
                result = json.dumps(result, default=_json_default).encode("utf-8")
            elif isinstance(result, str):
                result = result.encode("utf-8")
            elif result is None:
                result = b""
        except Exception:
            return self._fail(Failure(), request, name, started, gone)
        self._observe(name, request.code, started)
        return result

    def _fail(
        self,
        failure: Failure,
        request: Any,
        name: str,
        started: float,
        gone: list[bool],
    ) -> Any:
        if gone:
            # The client went away: nobody to answer.  The fiber has cleaned
            # up (or, shielded, finishes) its query and connection.
            self._observe(name, 499, started)
            if not failure.check(CancelledError):
                self._map_error(failure, request, name)  # logs what must be
            return None
        if failure.check(CancelledError):
            # Cancelled with the client still there: the service is
            # shutting down and its grace period is over.
            failure = Failure(
                ServiceStopping("cancelled: the service is shutting down")
            )
        code, body = self._map_error(failure, request, name)
        request.setResponseCode(code)
        request.setHeader(b"content-type", b"application/json")
        self._observe(name, code, started)
        return json.dumps(body).encode("utf-8")

    def _busy(
        self, request: Any, name: str, kind: str, message: str, why: str
    ) -> tuple[int, Any]:
        """A 503 with Retry-After, logged as one summarised line."""
        self._summary.warn(kind, name, f"{why}; answered 503")
        request.setHeader(b"retry-after", str(self.retry_after).encode())
        return 503, {"error": message}

    def _map_error(self, failure: Failure, request: Any, name: str) -> tuple[int, Any]:
        error = failure.value
        if isinstance(error, RouteBusy):
            return self._busy(
                request,
                name,
                "route-busy",
                error.message,
                "route at its concurrency limit",
            )
        if isinstance(error, HTTPError):
            return error.code, error.to_json()
        try:
            from werkzeug.exceptions import HTTPException
        except ImportError:  # pragma: no cover
            HTTPException = ()  # type: ignore[assignment,misc]
        if isinstance(error, HTTPException):
            return error.code or 500, {"error": error.description}
        if isinstance(error, sa_exc.TimeoutError):
            return self._busy(
                request,
                name,
                "pool-exhausted",
                "service busy (no database connection free), try again later",
                "no database connection free within pool_timeout",
            )
        if isinstance(error, ServiceStopping):
            return self._busy(
                request,
                name,
                "stopping",
                "service shutting down, try again later",
                "service shutting down",
            )
        if isinstance(error, sa_exc.NoResultFound):
            return 404, {"error": "not found"}
        if isinstance(error, sa_exc.IntegrityError):
            return 409, {"error": "conflicts with existing data"}
        if isinstance(error, sa_exc.DataError):
            return 400, {"error": "invalid data"}
        if _database_unavailable(error):
            return self._busy(
                request,
                name,
                "database",
                "database unavailable, try again later",
                f"database unavailable: {first_line(error)}",
            )
        error_id = uuid.uuid4().hex[:16]
        _log.failure(
            "error {error_id} in {route} ({method} {uri})",
            failure,
            error_id=error_id,
            route=name,
            method=request.method.decode("ascii", "replace"),
            uri=request.uri.decode("ascii", "replace"),
        )
        return 500, {"error": "internal server error", "error_id": error_id}


class ClientStalled(Exception):
    """
    An :class:`EventStream`'s client read nothing for ``stall_timeout``
    seconds while events waited to be sent: the stream was dropped.
    """


_LINE_BREAK = re.compile(r"\r\n|\r|\n")


@implementer(IPushProducer)
class EventStream:
    """
    A Server-Sent Events (``text/event-stream``) answer, written from a
    fiber as events come, in a FiberRoutes handler (``session=False``: hold
    no connection while parked)::

        @routes.route("/events", session=False)
        def events(request):
            with listen(db, "news") as notes, EventStream(request) as stream:
                for note in notes:
                    stream.send(note.payload, event=note.channel)

    The handler runs until the client leaves (Klein cancels its fiber:
    ``CancelledError`` at its wait, the ``with`` blocks end cleanly) or it
    returns.  :attr:`last_event_id` is the browser's ``Last-Event-ID`` on a
    reconnection (``None`` on a first connection).

    Back-pressure: the stream is the request's push producer.  When the
    client reads slower than events come, :meth:`send` parks the fiber
    until the transport's buffer drains (events then wait where the
    producer keeps them, e.g. a subscription's bounded queue), and after
    ``stall_timeout`` seconds drops the connection and raises
    :exc:`ClientStalled`.  A server's memory cannot be held by a client
    that stopped reading.

    Heartbeat: every ``heartbeat`` seconds (15) a comment line goes to each
    open stream, so that proxies and load balancers do not close an idle
    one.  One timer per process serves all the streams (not a timer per
    stream re-armed at each event); it runs only while streams are open.

    :param retry: milliseconds the browser waits before reconnecting (sent
        as ``retry:``); the browser's default (about 3 s) when ``None``.
    """

    #: The longest ``Last-Event-ID`` taken (longer ones are ignored).
    MAX_ID_LENGTH = 256

    __slots__ = (
        "request",
        "heartbeat",
        "stall_timeout",
        "paused",
        "closed",
        "sent",
        "last_event_id",
        "_resumed",
    )

    def __init__(
        self,
        request: Any,
        retry: Optional[int] = None,
        heartbeat: Optional[float] = 15.0,
        stall_timeout: float = 60.0,
    ) -> None:
        if retry is not None and (not isinstance(retry, int) or retry < 0):
            raise ValueError(f"retry must be a non-negative int, not {retry!r}")
        if heartbeat is not None and heartbeat <= 0:
            raise ValueError("heartbeat must be positive (or None for none)")
        self.request = request
        self.heartbeat = heartbeat
        self.stall_timeout = stall_timeout
        self.paused = False
        self.closed = False
        self.sent = 0
        self._resumed: Optional[Deferred[None]] = None
        self.last_event_id = self.last_event_id_of(request)
        request.setResponseCode(200)
        request.setHeader(b"content-type", b"text/event-stream; charset=utf-8")
        request.setHeader(b"cache-control", b"no-cache, no-store")
        request.setHeader(b"x-accel-buffering", b"no")  # nginx: do not buffer
        request.registerProducer(self, True)
        # Sends the headers now: the browser's EventSource opens.
        opening = f"retry: {retry}\n\n" if retry is not None else ": open\n\n"
        request.write(opening.encode("ascii"))
        if heartbeat is not None:
            _Heartbeat.join(self, heartbeat)

    @classmethod
    def last_event_id_of(cls, request: Any) -> Optional[str]:
        """
        The request's ``Last-Event-ID`` (``None`` if absent, not UTF-8, too
        long or holding a NUL: such a value cannot be one we sent).
        """
        raw = request.getHeader(b"last-event-id")
        if not raw or len(raw) > cls.MAX_ID_LENGTH:
            return None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            return None
        return None if "\x00" in text else text

    # -- writing -----------------------------------------------------------

    @staticmethod
    def frame(
        data: str, event: Optional[str] = None, id: Optional[str] = None
    ) -> bytes:
        """
        One event in the wire format: ``event:`` and ``id:`` lines, then one
        ``data:`` line per line of ``data``, then a blank line.

        :raise ValueError: ``event`` or ``id`` holds a line break (or ``id``
            a NUL), which would break the framing.
        """
        lines = []
        if event is not None:
            if _LINE_BREAK.search(event):
                raise ValueError("an SSE event name must not contain line breaks")
            lines.append(f"event: {event}")
        if id is not None:
            if _LINE_BREAK.search(id) or "\x00" in id:
                raise ValueError("an SSE id must not contain line breaks or NUL")
            lines.append(f"id: {id}")
        lines.extend(f"data: {line}" for line in _LINE_BREAK.split(data))
        return ("\n".join(lines) + "\n\n").encode("utf-8")

    def send(
        self, data: str, event: Optional[str] = None, id: Optional[str] = None
    ) -> None:
        """Send one event (see :meth:`frame`); parks while the client lags."""
        self._write(self.frame(data, event, id))

    def comment(self, text: str = "") -> None:
        """A comment line (``: text``): a heartbeat that keeps proxies open."""
        body = "".join(f": {line}\n" for line in _LINE_BREAK.split(text))
        self._write((body + "\n").encode("utf-8"))

    def beat(self) -> None:
        """
        Write a heartbeat comment now, unless the client lags (then it has
        data to read anyway).  Never waits: the shared timer calls it.
        """
        if not self.closed and not self.paused:
            self.request.write(b": keep-alive\n\n")

    def _write(self, chunk: bytes) -> None:
        if self.closed:
            raise ClientStalled("the event stream is closed")
        if self.paused:
            d: Deferred[None] = Deferred()
            self._resumed = d
            try:
                await_deferred(d, timeout=self.stall_timeout)
            except WaitTimeout:
                self._resumed = None
                _log.info(
                    "event stream client read nothing for {s} s: dropped",
                    s=self.stall_timeout,
                )
                self.close()
                transport = getattr(self.request, "transport", None)
                if transport is not None:
                    transport.abortConnection()
                raise ClientStalled(
                    f"client read nothing for {self.stall_timeout:g} s"
                ) from None
        self.sent += 1
        self.request.write(chunk)

    # -- IPushProducer: the transport tells us when its buffer is full ------

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        d, self._resumed = self._resumed, None
        if d is not None and not d.called:
            d.callback(None)

    def stopProducing(self) -> None:
        # The connection is going away; the handler is cancelled by Klein.
        self.paused = True

    # -- life cycle ----------------------------------------------------------

    def close(self) -> None:
        """Unregister from the request (before it finishes).  Idempotent."""
        if self.closed:
            return
        self.closed = True
        if self.heartbeat is not None:
            _Heartbeat.leave(self, self.heartbeat)
        request = self.request
        if getattr(request, "producer", None) is self:
            if request.channel is not None:
                request.unregisterProducer()
            else:  # the connection is gone already
                request.producer = None

    def __enter__(self) -> EventStream:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _Heartbeat:
    """One timer per heartbeat interval for all the open event streams."""

    tickers: dict[float, _Heartbeat] = {}

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.streams: set[EventStream] = set()
        self.call: Any = None

    @classmethod
    def join(cls, stream: EventStream, interval: float) -> None:
        ticker = cls.tickers.get(interval)
        if ticker is None:
            ticker = cls.tickers[interval] = cls(interval)
        ticker.streams.add(stream)
        if ticker.call is None:
            ticker.schedule()

    @classmethod
    def leave(cls, stream: EventStream, interval: float) -> None:
        ticker = cls.tickers.get(interval)
        if ticker is None:
            return
        ticker.streams.discard(stream)
        if not ticker.streams:
            del cls.tickers[interval]
            if ticker.call is not None and ticker.call.active():
                ticker.call.cancel()
            ticker.call = None

    def schedule(self) -> None:
        from twisted.internet import reactor as _reactor

        reactor: Any = _reactor
        self.call = reactor.callLater(self.interval, self.tick)

    def tick(self) -> None:
        self.call = None
        for stream in list(self.streams):
            try:
                stream.beat()
            except Exception:
                _log.failure("event stream heartbeat failed")
        if self.streams and _Heartbeat.tickers.get(self.interval) is self:
            self.schedule()
