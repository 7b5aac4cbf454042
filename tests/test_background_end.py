"""
Ending transactions in the background (``background_end``): a ROLLBACK (or
the COMMIT of a transaction that only read) is sent and nobody waits for it;
the next use of the connection waits only if it has not arrived.  Against a
real PostgreSQL: waits are counted by the driver, the server's view is read
from ``pg_stat_activity`` and the server's log.
"""

import os
import signal

import psycopg2
from sqlalchemy import Column, Integer, String, create_engine, text
from sqlalchemy.orm import Session, declarative_base

from txfiberdb import dbapi, run_in_fiber, sleep
from txfiberdb import testing as fiber_testing
from txfiberdb.fiber import await_deferred

from .support import DatabaseTestCase

Base = declarative_base()


class Item(Base):
    __tablename__ = "bg_items"
    id = Column(Integer, primary_key=True)
    name = Column(String(50))


def _thaw(pid):
    try:
        os.kill(pid, signal.SIGCONT)
    except ProcessLookupError:
        pass


def _local_server():
    """The TemporaryPostgres of this process, or None (an external server)."""
    return fiber_testing._server


class BackgroundEndTests(DatabaseTestCase):
    def setUp(self):
        self.admin(
            "CREATE TABLE IF NOT EXISTS bg_t (x int);"
            "CREATE TABLE IF NOT EXISTS bg_d (x int UNIQUE DEFERRABLE INITIALLY DEFERRED);"
            "TRUNCATE bg_t, bg_d;"
            "CREATE OR REPLACE FUNCTION bg_write(v int) RETURNS int "
            "LANGUAGE sql AS $$ INSERT INTO bg_t VALUES (v) RETURNING v $$;"
            "CREATE OR REPLACE FUNCTION bg_write_twice(v int) RETURNS int "
            "LANGUAGE sql AS $$ INSERT INTO bg_d VALUES (v), (v) RETURNING v $$"
        )

    def state_of(self, pid):
        rows = self.admin("SELECT state FROM pg_stat_activity WHERE pid = %s", (pid,))
        return rows[0][0] if rows else None

    def test_rollback_returns_at_once_and_completes(self):
        conn = self.connect(background_end=True)
        cur = conn.cursor()
        cur.execute("SELECT 1")
        trips = conn.round_trips
        conn.rollback()
        self.assertEqual(conn.round_trips, trips, "rollback() waited")
        self.assertEqual(conn.ending, "ROLLBACK")
        self.assertFalse(conn.in_transaction)
        sleep(0.2)  # the reactor reads the answer meanwhile
        self.assertEqual(self.state_of(conn.get_backend_pid()), "idle")
        cur.execute("SELECT 2")
        self.assertEqual(cur.fetchall(), [(2,)])
        self.assertIsNone(conn.ending)
        self.assertEqual(conn.round_trips, trips + 1)

    def test_without_the_option_rollback_waits(self):
        conn = self.connect()
        cur = conn.cursor()
        cur.execute("SELECT 1")
        trips = conn.round_trips
        conn.rollback()
        self.assertEqual(conn.round_trips, trips + 1)
        self.assertIsNone(conn.ending)

    def test_next_use_waits_when_not_finished(self):
        conn = self.connect(background_end=True)
        cur = conn.cursor()
        cur.execute("INSERT INTO bg_t VALUES (1)")
        pid = conn.get_backend_pid()
        if _local_server() is None:
            self.skipTest("needs the test's own PostgreSQL (to SIGSTOP a backend)")
        os.kill(pid, signal.SIGSTOP)  # the ROLLBACK cannot complete meanwhile
        self.addCleanup(_thaw, pid)
        trips = conn.round_trips
        conn.rollback()
        self.assertTrue(conn._wire.busy)
        waits = conn.waits

        def count():
            cur.execute("SELECT count(*) FROM bg_t")
            return cur.fetchall()

        d = run_in_fiber(count)
        sleep(0.2)
        self.assertFalse(d.called, "the query did not wait for the end")
        self.assertEqual(conn.waits, waits + 1)
        _thaw(pid)
        self.assertEqual(await_deferred(d), [(0,)])
        self.assertEqual(conn.round_trips, trips + 1)

    def test_commit_of_reads_in_background_of_writes_waited(self):
        conn = self.connect(background_end=True)
        cur = conn.cursor()
        cur.execute("SELECT x FROM bg_t")
        trips = conn.round_trips
        conn.commit()
        self.assertEqual((conn.round_trips, conn.ending), (trips, "COMMIT"))
        cur.execute("INSERT INTO bg_t VALUES (1)")
        trips = conn.round_trips
        conn.commit()
        self.assertEqual((conn.round_trips, conn.ending), (trips + 1, None))
        self.assertEqual(self.admin("SELECT count(*) FROM bg_t"), [(1,)])

    def test_select_calling_a_writing_function_is_committed(self):
        """Documented: judged by command tags, a SELECT that writes through a
        function is committed in the background, not lost."""
        conn = self.connect(background_end=True)
        cur = conn.cursor()
        cur.execute("SELECT bg_write(7)")
        conn.commit()
        self.assertEqual(conn.ending, "COMMIT")
        self.assertTrue(conn.check_alive(wait=True))  # collects the outcome
        self.assertIsNone(conn.ending)
        self.assertEqual(self.admin("SELECT x FROM bg_t"), [(7,)])

    def test_failed_background_commit_closes_and_says_so(self):
        """Documented: when such a COMMIT fails (here a deferred unique
        check), nothing is committed, the failure is logged and the
        connection is closed at its next use."""
        conn = self.connect(background_end=True)
        cur = conn.cursor()
        cur.execute("SELECT bg_write_twice(3)")
        conn.commit()
        self.assertEqual(conn.ending, "COMMIT")
        with self.assertRaises(dbapi.OperationalError) as ctx:
            cur.execute("SELECT 1")
        self.assertIn("COMMIT", str(ctx.exception))
        self.assertIn("the connection was closed", str(ctx.exception))
        self.assertTrue(conn.closed)
        self.assertEqual(self.admin("SELECT count(*) FROM bg_d"), [(0,)])

    def test_writes_under_a_select_tag_are_waited_for(self):
        """Statements whose tag says SELECT but that write, and that the
        driver can see in the text, keep the COMMIT waited for."""
        conn = self.connect(background_end=True)
        cur = conn.cursor()
        for sql in (
            "WITH w AS (INSERT INTO bg_t VALUES (5) RETURNING x) SELECT x FROM w",
            "SELECT 1 AS x INTO TEMP bg_into",
            "SELECT 1; SELECT 2",
            "SET LOCAL work_mem = '8MB'",
        ):
            cur.execute(sql)
            trips = conn.round_trips
            conn.commit()
            self.assertEqual((conn.round_trips, conn.ending), (trips + 1, None), sql)
        cur.execute(b"SELECT 1")  # bytes: not judged, so a write
        trips = conn.round_trips
        conn.commit()
        self.assertEqual(conn.round_trips, trips + 1)
        self.assertEqual(self.admin("SELECT x FROM bg_t"), [(5,)])

    def test_serializable_commit_of_reads_waits(self):
        conn = self.connect(background_end=True)
        conn.set_session(isolation_level="SERIALIZABLE")
        cur = conn.cursor()
        cur.execute("SELECT 1")
        trips = conn.round_trips
        conn.commit()
        self.assertEqual((conn.round_trips, conn.ending), (trips + 1, None))

    def test_background_end_from_the_hub(self):
        """A pool may return a connection from the reactor's greenlet: the
        end is sent from there, nothing waits."""
        conn = self.connect(background_end=True)
        conn.cursor().execute("SELECT 1")
        import greenlet

        g = greenlet.greenlet(conn.rollback)
        g.switch()
        self.assertEqual(conn.ending, "ROLLBACK")
        sleep(0.1)
        self.assertTrue(conn.check_alive())
        self.assertEqual(self.state_of(conn.get_backend_pid()), "idle")


class BackgroundEndPoolTests(DatabaseTestCase):
    """Through SQLAlchemy: the dialect turns background_end on."""

    def engine(self, **kw):
        kw.setdefault("pool_size", 1)
        kw.setdefault("max_overflow", 0)
        engine = create_engine(self.url, **kw)
        self.addCleanup(engine.dispose)
        return engine

    def dbapi_conn(self, engine):
        with engine.connect() as c:
            return c.connection.dbapi_connection

    def setUp(self):
        engine = create_engine(self.url, poolclass=None)
        Base.metadata.create_all(engine)
        with Session(engine) as s:
            s.query(Item).delete()
            s.add(Item(id=1, name="one"))
            s.commit()
        engine.dispose()

    def test_read_only_request_one_round_trip_one_write_two(self):
        engine = self.engine()
        conn = self.dbapi_conn(engine)
        self.assertTrue(conn.background_end)
        sleep(0.05)
        for i in range(8):  # past the prepare threshold (5) too
            trips, sent = conn.round_trips, conn.sent
            with Session(engine) as session:
                self.assertEqual(session.get(Item, 1).name, "one")
                session.commit()  # as FiberRoutes does when the handler returns
            # The 6th run prepares the SELECT: one round trip more, once.
            self.assertEqual(conn.round_trips - trips, 2 if i == 5 else 1)
            self.assertEqual(conn.sent - sent, 3 if i == 5 else 2)
            self.assertEqual(conn.ending, "COMMIT")
        for i in range(8):
            trips = conn.round_trips
            with Session(engine) as session:
                session.add(Item(id=100 + i, name="new"))
                session.commit()
            self.assertEqual(conn.round_trips - trips, 3 if i == 5 else 2)

    def test_session_close_without_commit_rolls_back_in_background(self):
        engine = self.engine()
        conn = self.dbapi_conn(engine)
        trips = conn.round_trips
        with Session(engine) as session:
            session.get(Item, 1)
            session.add(Item(id=2, name="not kept"))
            session.flush()
        self.assertEqual(conn.round_trips - trips, 2, "BEGIN+SELECT, INSERT")
        self.assertEqual(conn.ending, "ROLLBACK")
        with Session(engine) as session:
            self.assertIsNone(session.get(Item, 2))

    def test_checkout_before_it_completes_waits(self):
        engine = self.engine()
        with engine.connect() as c:
            c.execute(text("SELECT 1"))
            conn = c.connection.dbapi_connection
            pid = conn.get_backend_pid()
            self._freeze(pid)  # the ROLLBACK cannot complete before we say so
        self.assertEqual(conn.ending, "ROLLBACK")

        def use():
            with engine.connect() as c:  # the same connection (pool of 1)
                self.assertIs(c.connection.dbapi_connection, conn)
                self.assertIsNone(conn.ending, "checkout collected the end")
                return c.execute(text("SELECT 5")).scalar()

        waits = conn.waits
        d = run_in_fiber(use)
        sleep(0.2)
        self.assertFalse(d.called, "the checkout did not wait for the end")
        self.assertEqual(conn.waits, waits + 1)
        _thaw(pid)
        self.assertEqual(await_deferred(d), 5)

    def test_failed_reset_discards_the_connection(self):
        engine = self.engine()
        c = engine.connect()
        c.execute(text("SELECT 1"))
        conn = c.connection.dbapi_connection
        pid = conn.get_backend_pid()
        # Kill the backend without letting the reactor read about it (a
        # blocking connection, on purpose): the ROLLBACK goes out to a dead
        # server.
        blocking = psycopg2.connect(self.dsn)
        blocking.autocommit = True
        with blocking.cursor() as cur:
            cur.execute("SELECT pg_terminate_backend(%s)", (pid,))
            for _ in range(200):
                cur.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,))
                if not cur.fetchall():
                    break
                import time

                time.sleep(0.01)
        blocking.close()
        c.close()  # the pool's reset: a background ROLLBACK that fails
        with engine.connect() as c2:
            self.assertEqual(c2.execute(text("SELECT 3")).scalar(), 3)
            self.assertNotEqual(c2.connection.dbapi_connection.get_backend_pid(), pid)
        self.assertTrue(conn.closed)

    def _freeze(self, pid):
        server = _local_server()
        if server is None:
            self.skipTest("needs the test's own PostgreSQL (to SIGSTOP a backend)")
        os.kill(pid, signal.SIGSTOP)
        self.addCleanup(_thaw, pid)

    def test_pool_stats_never_wait_for_an_end(self):
        """pool_stats (a metrics endpoint) looks at idle connections without
        waiting for their ends: it neither blocks nor holds them."""
        from txfiberdb import pool_stats

        engine = self.engine()
        with engine.connect() as c:
            c.execute(text("SELECT 1"))
            conn = c.connection.dbapi_connection
            pid = conn.get_backend_pid()
            self._freeze(pid)
        waits = conn.waits
        self.assertEqual(pool_stats(engine)["idle"], 1)
        self.assertEqual(conn.waits, waits)
        self.assertEqual(conn.ending, "ROLLBACK")

        def use():
            with engine.connect() as c2:
                return c2.execute(text("SELECT 6")).scalar()

        d = run_in_fiber(use)
        sleep(0.1)
        self.assertFalse(d.called)
        _thaw(pid)
        self.assertEqual(await_deferred(d), 6)

    def test_cancel_while_waiting_for_the_end(self):
        engine = self.engine(pool_timeout=30)
        with engine.connect() as c:
            c.execute(text("SELECT 1"))
            conn = c.connection.dbapi_connection
            pid = conn.get_backend_pid()
            self._freeze(pid)
        self.assertEqual(conn.ending, "ROLLBACK")  # stuck: the backend is frozen

        def use():
            with engine.connect() as c2:
                return c2.execute(text("SELECT 4")).scalar()

        d = run_in_fiber(use)
        sleep(0.2)
        self.assertFalse(d.called, "a checkout did not wait for the end")
        d.cancel()
        from twisted.internet.defer import CancelledError

        with self.assertRaises(CancelledError):
            await_deferred(d)
        _thaw(pid)
        self.assertEqual(await_deferred(run_in_fiber(use)), 4)
        sleep(0.1)
        # Discarded by the pool, or its end collected: never half-used.
        self.assertTrue(conn.closed or (conn.check_alive() and conn.ending is None))

    def test_dispose_while_an_end_runs(self):
        """EngineService's stop disposes the engine: a connection whose end
        still runs is closed, nothing waits for it, nothing is logged."""
        from txfiberdb.service import EngineService

        service = EngineService(self.url, pool_size=1, max_overflow=0)
        service.startService()

        def work():
            with service.engine.connect() as c:
                c.execute(text("SELECT 1"))
                return c.connection.dbapi_connection

        conn = await_deferred(run_in_fiber(work))
        pid = conn.get_backend_pid()
        self._freeze(pid)
        self.assertEqual(conn.ending, "ROLLBACK")
        await_deferred(service.stopService())
        self.assertTrue(conn.closed)
        _thaw(pid)
        sleep(0.1)
        rows = self.admin("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,))
        self.assertEqual(rows, [])

    def test_statements_in_the_server_log(self):
        """The server's own count (log_statement = all: one line per query
        string, i.e. per round trip): a read-only ORM request sends
        BEGIN+SELECT and a COMMIT it does not wait for; a request with one
        write sends BEGIN+INSERT and COMMIT."""
        server = _local_server()
        if server is None:
            self.skipTest("needs the test's own PostgreSQL (to read its log)")
        log = os.path.join(server.directory, "server.log")
        dbname = self.admin("SELECT current_database()")[0][0]
        self.admin(f'ALTER DATABASE "{dbname}" SET log_statement = \'all\'')
        self.addCleanup(self.admin, f'ALTER DATABASE "{dbname}" RESET log_statement')
        engine = self.engine()
        conn = self.dbapi_conn(engine)
        pid = conn.get_backend_pid()
        for _ in range(6):  # past the prepare threshold
            with Session(engine) as session:
                session.get(Item, 1)
                session.commit()
        sleep(0.2)

        def statements(work):
            start = os.path.getsize(log)
            trips = conn.round_trips
            work()
            sleep(0.3)  # the background COMMIT, and the log's writer
            with open(log) as f:
                f.seek(start)
                lines = [
                    line.split("statement: ", 1)[1].strip()
                    for line in f
                    if f"[{pid}]" in line and "statement: " in line
                ]
            return lines, conn.round_trips - trips

        def read():
            with Session(engine) as session:
                session.get(Item, 1)
                session.commit()

        def write():
            with Session(engine) as session:
                session.add(Item(id=50, name="w"))
                session.commit()

        lines, trips = statements(read)
        self.assertEqual(len(lines), 2, lines)
        self.assertTrue(lines[0].startswith("BEGIN;EXECUTE _txf_"), lines)
        self.assertEqual(lines[1], "COMMIT")
        self.assertEqual(trips, 1)
        lines, trips = statements(write)
        self.assertEqual(len(lines), 2, lines)
        self.assertTrue(lines[0].startswith("BEGIN;INSERT INTO bg_items"), lines)
        self.assertEqual(lines[1], "COMMIT")
        self.assertEqual(trips, 2)



class FiberRoutesTests(DatabaseTestCase):
    """A Klein service: what a read-only route and a writing route cost, and
    what happens to data written by a route that looks read-only."""

    def setUp(self):
        from klein import Klein
        from sqlalchemy import select
        from twisted.web.server import Site

        from txfiberdb.klein import FiberRoutes
        from txfiberdb.service import EngineService

        from .test_klein import HTTPClient, HTTPServer, metadata, notes

        self.notes = notes
        self.service = EngineService(self.url, pool_size=1, max_overflow=0)
        self.service.startService()
        self.addCleanup(lambda: await_deferred(self.service.stopService()))
        engine = self.service.engine
        metadata.create_all(engine)
        with engine.begin() as conn:
            conn.execute(notes.delete())
            conn.execute(
                text(
                    "CREATE OR REPLACE FUNCTION bg_add_note(b text) RETURNS int "
                    "LANGUAGE sql AS $$ INSERT INTO notes (body) VALUES (b) "
                    "RETURNING 1 $$"
                )
            )
        app = Klein()
        routes = FiberRoutes(self.service, app)

        @routes.route("/notes/<int:note_id>")
        def read(request, session, note_id):
            row = session.execute(select(notes).where(notes.c.id == note_id)).first()
            return {"found": row is not None}

        @routes.route("/notes", methods=["POST"])
        def add(request, session):
            session.execute(notes.insert().values(body="plain"))
            return {}

        @routes.route("/via-function", methods=["POST"])
        def add_via_function(request, session):
            session.execute(text("SELECT bg_add_note('via function')"))
            return {}

        self.server = HTTPServer(self, Site(app.resource()))
        self.http = HTTPClient(self, self.server.base)

    def connection(self):
        with self.service.engine.connect() as c:
            return c.connection.dbapi_connection

    def bodies(self):
        return sorted(r[0] for r in self.admin("SELECT body FROM notes"))

    def test_round_trips_per_request(self):
        conn = self.connection()
        for _ in range(6):  # past the prepare threshold
            self.assertEqual(self.http.get("/notes/1").code, 200)
        trips = conn.round_trips
        self.assertEqual(self.http.get("/notes/1").json, {"found": False})
        self.assertEqual(conn.round_trips - trips, 1, "read-only route")
        trips = conn.round_trips
        self.assertEqual(self.http.post("/notes", {}).code, 200)
        self.assertEqual(conn.round_trips - trips, 2, "route with one write")
        self.assertEqual(self.bodies(), ["plain"])

    def test_write_through_a_function_is_committed(self):
        """Documented (doc/howto/performance.md): the driver sees only a
        SELECT, commits it without waiting, and the row is kept."""
        self.assertEqual(self.http.post("/via-function", {}).code, 200)
        sleep(0.1)
        self.assertEqual(self.bodies(), ["via function"])
