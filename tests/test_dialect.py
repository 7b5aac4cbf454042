"""
Tests for the postgresql+txpostgres dialect: SQLAlchemy Core and ORM inside
fibers, against a real PostgreSQL.
"""

import os

import greenlet
import psycopg2
from sqlalchemy import (
    Column,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Table,
    create_engine,
    event,
    func,
    select,
    text,
)
from sqlalchemy.dialects.postgresql import HSTORE, JSONB
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    mapped_column,
    relationship,
    sessionmaker,
)
from twisted.internet.defer import CancelledError, gatherResults

import txfiberdb
from txfiberdb import (
    NotInFiberError,
    await_deferred,
    fiber_scoped_session,
    run_in_fiber,
    sleep,
)
from txfiberdb.dialect import TxPostgresDialect
from txfiberdb.pool import FiberQueuePool

from .support import DatabaseTestCase


class Base(DeclarativeBase):
    pass


class Customer(Base):
    __tablename__ = "customer"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50), unique=True)
    orders: Mapped[list["Order"]] = relationship(back_populates="customer")


class Order(Base):
    __tablename__ = "orders"
    id: Mapped[int] = mapped_column(primary_key=True)
    customer_id: Mapped[int] = mapped_column(ForeignKey("customer.id"))
    total: Mapped[int]
    customer: Mapped[Customer] = relationship(back_populates="orders")


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class EngineTestCase(DatabaseTestCase):
    def setUp(self):
        self.engine = create_engine(self.url)
        self.addCleanup(self.engine.dispose)
        Base.metadata.drop_all(self.engine)
        Base.metadata.create_all(self.engine)


class DialectTests(EngineTestCase):
    def test_registered_and_default_pool(self):
        self.assertIsInstance(self.engine.dialect, TxPostgresDialect)
        self.assertIsInstance(self.engine.pool, FiberQueuePool)
        self.assertEqual(self.engine.dialect.driver, "txpostgres")

    def test_url_query_options(self):
        """libpq options in the URL's query string, connect_timeout included."""
        sep = "&" if "?" in self.url else "?"
        engine = create_engine(
            f"{self.url}{sep}connect_timeout=10&application_name=from_url"
        )
        self.addCleanup(engine.dispose)
        with engine.connect() as conn:
            name = conn.execute(text("SHOW application_name")).scalar()
        self.assertEqual(name, "from_url")

    def test_core_roundtrip_and_types(self):
        meta = MetaData()
        t = Table(
            "typed",
            meta,
            Column("id", Integer, primary_key=True),
            Column("doc", JSONB),
            Column("tags", HSTORE),
        )
        with self.engine.begin() as conn:
            conn.exec_driver_sql("CREATE EXTENSION IF NOT EXISTS hstore")
        # hstore is looked up at connect: a fresh engine sees the extension.
        engine = create_engine(self.url)
        self.addCleanup(engine.dispose)
        meta.create_all(engine)
        with engine.begin() as conn:
            conn.execute(
                t.insert(), [{"doc": {"a": [1, 2]}, "tags": {"k": "v"}}, {"doc": None, "tags": None}]
            )
            rows = conn.execute(select(t.c.doc, t.c.tags).order_by(t.c.id)).all()
        self.assertEqual(rows, [({"a": [1, 2]}, {"k": "v"}), (None, None)])

    def test_outside_fiber_fails_at_once(self):
        g = greenlet.greenlet(lambda: self.engine.connect())
        with self.assertRaises(NotInFiberError) as ctx:
            g.switch()
        self.assertIn("run_in_fiber", str(ctx.exception))

    def test_events(self):
        seen = []
        event.listen(
            self.engine,
            "before_cursor_execute",
            lambda conn, cursor, statement, *rest: seen.append(statement),
        )
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 41 + 1"))
        self.assertIn("SELECT 41 + 1", seen)

    def test_isolation_level_execution_option(self):
        with self.engine.connect() as conn:
            conn = conn.execution_options(isolation_level="SERIALIZABLE")
            level = conn.execute(text("SHOW transaction_isolation")).scalar()
            self.assertEqual(level, "serializable")
        with self.engine.connect() as conn:
            level = conn.execute(text("SHOW transaction_isolation")).scalar()
            self.assertEqual(level, "read committed")  # reset on return
        with self.engine.connect() as conn:
            conn = conn.execution_options(isolation_level="AUTOCOMMIT")
            conn.execute(text("CREATE TABLE made_in_autocommit (a int)"))
        with self.engine.connect() as conn:
            self.assertEqual(
                conn.execute(text("SELECT count(*) FROM made_in_autocommit")).scalar(), 0
            )

    def test_readonly_postgresql_option(self):
        with self.engine.connect() as conn:
            conn = conn.execution_options(postgresql_readonly=True)
            self.assertEqual(
                conn.execute(text("SHOW transaction_read_only")).scalar(), "on"
            )

    def test_stream_results_bounded_memory(self):
        with self.engine.connect() as conn:
            result = conn.execution_options(stream_results=True, max_row_buffer=1000).execute(
                text("SELECT n, repeat('y', 200) FROM generate_series(1, 300000) n")
            )
            base = peak = rss_bytes()
            count = 0
            for _ in result:
                count += 1
                if count % 20000 == 0:
                    peak = max(peak, rss_bytes())
            self.assertEqual(count, 300000)
            self.assertLess(peak - base, 40 * 1024 * 1024)

    def test_executemany_insert_and_update(self):
        orders = Order.__table__
        with self.engine.begin() as conn:
            conn.execute(Customer.__table__.insert(), [{"id": 1, "name": "c"}])
            conn.execute(
                orders.insert(),
                [{"id": i, "customer_id": 1, "total": i} for i in range(1, 501)],
            )
            conn.execute(
                orders.update().where(orders.c.id == text(":oid")).values(total=0),
                [{"oid": i} for i in range(1, 101)],
            )
            total = conn.execute(select(func.sum(orders.c.total))).scalar()
        self.assertEqual(total, sum(range(101, 501)))

    def test_error_classes(self):
        with self.engine.connect() as conn:
            conn.execute(Customer.__table__.insert(), {"id": 1, "name": "x"})
            with self.assertRaises(IntegrityError) as ctx:
                conn.execute(Customer.__table__.insert(), {"id": 1, "name": "y"})
            self.assertIsInstance(ctx.exception.orig, psycopg2.IntegrityError)

    def test_alembic_operations(self):
        from alembic.autogenerate import compare_metadata
        from alembic.migration import MigrationContext
        from alembic.operations import Operations

        with self.engine.begin() as conn:
            ctx = MigrationContext.configure(conn)
            ops = Operations(ctx)
            ops.create_table(
                "migrated", Column("id", Integer, primary_key=True), Column("x", String(10))
            )
            ops.add_column("migrated", Column("y", Integer))
            ops.create_index("ix_migrated_y", "migrated", ["y"])
            meta = MetaData()
            Table(
                "migrated",
                meta,
                Column("id", Integer, primary_key=True),
                Column("x", String(10)),
                Column("y", Integer, index=True),
            )
            diff = compare_metadata(ctx, meta)
        # Only the tables of other tests differ, not "migrated".
        self.assertFalse([d for d in diff if "migrated" in repr(d)])


class ORMTests(EngineTestCase):
    def test_crud_and_lazy_loading(self):
        with Session(self.engine) as s:
            alice = Customer(name="alice", orders=[Order(total=10), Order(total=20)])
            s.add(alice)
            s.commit()
            alice_id = alice.id
        with Session(self.engine) as s:
            alice = s.get(Customer, alice_id)
            # Lazy load inside the fiber: a query on attribute access.
            self.assertEqual(sorted(o.total for o in alice.orders), [10, 20])
            alice.orders[0].total = 15
            s.delete(alice.orders[1])
            s.commit()
        with Session(self.engine) as s:
            totals = s.scalars(select(Order.total).order_by(Order.total)).all()
            self.assertEqual(totals, [15])
            order = s.scalars(select(Order)).one()
            self.assertEqual(order.customer.name, "alice")

    def test_rollback_on_error(self):
        with Session(self.engine) as s:
            s.add(Customer(name="dup"))
            s.commit()
        with Session(self.engine) as s:
            s.add(Customer(name="dup"))
            with self.assertRaises(IntegrityError):
                s.commit()
            s.rollback()
            self.assertEqual(s.scalar(select(func.count(Customer.id))), 1)

    def test_savepoints(self):
        with Session(self.engine) as s:
            s.add(Customer(name="outer"))
            nested = s.begin_nested()
            s.add(Customer(name="inner"))
            s.flush()
            nested.rollback()
            with s.begin_nested():
                s.add(Customer(name="kept"))
            s.commit()
        with Session(self.engine) as s:
            names = s.scalars(select(Customer.name).order_by(Customer.name)).all()
        self.assertEqual(names, ["kept", "outer"])

    def test_fiber_scoped_session(self):
        Scoped = fiber_scoped_session(sessionmaker(self.engine))

        def worker(name):
            session = Scoped()
            self.assertIs(Scoped(), session)  # same fiber, same session
            session.add(Customer(name=name))
            sleep(0.01)
            Scoped.commit()
            return id(session)

        ids = [await_deferred(d) for d in [run_in_fiber(worker, n) for n in "abc"]]
        self.assertEqual(len(set(ids)), 3)  # one session per fiber
        # Each fiber's session was removed (and closed) when it ended.
        self.assertEqual(Scoped.registry.registry, {})
        self.assertEqual(self.engine.pool.checkedout(), 0)

    def test_fiber_scoped_session_left_open_warns_nothing(self):
        """
        A scoped Session still holding its connection when the fiber ends is
        closed by fiber_scoped_session before the pool looks for leftovers:
        the connection goes back without the pool's warning.
        """
        from twisted.logger import globalLogPublisher

        logged = []
        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        Scoped = fiber_scoped_session(sessionmaker(self.engine))

        def reader():
            return Scoped.execute(text("SELECT count(*) FROM customer")).scalar()

        await_deferred(gatherResults([run_in_fiber(reader) for _ in range(3)]))
        self.assertEqual(self.engine.pool.checkedout(), 0)
        self.assertEqual(
            [e for e in logged if "ended holding" in str(e.get("log_format"))], []
        )

    def test_cancel_mid_query_returns_connection(self):
        def slow():
            with Session(self.engine) as s:
                s.execute(text("SELECT pg_sleep(30)"))

        d = run_in_fiber(slow)
        sleep(0.3)
        self.assertEqual(self.engine.pool.checkedout(), 1)
        d.cancel()
        with self.assertRaises(CancelledError):
            await_deferred(d)
        for _ in range(100):
            if self.engine.pool.checkedout() == 0:
                break
            sleep(0.02)
        self.assertEqual(self.engine.pool.checkedout(), 0)
        with self.engine.connect() as conn:
            active = conn.execute(
                text(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE query LIKE '%pg_sleep(30)%' AND state = 'active' "
                    "AND pid <> pg_backend_pid()"
                )
            ).scalar()
        self.assertEqual(active, 0)

    def test_connection_dead_in_pool_is_replaced_at_checkout(self):
        """
        Backends killed while their connections sit idle in the pool: the
        pool counts them as gone and hands out new ones, with no error and
        no pre-ping round trip.
        """
        engine = create_engine(self.url, pool_size=5)
        self.addCleanup(engine.dispose)
        conns = [engine.connect() for _ in range(5)]
        pids = [c.execute(text("SELECT pg_backend_pid()")).scalar() for c in conns]
        for c in conns:
            c.close()
        self.assertEqual(txfiberdb.pool_stats(engine)["idle"], 5)
        for pid in pids:
            self.admin("SELECT pg_terminate_backend(%s)", (pid,))
        sleep(0.2)
        stats = txfiberdb.pool_stats(engine)
        self.assertEqual((stats["idle"], stats["open"]), (0, 0))
        for _ in range(10):
            with engine.connect() as conn:
                pid = conn.execute(text("SELECT pg_backend_pid()")).scalar()
                self.assertNotIn(pid, pids)

    def test_disconnect_in_use_invalidates_and_pool_recovers(self):
        """
        A connection that dies while checked out fails as a disconnect
        (``connection_invalidated``) and the pool recovers.
        """
        with self.engine.connect() as conn:
            pid = conn.execute(text("SELECT pg_backend_pid()")).scalar()
            self.admin("SELECT pg_terminate_backend(%s)", (pid,))
            sleep(0.1)
            with self.assertRaises(DBAPIError) as ctx:
                conn.execute(text("SELECT 1"))
        self.assertTrue(ctx.exception.connection_invalidated)
        with self.engine.connect() as conn:
            self.assertEqual(conn.execute(text("SELECT 1")).scalar(), 1)

    def test_pre_ping_replaces_dead_connections(self):
        engine = create_engine(self.url, pool_pre_ping=True, pool_size=3)
        self.addCleanup(engine.dispose)
        conns = [engine.connect() for _ in range(3)]
        pids = [c.execute(text("SELECT pg_backend_pid()")).scalar() for c in conns]
        for c in conns:
            c.close()
        for pid in pids:
            self.admin("SELECT pg_terminate_backend(%s)", (pid,))
        sleep(0.1)
        for _ in range(3):
            with engine.connect() as conn:
                self.assertNotIn(conn.execute(text("SELECT pg_backend_pid()")).scalar(), pids)


class TwoPhaseTests(EngineTestCase):
    def setUp(self):
        # A prepared transaction left by a failed test would hold its locks.
        for (gid,) in self.admin("SELECT gid FROM pg_prepared_xacts"):
            self.admin(f"ROLLBACK PREPARED '{gid}'")
        super().setUp()

    def test_prepare_and_commit(self):
        with self.engine.connect() as conn:
            tx = conn.begin_twophase()
            conn.execute(Customer.__table__.insert(), {"id": 7, "name": "two-phase"})
            tx.prepare()
            prepared = self.admin("SELECT gid FROM pg_prepared_xacts")
            self.assertEqual([g for (g,) in prepared], [tx.xid])
            tx.commit()
        self.assertEqual(self.admin("SELECT name FROM customer WHERE id = 7"), [("two-phase",)])
        self.assertEqual(self.admin("SELECT count(*) FROM pg_prepared_xacts"), [(0,)])

    def test_prepare_and_rollback(self):
        with self.engine.connect() as conn:
            tx = conn.begin_twophase()
            conn.execute(Customer.__table__.insert(), {"id": 8, "name": "undone"})
            tx.prepare()
            tx.rollback()
        self.assertEqual(self.admin("SELECT count(*) FROM customer WHERE id = 8"), [(0,)])
