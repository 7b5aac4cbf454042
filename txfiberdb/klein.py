# -*- test-case-name: tests.test_klein -*-
"""
Klein glue: run a route in a fiber, with a Session per request.

>>> app = Klein()                                          # doctest: +SKIP
>>> db = EngineService("postgresql+txpostgres://...")      # doctest: +SKIP
>>> routes = FiberRoutes(db)                               # doctest: +SKIP
>>> @app.route("/products/<int:product_id>")               # doctest: +SKIP
... @routes.handler()
... def get_product(request, session, product_id):
...     product = session.get(Product, product_id)
...     if product is None:
...         raise NotFound(f"no product {product_id}")
...     return {"id": product.id, "name": product.name}

The handler is ordinary synchronous SQLAlchemy code.  Its Session commits
when it returns and rolls back when it raises.  A dict or list is sent as
JSON; ``bytes``/``str`` as they are.  Errors become HTTP answers that leak
nothing: :class:`HTTPError` and its subclasses (and werkzeug's HTTP
exceptions) their own code and message; an exhausted pool 503 with
``Retry-After``; a conflict with existing data (IntegrityError) 409; invalid
data (DataError) 400; anything else 500 with an id that is also in the log,
with the traceback.  When the client goes away, Klein cancels the route's
Deferred: the fiber gets ``CancelledError`` where it waits, its query is
cancelled on the server and its connection goes back to the pool; a handler
declared with ``shield=True`` finishes its work instead.
"""

from __future__ import annotations

import datetime
import decimal
import functools
import json
import time
import uuid
from contextlib import nullcontext
from typing import Any, Callable, Optional

from sqlalchemy import exc as sa_exc
from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest

from txfiberdb.fiber import shield as shield_block
from txfiberdb.service import EngineService, ServiceStopping

__all__ = [
    "BadRequest",
    "Conflict",
    "FiberRoutes",
    "HTTPError",
    "NotFound",
    "PayloadTooLarge",
    "read_json",
]

_log = Logger(namespace="txfiberdb.klein")


class HTTPError(Exception):
    """An error with an HTTP status; its message is shown to the client."""

    code = 500

    def __init__(self, message: str, code: Optional[int] = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class BadRequest(HTTPError):
    code = 400


class NotFound(HTTPError):
    code = 404


class Conflict(HTTPError):
    code = 409


class PayloadTooLarge(HTTPError):
    code = 413


def read_json(request: Any, max_bytes: int = 64 * 1024) -> Any:
    """
    The request body parsed as JSON.

    :raise PayloadTooLarge: the body is over ``max_bytes``.
    :raise BadRequest: it is not JSON (or not UTF-8).
    """
    body = request.content.read(max_bytes + 1)
    if len(body) > max_bytes:
        raise PayloadTooLarge(f"request body over {max_bytes} bytes")
    try:
        return json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
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

    :param retry_after: seconds sent in ``Retry-After`` with a 503.
    :param on_response: called as ``on_response(name, status, seconds)``
        after each request (for metrics).
    """

    def __init__(
        self,
        service: EngineService,
        retry_after: int = 1,
        on_response: Optional[Callable[[str, int, float], None]] = None,
    ) -> None:
        self.service = service
        self.retry_after = retry_after
        self.on_response = on_response

    def handler(
        self, session: bool = True, shield: bool = False
    ) -> Callable[[Callable[..., Any]], Callable[..., Deferred[Any]]]:
        """
        Decorate a Klein route handler (under ``@app.route``) to run in a
        fiber.  With ``session``, a Session is passed right after the request
        and committed when the handler returns.  With ``shield``, the
        handler's work is finished even if the client goes away.
        """

        def decorate(f: Callable[..., Any]) -> Callable[..., Deferred[Any]]:
            name = f.__name__

            @functools.wraps(f)
            def wrapper(*args: Any, **kwargs: Any) -> Deferred[Any]:
                index, request = _find_request(args)
                if session:
                    args = args[: index + 1] + (None,) + args[index + 1 :]
                started = time.monotonic()
                try:
                    d = self.service.run(
                        self._call, f, index + 1 if session else None, shield, args, kwargs
                    )
                except ServiceStopping as e:
                    d = fail(e)
                d.addCallbacks(
                    self._respond,
                    self._fail,
                    callbackArgs=(request, name, started),
                    errbackArgs=(request, name, started),
                )
                return d

            return wrapper

        return decorate

    def _call(
        self,
        f: Callable[..., Any],
        session_index: Optional[int],
        shielded: bool,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        with shield_block() if shielded else nullcontext():
            if session_index is None:
                return f(*args, **kwargs)
            assert self.service.sessionmaker is not None
            session = self.service.sessionmaker()
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

    def _finish(self, request: Any, name: str, started: float, code: int, body: Any) -> bytes:
        if isinstance(body, (dict, list)):
            request.setHeader(b"content-type", b"application/json")
            body = json.dumps(body, default=_json_default).encode("utf-8")
        elif isinstance(body, str):
            body = body.encode("utf-8")
        if self.on_response is not None:
            self.on_response(name, code, time.monotonic() - started)
        return body  # type: ignore[no-any-return]

    def _respond(self, result: Any, request: Any, name: str, started: float) -> Any:
        if isinstance(result, (dict, list, str)):
            return self._finish(request, name, started, request.code, result)
        if self.on_response is not None:
            self.on_response(name, request.code, time.monotonic() - started)
        return result

    def _fail(self, failure: Failure, request: Any, name: str, started: float) -> Any:
        if failure.check(CancelledError):
            # The client went away (or shutdown cancelled us): nobody to
            # answer; the fiber has cleaned up its query and connection.
            if self.on_response is not None:
                self.on_response(name, 499, time.monotonic() - started)
            return None
        code, body = self._map_error(failure, request, name)
        request.setResponseCode(code)
        return self._finish(request, name, started, code, body)

    def _map_error(self, failure: Failure, request: Any, name: str) -> tuple[int, Any]:
        error = failure.value
        if isinstance(error, HTTPError):
            return error.code, {"error": error.message}
        try:
            from werkzeug.exceptions import HTTPException
        except ImportError:  # pragma: no cover
            HTTPException = ()  # type: ignore[assignment,misc]
        if isinstance(error, HTTPException):  # type: ignore[arg-type]
            return error.code or 500, {"error": error.description}  # type: ignore[attr-defined]
        if isinstance(error, (sa_exc.TimeoutError, ServiceStopping)):
            request.setHeader(b"retry-after", str(self.retry_after).encode())
            return 503, {"error": "service busy, try again later"}
        if isinstance(error, sa_exc.IntegrityError):
            return 409, {"error": "conflicts with existing data"}
        if isinstance(error, sa_exc.DataError):
            return 400, {"error": "invalid data"}
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
