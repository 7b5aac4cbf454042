# -*- test-case-name: tests.test_dialect -*-
r"""
The SQLAlchemy dialect ``postgresql+txpostgres``: PostgreSQL through
txpostgres, for code running in txfiberdb fibers.

URL
---

::

    postgresql+txpostgres://user:password@host:port/dbname[?key=value&...]

Query-string keys are libpq connection parameters (``sslmode``,
``application_name``, ``connect_timeout``, ``host=/run/postgresql`` for a
unix socket, ...).  The dialect is registered through the
``sqlalchemy.dialects`` entry point when txfiberdb is installed.

Use
---

``create_engine()`` returns an ordinary synchronous Engine: Core, the ORM,
Session, relationships with lazy loading, events and Alembic work unchanged.
Use it inside a fiber (:func:`txfiberdb.run_in_fiber`, ``@txfiberdb.fibered``,
``txfiberdb.klein.route``); there, every query parks the fiber and the
reactor serves everybody else meanwhile.  Used outside a fiber it raises
:exc:`txfiberdb.NotInFiberError` at once instead of freezing the reactor.

The default pool is :class:`txfiberdb.pool.FiberQueuePool` (SQLAlchemy's
``QueuePool`` whose waits park the fiber); ``pool_size``, ``max_overflow``,
``pool_timeout``, ``pool_recycle``, ``pool_pre_ping`` and ``pool_use_lifo``
mean what they mean in SQLAlchemy.

Two driver options are on by default here (``doc/howto/performance.md``);
the URL's query string or ``connect_args`` turn them off:

- ``background_end``: a ROLLBACK (``Session.close()``, the pool's reset), and
  the COMMIT of a transaction whose statements were all reads, are sent
  without waiting; the next checkout waits for them if needed, and a failed
  one discards the connection.  A read-only request is one round trip.
  ``?background_end=false`` waits for every end.
- ``prepare_threshold`` (default :data:`DEFAULT_PREPARE_THRESHOLD`, 5) and
  ``prepared_max`` (100): statements run that many times on a connection are
  prepared on the server (psycopg 3's semantics).  ``?prepare_threshold=none``
  behind PgBouncer in transaction mode.

Type handling is the psycopg2 dialect's (this dialect derives from it):
json, jsonb, uuid, arrays, ranges, numerics, hstore (registered when the
extension exists; its OIDs are looked up with an ordinary query).

Differences from ``postgresql+psycopg2``
----------------------------------------

- ``client_encoding=`` is passed as a connection parameter (an asynchronous
  connection cannot change it afterwards).
- ``executemany`` is batched by the driver; ``executemany_mode`` is always
  ``values_only``, and ``supports_sane_multi_rowcount`` is False (rows
  matched by a batch of UPDATEs are not counted per statement).
- Two-phase transactions are done in SQL (``PREPARE TRANSACTION``, ``COMMIT
  PREPARED``), as the base PostgreSQL dialect does; the server needs
  ``max_prepared_transactions`` > 0.
- COPY is refused (it would wedge an asynchronous connection).
- Cancelling a fiber (for instance Klein cancelling a request's Deferred when
  the client goes away) cancels its running query on the server (with
  ``pg_cancel_backend()`` over a short-lived connection, so the reactor never
  waits); the connection is rolled back when returned to the pool.
- A pooled connection the server ended while it was idle (a killed
  backend, a restart) is never handed out: the pool replaces it at checkout,
  without a round trip (the driver reads what the server sent it), and
  :func:`txfiberdb.pool_stats` counts only live connections.
  ``pool_pre_ping`` is not needed for that.
- ``connect_timeout`` defaults to 10 s (libpq waits for ever); set it in the
  URL (``?connect_timeout=3``) or ``connect_args``; 0 means no limit.
  Connection errors name the host and port.
- Any pool class may be used (``poolclass=NullPool``, ...): SQLAlchemy's
  once-only connect set-up is made to park fibers instead of taking a thread
  lock.  A pool that blocks when exhausted (SQLAlchemy's ``QueuePool``)
  blocks the reactor then; the default pool parks the fiber.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import event, exc
from sqlalchemy.dialects.postgresql.base import PGDialect
from sqlalchemy.dialects.postgresql.psycopg2 import (
    PGDialect_psycopg2,
    PGExecutionContext_psycopg2,
)

from txfiberdb.pool import FiberQueuePool, install_fiber_mutexes

__all__ = ["DEFAULT_PREPARE_THRESHOLD", "TxPostgresDialect", "dialect"]

#: Runs of a statement on a connection before it is prepared (psycopg 3's
#: default); ``?prepare_threshold=none`` in the URL turns auto-prepare off.
DEFAULT_PREPARE_THRESHOLD = 5


class TxPostgresExecutionContext(PGExecutionContext_psycopg2):
    pass


def _refuse_dead_connection(dbapi_connection: Any, record: Any, proxy: Any) -> None:
    # A pooled connection the server ended while it was idle (killed backend,
    # restart) is replaced by the pool, without a round trip: the driver
    # reads what the server sent it meanwhile.  (pool_pre_ping, a round trip
    # per checkout, is not needed for this.)
    # A transaction's end still running in the background (background_end)
    # is waited for here; one that failed discards the connection.
    check = getattr(dbapi_connection, "check_alive", None)
    if check is not None and not check(wait=True):
        raise exc.DisconnectionError(
            "connection ended by the server while idle in the pool"
        )


class TxPostgresDialect(PGDialect_psycopg2):
    """``postgresql+txpostgres``: the psycopg2 dialect over txfiberdb.dbapi."""

    driver = "txpostgres"
    supports_statement_cache = True
    supports_sane_multi_rowcount = False
    execution_ctx_cls = TxPostgresExecutionContext
    poolclass = FiberQueuePool

    def __init__(self, **kwargs: Any) -> None:
        kwargs.pop("executemany_mode", None)
        super().__init__(**kwargs)  # type: ignore[no-untyped-call]

    @classmethod
    def import_dbapi(cls) -> Any:
        try:
            from txfiberdb import dbapi
        except ModuleNotFoundError as e:
            if e.name != "psycopg2":
                raise
            # Neither psycopg2 build is a hard requirement (packagers ship
            # their own): say how to get one.
            raise ModuleNotFoundError(
                "postgresql+txpostgres needs psycopg2: pip install "
                "'txfiberdb[binary]' (the psycopg2-binary wheel) or "
                "'txfiberdb[psycopg2]' (built against your libpq)",
                name="psycopg2",
            ) from e
        return dbapi

    @classmethod
    def get_pool_class(cls, url: Any) -> Any:
        return FiberQueuePool

    @classmethod
    def engine_created(cls, engine: Any) -> None:
        # Whatever the pool class, SQLAlchemy's once-only connect set-up must
        # not run under a threading.Lock (a parked fiber would hold it while
        # another fiber blocked the reactor's thread on it); dispose() makes
        # a new pool.
        install_fiber_mutexes(engine.pool)
        event.listen(engine.pool, "checkout", _refuse_dead_connection)

        @event.listens_for(engine, "engine_disposed")
        def _disposed(engine: Any) -> None:
            install_fiber_mutexes(engine.pool)

    def initialize(self, connection: Any) -> None:
        super().initialize(connection)  # type: ignore[no-untyped-call]
        self.supports_sane_multi_rowcount = False

    def create_connect_args(self, url: Any) -> Any:
        args, opts = super().create_connect_args(url)  # type: ignore[no-untyped-call]
        if self.client_encoding is not None:
            opts["client_encoding"] = self.client_encoding
        # The driver's two levers (doc/howto/performance.md), on by default
        # here; the URL or connect_args override them
        # (?prepare_threshold=none&background_end=false).
        opts.setdefault("background_end", True)
        opts.setdefault("prepare_threshold", DEFAULT_PREPARE_THRESHOLD)
        return args, opts

    def on_connect(self) -> Any:
        # psycopg2's registrations want the raw psycopg2 connection; uuid is
        # registered by txfiberdb.dbapi.connect() already.
        extras = self._psycopg2_extras

        def on_connect(conn: Any) -> None:
            raw = conn.raw_connection
            if self.use_native_hstore:
                oids = self._hstore_oids(conn)
                if oids is not None:
                    conn.register_hstore(oids)
            if self._json_deserializer:
                extras.register_default_json(raw, loads=self._json_deserializer)
                extras.register_default_jsonb(raw, loads=self._json_deserializer)

        return on_connect

    def _hstore_oids(self, dbapi_connection: Any) -> Any:
        # psycopg2's HstoreAdapter.get_oids runs a hidden query that breaks an
        # asynchronous connection: look the OIDs up with an ordinary one.
        # Cached per dialect (one database per engine), as psycopg2's is.
        if "_hstore_oid_cache" in self.__dict__:
            return self.__dict__["_hstore_oid_cache"]
        conn = getattr(dbapi_connection, "dbapi_connection", dbapi_connection)
        was_idle = not conn.in_transaction
        try:
            oids = conn.hstore_oids()
        finally:
            if was_idle and not conn.autocommit:
                conn.rollback()
        self.__dict__["_hstore_oid_cache"] = oids
        return oids

    def set_isolation_level(self, dbapi_connection: Any, level: str) -> None:
        if dbapi_connection.in_transaction:
            dbapi_connection.rollback()
        dbapi_connection.set_isolation_level(self._isolation_lookup[level])

    def do_ping(self, dbapi_connection: Any) -> bool:
        cursor = dbapi_connection.cursor()
        before = dbapi_connection.autocommit
        idle = not dbapi_connection.in_transaction
        try:
            if idle:
                dbapi_connection.autocommit = True
            cursor.execute("SELECT 1")
        finally:
            cursor.close()
            if idle and not dbapi_connection.closed:
                dbapi_connection.autocommit = before
        return True

    # Two-phase commit in SQL, as the base PostgreSQL dialect does; COMMIT
    # PREPARED and ROLLBACK PREPARED must run outside a transaction block,
    # and the driver (which follows the server's transaction status) would
    # otherwise open one for them.
    do_begin_twophase = PGDialect.do_begin_twophase
    do_prepare_twophase = PGDialect.do_prepare_twophase
    do_recover_twophase = PGDialect.do_recover_twophase

    def do_commit_twophase(
        self, connection: Any, xid: Any, is_prepared: bool = True, recover: bool = False
    ) -> None:
        if is_prepared:
            self._finish_prepared(connection, "COMMIT PREPARED", xid)
        else:
            self.do_commit(connection.connection)  # type: ignore[no-untyped-call]

    def do_rollback_twophase(
        self, connection: Any, xid: Any, is_prepared: bool = True, recover: bool = False
    ) -> None:
        if is_prepared:
            self._finish_prepared(connection, "ROLLBACK PREPARED", xid)
        else:
            self.do_rollback(connection.connection)  # type: ignore[no-untyped-call]

    def _finish_prepared(self, connection: Any, command: str, xid: Any) -> None:
        dbapi_conn = connection.connection.dbapi_connection
        if dbapi_conn.in_transaction:
            dbapi_conn.rollback()
        before = dbapi_conn.autocommit
        dbapi_conn.autocommit = True
        try:
            cursor = dbapi_conn.cursor()
            cursor.execute(f"{command} %s", (xid,))
            cursor.close()
        finally:
            dbapi_conn.autocommit = before

    @property
    def _is_disconnect_messages(self) -> tuple[str, ...]:
        return super()._is_disconnect_messages + (  # type: ignore[no-any-return]
            "the connection to the server was lost",
            "the connection was closed",
        )


dialect = TxPostgresDialect
