# -*- test-case-name: tests.test_demo -*-
"""
``twistd klein-demo``: the shop as a twistd service.

::

    twistd -n klein-demo [--listen tcp:8080] [--dsn URL] [--pool-size N]
                         [--max-overflow N] [--pool-timeout S]
                         [--grace-period S] [--sample-data] [--echo]

With no ``--dsn`` it starts a throwaway PostgreSQL server of its own
(:class:`txfiberdb.testing.TemporaryPostgres`: system PostgreSQL binaries or
the ``pgserver`` wheel), migrates the schema, loads sample data, and removes
the server on shutdown.  With ``--dsn`` it uses that server and brings its
schema to the latest migration (``klein_demo/migrations``; not with
``--no-migrate``; sample data only with ``--sample-data``, and only into an
empty shop).

Start-up order: the throwaway server (if any) is started in ``startService``
-- after twistd has forked and dropped privileges -- and that blocks for the
second or two PostgreSQL takes to start, before the reactor runs and before
anything is served.  Then the schema is migrated in a fiber (with the
ordinary, blocking-looking SQLAlchemy calls), and only then does the service
listen, so no request ever sees a half-made schema.  (Listening after
start-up means after privileges are dropped: for a port below 1024 use
``authbind`` or a systemd socket, ``--listen systemd:domain=INET:index=0``.)

Shutdown (Ctrl-C, SIGTERM): stop listening, let the requests in flight
finish (up to ``--grace-period`` seconds, then cancel them), dispose of the
pool, stop the throwaway server.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Optional

from sqlalchemy.engine import make_url
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger, LogLevel
from twisted.python import usage

from klein_demo.app import make_app, make_site
from klein_demo.metrics import Metrics
from klein_demo.models import load_sample_data
from txfiberdb.service import EngineService

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
        raise ValueError(f"not a PostgreSQL URL: {dsn}")
    return url.set(drivername="postgresql+txpostgres").render_as_string(
        hide_password=False
    )


class Options(usage.Options):
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
            "libpq DSN ('host=... dbname=...'). Default: a throwaway server.",
        ],
        ["pool-size", None, 20, "Connections kept in the pool.", int],
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

    def postOptions(self) -> None:
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
        except (ValueError, TypeError, KeyError) as e:
            raise usage.UsageError(f"--listen {self['listen']!r}: {e}") from None
        if self["dsn"] is not None:
            try:
                self["url"] = to_url(self["dsn"])
            except Exception as e:
                raise usage.UsageError(f"--dsn: {e}") from None
        else:
            self["url"] = None


class _StdlibToTwisted(logging.Handler):
    """Routes stdlib logging (SQLAlchemy's echo) to twisted.logger."""

    levels = {
        logging.DEBUG: LogLevel.debug,
        logging.INFO: LogLevel.info,
        logging.WARNING: LogLevel.warn,
        logging.ERROR: LogLevel.error,
        logging.CRITICAL: LogLevel.critical,
    }

    def emit(self, record: logging.LogRecord) -> None:
        level = self.levels.get(record.levelno, LogLevel.info)
        Logger(namespace=record.name).emit(
            level, "{message}", message=self.format(record)
        )


class ShopService(MultiService):
    """
    The shop: a throwaway PostgreSQL (unless given a URL), the
    :class:`EngineService`, the schema, then the HTTP endpoint.

    :param exit_on_failure: when start-up fails (database unreachable,
        port taken), stop the reactor and exit with status 1 (``twistd``);
        otherwise only log and fail :attr:`listening` (tests).
    :ivar listening: fires with the listening port once the service serves
        (or with the failure that stopped it from starting).
    """

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
        )
        self.db.setServiceParent(self)
        self.metrics = Metrics()
        self.app = make_app(self.db, self.metrics)
        self.site = make_site(self.app)
        self.postgres: Any = None
        self.port: Any = None
        self.listening: Deferred[Any] = Deferred()
        self._stopping: Optional[Deferred[Any]] = None

    @property
    def reactor(self) -> Any:
        if self._reactor is None:
            from twisted.internet import reactor

            self._reactor = reactor
        return self._reactor

    def startService(self) -> None:
        if self.echo:
            handler = _StdlibToTwisted()
            handler.setFormatter(logging.Formatter("%(message)s"))
            sa_log = logging.getLogger("sqlalchemy.engine")
            sa_log.addHandler(handler)
            sa_log.setLevel(logging.INFO)
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
        d = self.db.run(self._prepare)
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
        if self.migrate or self.postgres is not None:
            from klein_demo import migrations

            with engine.begin() as connection:
                before = migrations.current_revision(connection)
                migrations.upgrade(connection)
                after = migrations.current_revision(connection)
            log.info(
                "schema at revision {after} (was {before})",
                after=after,
                before=before or "empty",
            )
        if self.sample_data:
            with self.db.sessionmaker.begin() as session:
                if load_sample_data(session):
                    log.info("sample data loaded")

    def _listen(self) -> Deferred[Any]:
        endpoint = serverFromString(self.reactor, self.listen)
        return endpoint.listen(self.site)

    def _serving(self, port: Any) -> None:
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
        log.failure(
            "klein-demo could not start: {why}", failure, why=failure.getErrorMessage()
        )
        self.listening.errback(failure)
        self.listening.addErrback(lambda _: None)
        if self.exit_on_failure:
            # Shut down cleanly (the throwaway server is removed), then exit
            # with status 1 so that a supervisor sees the failure: twistd
            # itself has no way to set its exit status.
            self.reactor.addSystemEventTrigger("after", "shutdown", os._exit, 1)
            if self.reactor.running:
                self.reactor.stop()
            else:
                self.reactor.callWhenRunning(self.reactor.stop)

    def stopService(self) -> Deferred[Any]:
        if self._stopping is not None:
            return self._stopping
        log.info(
            "klein-demo shutting down: no new connections, {n} request(s) in "
            "flight may finish",
            n=self.db.inflight,
        )
        port, self.port = self.port, None
        d = maybeDeferred(port.stopListening) if port is not None else succeed(None)
        d.addCallback(lambda _: MultiService.stopService(self))
        d.addBoth(self._stop_postgres)
        self._stopping = d
        return d

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
    """The twistd plugin's entry point."""
    return ShopService(
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
    )
