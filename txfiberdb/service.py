# -*- test-case-name: tests.test_service -*-
"""
A Twisted service that owns a SQLAlchemy Engine and the fibers that use it.

>>> db = EngineService("postgresql+txpostgres://app@db/shop", pool_size=20)
>>> db.setServiceParent(application)                       # doctest: +SKIP
>>> d = db.run(lambda: Base.metadata.create_all(db.engine))  # doctest: +SKIP

Life cycle:

- :meth:`EngineService.startService` creates the Engine (and its pool).
  Nothing connects before: ``twistd`` forks and drops privileges after
  ``makeService``, and a connection opened before the fork would be shared by
  two processes.  Connections are opened on first use, in a fiber.
- :meth:`EngineService.run` runs a unit of work in a fiber and keeps track of
  it until the fiber has really ended (its clean-up included).
- :meth:`EngineService.stopService` takes no new work (:meth:`run` raises
  :exc:`ServiceStopping`), lets the units of work in flight finish within
  ``grace_period`` seconds, cancels those still running after it (a running
  query is cancelled on the server, its connection rolled back and returned),
  waits up to ``cancel_grace`` more seconds for them to end (shielded work
  finishes what it is doing), then disposes of the pool.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Optional, ParamSpec, TypeVar

from sqlalchemy import create_engine
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker
from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from txfiberdb.fiber import on_fiber_exit, run_in_fiber
from txfiberdb.notify import close_listener
from txfiberdb.replicas import ReplicaRouter, RoutingSession

__all__ = ["EngineService", "ServiceStopping"]

_T = TypeVar("_T")
_P = ParamSpec("_P")


def _reactor() -> Any:
    from twisted.internet import reactor

    return reactor


def _fire_all(waiters: list[Deferred[None]]) -> None:
    for w in waiters:
        w.callback(None)


class ServiceStopping(RuntimeError):
    """The service is not running (shutting down, or not started): no new work."""


class EngineService(Service):
    """
    Owns an Engine: creates it in :meth:`startService`, runs units of work in
    fibers with :meth:`run`, and in :meth:`stopService` stops taking work,
    drains the fibers in flight and disposes of the pool.

    :param url: a ``postgresql+txpostgres://`` URL.  It may be set (or
        changed) on the instance until :meth:`startService` runs, for an
        application that learns it late (a throwaway server started then).
    :param grace_period: seconds the work in flight may take to finish when
        the service stops, before it is cancelled.
    :param cancel_grace: seconds to wait for cancelled work to end before the
        pool is disposed anyway (and an error logged).
    :param session_factory: called with the Engine to make
        :attr:`sessionmaker` (default: :class:`sqlalchemy.orm.sessionmaker`).
    :param engine_kwargs: passed to :func:`sqlalchemy.create_engine`
        (``pool_size``, ``max_overflow``, ``pool_timeout``, ``echo``, ...).
        ``hide_parameters`` defaults to True here: SQL parameters (names,
        emails, ...) never reach the log through SQLAlchemy's error messages
        or ``echo``; pass ``hide_parameters=False`` to see them while
        debugging.

    .. attribute:: engine

        The Engine, from :meth:`startService` on (``None`` before).

    .. attribute:: sessionmaker

        A ``sessionmaker`` bound to :attr:`engine`.

    :param replicas: URLs of streaming replicas of the database.
        :attr:`read_sessionmaker` makes Sessions that read on them (and
        write, then read, on the primary); with no replicas, or none that
        answers, they use the primary (:mod:`txfiberdb.replicas`).
    :param replica_retry: seconds an unreachable replica is left aside.

    .. attribute:: read_sessionmaker

        A ``sessionmaker`` of :class:`~txfiberdb.replicas.RoutingSession`
        with ``read_only=True``; :attr:`router` counts where reads went.
    """

    log = Logger()

    def __init__(
        self,
        url: str,
        grace_period: float = 30.0,
        session_factory: Optional[Callable[..., sessionmaker[Session]]] = None,
        cancel_grace: float = 10.0,
        replicas: Sequence[str] = (),
        replica_retry: float = 5.0,
        **engine_kwargs: Any,
    ) -> None:
        self.url = url
        self.replicas = list(replicas)
        self.replica_retry = replica_retry
        self.router: Optional[ReplicaRouter] = None
        self.read_sessionmaker: Optional[sessionmaker[Session]] = None
        self.grace_period = grace_period
        self.cancel_grace = cancel_grace
        engine_kwargs.setdefault("hide_parameters", True)
        self.engine_kwargs = engine_kwargs
        self.engine: Optional[Engine] = None
        self.sessionmaker: Optional[sessionmaker[Session]] = None
        self._session_factory = session_factory or sessionmaker
        # The Deferred of each running unit of work (cancellable), until its
        # fiber has ended.
        self._inflight: dict[object, Deferred[Any]] = {}
        self._idle_waiters: list[Deferred[None]] = []
        self.accepting = False

    def startService(self) -> None:
        self.engine = create_engine(self.url, **self.engine_kwargs)
        self.sessionmaker = self._session_factory(self.engine)
        self.router = ReplicaRouter(
            self.engine,
            [create_engine(u, **self.engine_kwargs) for u in self.replicas],
            retry_interval=self.replica_retry,
        )
        self.read_sessionmaker = sessionmaker(
            class_=RoutingSession, router=self.router, read_only=True
        )
        self.accepting = True
        super().startService()  # type: ignore[no-untyped-call]
        self.log.info(
            "database engine started for {url}",
            url=self.engine.url.render_as_string(hide_password=True),
        )

    @property
    def inflight(self) -> int:
        """Units of work running now."""
        return len(self._inflight)

    @property
    def stopping(self) -> bool:
        """Whether :meth:`stopService` has begun and not finished."""
        return self._stopping is not None

    _stopping: Optional[Deferred[None]] = None

    def run(
        self, f: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs
    ) -> Deferred[_T]:
        """
        Run ``f(*args, **kwargs)`` in a fiber, tracked so that shutdown waits
        for it (until the fiber has really ended, clean-up included, even
        when its Deferred was cancelled).  Cancelling the returned Deferred
        cancels the fiber where it waits.

        :raise ServiceStopping: the service is not running (stopping, or not
            started).
        """
        if not self.accepting:
            raise ServiceStopping(
                "the database service is not running (stopping or not started)"
            )
        key = object()
        started = []

        def body() -> _T:
            started.append(True)
            # Late, and registered first, so it runs last: after the
            # application's clean-up and after the pool has taken back what
            # the fiber forgot.
            on_fiber_exit(lambda: self._ended(key), late=True)
            return f(*args, **kwargs)

        def never_started(result: Any) -> Any:
            # Cancelled before its first turn (run() called from a fiber
            # starts it on the next one): the fiber never runs, so its exit
            # callback never will either.
            if not started:
                self._ended(key)
            return result

        d = run_in_fiber(body)
        if key is not self._last_ended:  # (not over already)
            self._inflight[key] = d
        d.addBoth(never_started)
        return d

    _last_ended: object = None

    def _ended(self, key: object) -> None:
        # Runs in the ending fiber.  A fiber that ends before run_in_fiber
        # returns (it never waited) is remembered so that run() does not
        # count it.
        if self._inflight.pop(key, None) is None:
            self._last_ended = key
        if not self._inflight and self._idle_waiters:
            # Fired on the hub, not in this fiber: stopService's Deferred
            # (and with it the reactor's shutdown) must not run in a fiber.
            waiters, self._idle_waiters = self._idle_waiters, []
            _reactor().callLater(0, _fire_all, waiters)

    def _idle(self) -> Deferred[None]:
        """A Deferred that fires once no unit of work is running."""
        if not self._inflight:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._idle_waiters.append(d)
        return d

    def stopService(self) -> Deferred[None]:
        """
        Stop taking work, wait for the work in flight (cancelling what is
        still running after ``grace_period``), dispose of the pool.  The
        Deferred fires one reactor turn after that, so that responses the
        last units of work wrote reach their sockets before the reactor
        shuts down.
        """
        if self._stopping is not None:
            return self._stopping
        super().stopService()  # type: ignore[no-untyped-call]
        self.accepting = False
        if self.engine is not None:
            # Fibers parked on notifications would wait for ever: end them
            # now, so that they do not hold up the drain.
            close_listener(self.engine)
        reactor = _reactor()
        timers: list[Any] = []
        if self._inflight:
            self.log.info(
                "waiting up to {grace}s for {n} unit(s) of work to finish",
                grace=self.grace_period,
                n=len(self._inflight),
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
                timers.append(reactor.callLater(self.cancel_grace, give_up))

            def give_up() -> None:
                self.log.error(
                    "{n} unit(s) of work did not end within {grace}s of being "
                    "cancelled; disposing of the pool anyway",
                    n=len(self._inflight),
                    grace=self.cancel_grace,
                )
                waiters, self._idle_waiters = self._idle_waiters, []
                _fire_all(waiters)

            timers.append(reactor.callLater(self.grace_period, overdue))

        def drained(_: Any) -> Deferred[None]:
            for t in timers:
                if t.active():
                    t.cancel()
            self._dispose()
            d: Deferred[None] = Deferred()
            reactor.callLater(0, d.callback, None)
            return d

        def stopped(result: Any) -> Any:
            self._stopping = None
            return result

        # drained() always returns a Deferred that fires on a later turn, so
        # stopped() cannot run before _stopping is set.
        self._stopping = self._idle().addCallback(drained).addBoth(stopped)
        return self._stopping

    def _dispose(self) -> None:
        if self.router is not None:
            self.router.dispose()
        if self.engine is not None:
            self.engine.dispose()
            self.log.info("database engine disposed")
