# -*- test-case-name: tests.test_replicas -*-
"""
Reads on streaming replicas, through SQLAlchemy's own mechanism: a Session
whose :meth:`~sqlalchemy.orm.Session.get_bind` picks the engine.

:class:`ReplicaRouter` holds the primary's engine and one engine per
replica; :class:`RoutingSession` asks it where each statement goes:

- a Session made for reading (``read_only=True``) sends its SELECTs to a
  replica (round robin over those that answer);
- anything that writes (a flush, an INSERT/UPDATE/DELETE, a statement that
  is not a SELECT) goes to the primary, and from then on *every* statement
  of that Session does: a unit of work that wrote reads its own writes;
- a Session made with ``read_only=False`` (the default) uses the primary
  only, as a plain Session would.

A replica that cannot be reached (its connection fails at checkout) is set
aside for ``retry_interval`` seconds and the read goes to the next one, or to
the primary; :attr:`ReplicaRouter.stats` counts reads by destination
(``fallback`` counts reads that wanted a replica and got the primary), and
one line is logged when a replica goes away and when it comes back.  A
query that fails *during* its run on a replica (the replica stopped
mid-query) fails like any query on a lost connection; the next Session
routes around it.

Replication is asynchronous: a replica may lag the primary by a little.
Reads that must see a write committed by an *earlier* request belong on the
primary (a Session with ``read_only=False``).

Plain engine users::

    router = ReplicaRouter(create_engine(primary_url), [create_engine(replica_url)])
    Reading = sessionmaker(class_=RoutingSession, router=router, read_only=True)
    with Reading() as session:
        session.scalars(select(Product)).all()      # on the replica

With :class:`~txfiberdb.service.EngineService`, pass ``replicas=[url, ...]``
and use :attr:`~txfiberdb.service.EngineService.read_sessionmaker`;
:class:`~txfiberdb.klein.FiberRoutes` routes declared ``read_only=True`` get
such a Session.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from typing import Any, Optional

from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session
from sqlalchemy.sql import Select
from sqlalchemy.sql.elements import TextClause
from twisted.logger import Logger

from txfiberdb._errors import first_line

__all__ = ["ReplicaRouter", "RoutingSession"]

log = Logger(namespace="txfiberdb.replicas")


def _free_now(pool: Any) -> bool:
    """
    Whether ``pool`` can hand out a connection without waiting (an idle one,
    or room to open one); pools that cannot say are assumed free.
    """
    checkedin = getattr(pool, "checkedin", None)
    overflow = getattr(pool, "overflow", None)
    max_overflow = getattr(pool, "_max_overflow", None)
    if checkedin is None or overflow is None or max_overflow is None:
        return True
    return bool(checkedin() > 0 or max_overflow < 0 or overflow() < max_overflow)


class ReplicaRouter:
    """
    The primary's engine, the replicas' engines, and which replicas answer.

    :param retry_interval: seconds a replica whose connection failed is left
        aside before it is tried again.
    """

    def __init__(
        self,
        primary: Engine,
        replicas: Sequence[Engine] = (),
        retry_interval: float = 5.0,
        clock: Any = time.monotonic,
    ) -> None:
        self.primary = primary
        self.replicas = list(replicas)
        self.retry_interval = retry_interval
        self._clock = clock
        self._down_until: dict[int, float] = {}
        self._turn = itertools.count()
        self.stats = {"primary": 0, "replica": 0, "fallback": 0}

    def replicas_down(self) -> int:
        """Replicas set aside now (their last connection attempt failed)."""
        now = self._clock()
        return sum(1 for until in self._down_until.values() if until > now)

    def _name(self, engine: Engine) -> str:
        return engine.url.render_as_string(hide_password=True)

    def for_read(self) -> Engine:
        """
        A replica that answers (a connection checked out and returned: from
        the pool when one is idle, else a new one), else the primary.  In a
        fiber: it may connect.
        """
        n = len(self.replicas)
        if not n:
            self.stats["primary"] += 1
            return self.primary
        start = next(self._turn)
        now = self._clock()
        for i in range(n):
            index = (start + i) % n
            until = self._down_until.get(index)
            if until is not None and until > now:
                continue
            engine = self.replicas[index]
            if not _free_now(engine.pool):
                continue  # busy, not down: the probe would wait pool_timeout
            try:
                engine.pool.connect().close()
            except sa_exc.TimeoutError:
                continue  # busy after all (taken meanwhile): not down either
            except (sa_exc.DBAPIError, engine.dialect.loaded_dbapi.Error, OSError) as e:
                if until is None:
                    log.warn(
                        "replica {url} unreachable, reads go elsewhere for {s}s: {why}",
                        url=self._name(engine),
                        s=self.retry_interval,
                        why=first_line(e),
                    )
                self._down_until[index] = self._clock() + self.retry_interval
                continue
            if until is not None:
                del self._down_until[index]
                log.info("replica {url} answers again", url=self._name(engine))
            self.stats["replica"] += 1
            return engine
        self.stats["fallback"] += 1
        return self.primary

    def dispose(self) -> None:
        """Dispose of the replicas' pools (the primary's is its owner's)."""
        for engine in self.replicas:
            engine.dispose()


def _reads(clause: Any) -> bool:
    """Whether ``clause`` only reads (and may run on a replica)."""
    if isinstance(clause, Select):
        # SELECT ... FOR UPDATE/SHARE locks rows: the primary's business.
        return clause._for_update_arg is None
    if isinstance(clause, TextClause):
        sql = clause.text.lstrip()
        words = sql.split(None, 1)
        if not words or words[0].upper() not in ("SELECT", "WITH", "SHOW", "VALUES"):
            return False
        # A text WITH may hold a data-modifying CTE; FOR UPDATE/SHARE lock.
        upper = sql.upper()
        return not any(
            word in upper
            for word in (
                " FOR UPDATE",
                " FOR SHARE",
                " FOR NO KEY",
                " FOR KEY",
                "INSERT ",
                "UPDATE ",
                "DELETE ",
            )
        )
    return False


class RoutingSession(Session):
    """
    A Session that sends reads to a replica when made with
    ``read_only=True``, and everything to the primary once it has written
    (or when made with ``read_only=False``).
    """

    def __init__(
        self,
        *args: Any,
        router: ReplicaRouter,
        read_only: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.router = router
        self.read_only = read_only
        self._reader: Optional[Engine] = None
        self.wrote = False

    def get_bind(
        self,
        mapper: Any = None,
        clause: Any = None,
        bind: Any = None,
        **kw: Any,
    ) -> Any:
        if bind is not None:
            return bind
        if self.wrote or not self.read_only:
            return self.router.primary
        if self._flushing or (clause is not None and not _reads(clause)):
            # The first write: from now on this Session reads its own writes
            # on the primary.
            self.wrote = True
            return self.router.primary
        if self._reader is None:
            # One engine for the Session's reads: one connection, one
            # snapshot-consistent transaction on it.
            self._reader = self.router.for_read()
        return self._reader

    def close(self) -> None:
        super().close()
        self._reader = None
        self.wrote = False
