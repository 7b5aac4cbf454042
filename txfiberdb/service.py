# -*- test-case-name: tests.test_service -*-
"""
A Twisted service that owns a SQLAlchemy Engine and the fibers that use it.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, TypeVar

from sqlalchemy import create_engine
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.logger import Logger

from txfiberdb.fiber import on_fiber_exit, run_in_fiber

__all__ = ["EngineService", "ServiceStopping"]

_T = TypeVar("_T")


class ServiceStopping(RuntimeError):
    """The service is shutting down and takes no new work."""


class EngineService(Service):
    """
    Owns an Engine: creates it in :meth:`startService` (twistd forks and
    drops privileges after ``makeService``, so nothing connects before), runs
    units of work in fibers with :meth:`run`, and in :meth:`stopService`
    stops taking work, lets in-flight fibers finish within ``grace_period``
    seconds (then cancels them), and disposes of the pool.

    :param url: a ``postgresql+txpostgres://`` URL.
    :param engine_kwargs: passed to :func:`sqlalchemy.create_engine`
        (``pool_size``, ``max_overflow``, ``echo``, ...).
    """

    log = Logger()

    def __init__(
        self,
        url: str,
        grace_period: float = 30.0,
        session_factory: Optional[Callable[..., sessionmaker[Session]]] = None,
        **engine_kwargs: Any,
    ) -> None:
        self.url = url
        self.grace_period = grace_period
        self.engine_kwargs = engine_kwargs
        self.engine: Optional[Engine] = None
        self.sessionmaker: Optional[sessionmaker[Session]] = None
        self._session_factory = session_factory or sessionmaker
        self._inflight: dict[Deferred[None], Deferred[Any]] = {}
        self.accepting = False

    def startService(self) -> None:
        self.engine = create_engine(self.url, **self.engine_kwargs)
        self.sessionmaker = self._session_factory(self.engine)
        self.accepting = True
        super().startService()
        self.log.info("engine started for {url}", url=self.engine.url)

    @property
    def inflight(self) -> int:
        """Units of work running now."""
        return len(self._inflight)

    def run(self, f: Callable[..., _T], *args: Any, **kwargs: Any) -> Deferred[_T]:
        """
        Run ``f(*args, **kwargs)`` in a fiber, tracked so that shutdown waits
        for it (until the fiber has really ended, clean-up included, even when
        its Deferred was cancelled).  Raises :exc:`ServiceStopping` once
        shutdown has begun.
        """
        if not self.accepting:
            raise ServiceStopping(
                "the database service is not running (stopping or not started)"
            )
        ended: Deferred[None] = Deferred()

        def body() -> _T:
            on_fiber_exit(lambda: ended.callback(None))
            return f(*args, **kwargs)

        d = run_in_fiber(body)
        if not ended.called:
            self._inflight[ended] = d
            ended.addCallback(lambda _: self._inflight.pop(ended, None))
        return d

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self.accepting = False
        pending = list(self._inflight)
        if not pending:
            self._dispose()
            return succeed(None)
        from twisted.internet import reactor

        self.log.info(
            "waiting up to {grace}s for {n} unit(s) of work to finish",
            grace=self.grace_period,
            n=len(pending),
        )

        def overdue() -> None:
            late = list(self._inflight.values())
            self.log.warn(
                "cancelling {n} unit(s) of work still running after {grace}s",
                n=len(late),
                grace=self.grace_period,
            )
            for d in late:
                d.cancel()

        timer = reactor.callLater(self.grace_period, overdue)  # type: ignore[attr-defined]

        def finished(_: Any) -> None:
            if timer.active():
                timer.cancel()
            self._dispose()

        return DeferredList(pending).addCallback(finished)

    def _dispose(self) -> None:
        if self.engine is not None:
            self.engine.dispose()
            self.log.info("engine disposed")
