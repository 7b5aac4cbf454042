# -*- test-case-name: tests.test_health -*-
"""
Readiness: whether the database answers, for a ``/health/ready`` endpoint.

Liveness and readiness are different questions (Kubernetes' probes, and
every load balancer's health check, ask them separately):

- *live*: the process serves HTTP.  Answer it without touching the
  database or the pool, so a database outage never gets the process
  restarted.
- *ready*: the process can do its work now, i.e. the database answers.
  :class:`ReadinessProbe` answers that.

>>> probe = ReadinessProbe(db)                  # an EngineService (or Engine)
>>> d = probe.check()                           # doctest: +SKIP
>>> d.addCallback(lambda r: (r.ready, r.reason))   # doctest: +SKIP

The probe:

- runs ``SELECT 1`` on a connection of its own, opened from the engine's URL
  and kept between checks: it never waits for a pool slot (an exhausted pool
  is load, not an outage) and never takes one from the requests;
- is bounded: a check that gets no answer within ``timeout`` (1 s) reports
  "not ready" and drops its connection (a server that accepts and never
  answers cannot hold it);
- is cheap under a flood of probes: the result is cached for ``cache_for``
  seconds (1 s), and checks that arrive while one runs share it, so the
  database sees at most one probe query per ``cache_for``;
- may be called from the reactor's greenlet (a Klein route that does not run
  in a fiber): :meth:`ReadinessProbe.check` returns a Deferred.

The reason given when not ready is the driver's first line (it names host
and port, never the password).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Optional

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from txfiberdb._errors import first_line
from txfiberdb.fiber import run_in_fiber

__all__ = ["ProbeResult", "ReadinessProbe"]

_log = Logger(namespace="txfiberdb.health")


@dataclass(frozen=True)
class ProbeResult:
    """The outcome of one readiness check."""

    #: Whether the database answered.
    ready: bool
    #: Why not (empty when ready): one line, no secrets.
    reason: str
    #: ``time.monotonic()`` when the check finished.
    checked_at: float
    #: Seconds the check took.
    latency: float

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict: ``status``, ``reason``, ``latency_ms``, ``age_s``."""
        body: dict[str, Any] = {
            "status": "ready" if self.ready else "unavailable",
            "latency_ms": round(self.latency * 1000, 1),
            "age_s": round(max(time.monotonic() - self.checked_at, 0.0), 3),
        }
        if not self.ready:
            body["reason"] = self.reason
        return body


class ReadinessProbe:
    """
    Checks that the database answers (see the module's documentation).

    :param target: an :class:`~txfiberdb.service.EngineService` (its engine
        is looked up at each check, so the probe can be made before the
        service starts), or a SQLAlchemy Engine on ``postgresql+txpostgres``.
    :param timeout: seconds a check may take, connecting included.
    :param cache_for: seconds a result is reused.
    """

    def __init__(
        self, target: Any, timeout: float = 1.0, cache_for: float = 1.0
    ) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        if cache_for < 0:
            raise ValueError("cache_for must not be negative")
        self.target = target
        self.timeout = timeout
        self.cache_for = cache_for
        self.last: Optional[ProbeResult] = None
        self._running: Optional[list[Deferred[ProbeResult]]] = None
        self._conn: Any = None
        self._conn_engine: Any = None
        self.checks = 0  # checks run against the database (not cached)

    def _engine(self) -> Any:
        return getattr(self.target, "engine", self.target)

    def check(self) -> Deferred[ProbeResult]:
        """
        A Deferred that fires with a :class:`ProbeResult` (never fails):
        the cached one if it is fresh, else the outcome of a check.
        """
        now = time.monotonic()
        last = self.last
        if last is not None and now - last.checked_at < self.cache_for:
            return succeed(last)
        d: Deferred[ProbeResult] = Deferred()
        if self._running is not None:
            self._running.append(d)
            return d
        self._running = [d]
        engine = self._engine()
        if engine is None or getattr(self.target, "accepting", True) is False:
            self._settle(
                ProbeResult(False, "the database service is not running", now, 0.0)
            )
            return d
        self.checks += 1
        run_in_fiber(self._probe, engine, now).addBoth(self._settle)
        return d

    def _settle(self, result: Any) -> None:
        if not isinstance(result, ProbeResult):  # a bug of ours: say so
            _log.failure("readiness check failed unexpectedly", result)
            result = ProbeResult(False, "readiness check failed", time.monotonic(), 0)
        self.last = result
        waiting, self._running = self._running or [], None
        for d in waiting:
            d.callback(result)

    def _probe(self, engine: Any, started: float) -> ProbeResult:
        from twisted.internet import reactor as _reactor

        reactor: Any = _reactor
        timer = reactor.callLater(self.timeout, self._drop)
        try:
            while True:
                conn = self._conn
                if conn is not None and (
                    self._conn_engine is not engine or not conn.check_alive()
                ):
                    self._close()  # the server ended it since the last check
                    conn = None
                fresh = conn is None
                if conn is None:
                    conn = self._conn = self._connect(engine)
                    self._conn_engine = engine
                try:
                    cursor = conn.cursor()
                    cursor.execute("SELECT 1")
                    cursor.close()
                    break
                except Exception:
                    self._close()
                    # A kept connection may have died just now: one more
                    # try on a new one, in the time left.
                    if fresh or not timer.active():
                        raise
            latency = time.monotonic() - started
            return ProbeResult(True, "", time.monotonic(), latency)
        except Exception as e:
            self._close()
            if not timer.active():
                reason = f"no answer within {self.timeout:g} s"
            else:
                reason = first_line(e)
            return ProbeResult(
                False, reason, time.monotonic(), time.monotonic() - started
            )
        finally:
            if timer.active():
                timer.cancel()

    def _connect(self, engine: Any) -> Any:
        dialect = engine.dialect
        cargs, cparams = dialect.create_connect_args(engine.url)
        cparams = dict(cparams)
        cparams["connect_timeout"] = self.timeout
        cparams.setdefault("application_name", "txfiberdb readiness")
        conn = dialect.loaded_dbapi.connect(*cargs, **cparams)
        conn.autocommit = True
        return conn

    def _drop(self) -> None:
        # The check ran out of time: closing the connection wakes the fiber
        # at once (a server that never answers would hold a cancel too).
        if self._conn is not None:
            self._close()

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        self._conn_engine = None
        if conn is not None:
            try:
                conn.close()
            except Exception:
                pass

    def close(self) -> None:
        """Close the probe's connection (call it when the service stops)."""
        self._close()
