"""
PgBouncer in transaction mode, for real: Debian's ``pgbouncer`` started on a
loopback port in front of the test server, and txfiberdb used through it.
Skipped (with the reason) where there is no ``pgbouncer`` binary; ``.ci/run``
installs it.
"""

from psycopg2.extensions import parse_dsn
from sqlalchemy import Column, Integer, String, create_engine, select, text
from sqlalchemy.orm import DeclarativeBase, Session
from twisted.internet.defer import CancelledError

from txfiberdb import await_deferred, run_in_fiber, sleep
from txfiberdb.testing import (
    PgBouncerUnavailable,
    TemporaryPgBouncer,
    find_pgbouncer,
    test_server,
)

from .support import DatabaseTestCase
from .test_klein import wait_until

try:
    find_pgbouncer()
    SKIP = None
except PgBouncerUnavailable as e:
    SKIP = str(e)


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "bounced_item"
    id = Column(Integer, primary_key=True)
    name = Column(String(50), nullable=False)


class PgBouncerTestCase(DatabaseTestCase):
    skip = SKIP
    default_pool_size = 4

    def setUp(self):
        server = parse_dsn(test_server())
        # Set-up of the test, before anything runs in the reactor: starting
        # PgBouncer blocks for a fraction of a second.
        self.bouncer = TemporaryPgBouncer(
            server.get("host", "127.0.0.1"),
            int(server.get("port", 5432)),
            default_pool_size=self.default_pool_size,
            users=(server.get("user", "postgres"),),
        ).start()
        self.addCleanup(self.bouncer.stop)
        self.dbname = parse_dsn(self.dsn)["dbname"]

    def engine(self, **kwargs):
        engine = create_engine(self.bouncer.url(self.dbname), **kwargs)
        self.addCleanup(engine.dispose)
        return engine

    def server_backends(self):
        """Client backends of PostgreSQL on this database (not ours)."""
        return self.admin(
            "SELECT pid, state, query FROM pg_stat_activity WHERE datname = %s "
            "AND backend_type = 'client backend' AND pid <> pg_backend_pid()",
            (self.dbname,),
        )


class ThroughPgBouncerTests(PgBouncerTestCase):
    def test_first_connect_orm_and_savepoints(self):
        engine = self.engine()
        Base.metadata.create_all(engine)
        self.addCleanup(lambda: Base.metadata.drop_all(engine))
        # The dialect's first-connect set-up ran through PgBouncer.
        self.assertGreaterEqual(engine.dialect.server_version_info, (10,))
        with Session(engine) as session:
            session.add(Item(name="kept"))
            session.flush()
            nested = session.begin_nested()
            session.add(Item(name="rolled back"))
            session.flush()
            nested.rollback()
            session.add(Item(name="also kept"))
            session.commit()
        with Session(engine) as session:
            names = session.scalars(select(Item.name).order_by(Item.id)).all()
        self.assertEqual(names, ["kept", "also kept"])

    def test_server_side_cursor(self):
        engine = self.engine()
        seen = 0
        with engine.begin() as conn:
            result = conn.execution_options(stream_results=True, max_row_buffer=50)
            rows = result.execute(text("SELECT g FROM generate_series(1, 1000) g"))
            for (g,) in rows:
                seen += 1
                self.assertEqual(g, seen)
        self.assertEqual(seen, 1000)

    def test_cancellation(self):
        engine = self.engine(pool_size=1, max_overflow=0)

        def slow():
            with engine.connect() as conn:
                conn.execute(text("SELECT pg_sleep(60)"))

        d = run_in_fiber(slow)
        wait_until(
            lambda: any(
                "pg_sleep" in (q or "") and s == "active"
                for _, s, q in self.server_backends()
            ),
            what="the query running on the server",
        )
        d.cancel()
        with self.assertRaises(CancelledError):
            await_deferred(d)
        # The cancel reached PostgreSQL through PgBouncer...
        wait_until(
            lambda: not any(s == "active" for _, s, _q in self.server_backends()),
            what="the query cancelled on the server",
        )
        # ...and the pool's only connection is usable again.
        with engine.connect() as conn:
            self.assertEqual(conn.scalar(text("SELECT 41 + 1")), 42)


class SessionStateTests(PgBouncerTestCase):
    """With one server connection, what one client leaves behind, the next sees."""

    default_pool_size = 1

    def test_txfiberdb_sets_no_session_state(self):
        engine = self.engine()
        Base.metadata.create_all(engine)
        self.addCleanup(lambda: Base.metadata.drop_all(engine))
        with Session(engine) as session:
            session.add(Item(name="x"))
            session.commit()
        with engine.connect().execution_options(isolation_level="SERIALIZABLE") as c:
            c.scalar(text("SELECT 1"))
            c.commit()
        other = self.engine()
        with other.connect() as conn:
            # Nothing set for the session on the (shared) server connection.
            self.assertEqual(
                conn.execute(
                    text("SELECT name FROM pg_settings WHERE source = 'session'")
                ).all(),
                [],
            )
            # The isolation level was the transaction's (BEGIN ... ISOLATION
            # LEVEL), not the session's.
            self.assertEqual(
                conn.scalar(text("SHOW transaction_isolation")), "read committed"
            )

    def test_set_local_stays_in_its_transaction_set_does_not(self):
        first, second = self.engine(), self.engine()
        with first.begin() as conn:
            conn.execute(text("SET LOCAL work_mem = '77MB'"))
        with second.connect() as conn:
            self.assertNotEqual(conn.scalar(text("SHOW work_mem")), "77MB")
        # The documented hazard: a plain SET outlives its transaction on the
        # server connection, and PgBouncer hands it to the next client.
        with first.begin() as conn:
            conn.execute(text("SET work_mem = '77MB'"))
        with second.connect() as conn:
            self.assertEqual(conn.scalar(text("SHOW work_mem")), "77MB")
            conn.execute(text("RESET work_mem"))
            conn.commit()


class ManyPoolsTests(PgBouncerTestCase):
    """Pools whose sum is bigger than PgBouncer's pool: all requests succeed."""

    default_pool_size = 3

    def test_many_pools_few_server_connections(self):
        engines = [self.engine(pool_size=5, max_overflow=0) for _ in range(4)]
        backend_pids = set()
        peak = []

        def work(engine):
            with engine.connect() as conn:
                pid = conn.scalar(text("SELECT pg_backend_pid() FROM pg_sleep(0.02)"))
                backend_pids.add(pid)
                conn.commit()
            return pid

        def watch():
            while not all(d.called for d in ds):
                peak.append(len(self.server_backends()))
                sleep(0.01)

        ds = [run_in_fiber(work, engines[i % 4]) for i in range(80)]
        watcher = run_in_fiber(watch)
        results = [await_deferred(d) for d in ds]
        await_deferred(watcher)
        self.assertEqual(len(results), 80)
        self.assertTrue(all(isinstance(p, int) for p in results))
        # 4 pools x 5 = 20 client connections, served by at most 3 backends.
        self.assertLessEqual(len(backend_pids), 3)
        self.assertLessEqual(max(peak), 3)
        self.assertEqual(sum(engine.pool.checkedout() for engine in engines), 0)
