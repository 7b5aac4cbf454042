"""
Tests for txfiberdb.dbapi against a real PostgreSQL.
"""

import datetime
import decimal
import os
import uuid

import psycopg2
import psycopg2.extensions
import psycopg2.extras
from twisted.internet import protocol, reactor
from twisted.internet.defer import CancelledError

from txfiberdb import dbapi, run_in_fiber, sleep
from txfiberdb.fiber import NotInFiberError, await_deferred
from txfiberdb.testing import TemporaryPostgres

from .support import DatabaseTestCase


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class ModuleTests(DatabaseTestCase):
    def test_pep249_globals(self):
        self.assertEqual(dbapi.apilevel, "2.0")
        self.assertEqual(dbapi.paramstyle, "pyformat")
        self.assertEqual(dbapi.threadsafety, 1)
        # psycopg2's own classes: callers catch what they already catch.
        self.assertIs(dbapi.IntegrityError, psycopg2.IntegrityError)
        self.assertIs(dbapi.OperationalError, psycopg2.OperationalError)
        self.assertTrue(issubclass(dbapi.ProgrammingError, dbapi.DatabaseError))
        conn = self.connect()
        self.assertIs(conn.Error, psycopg2.Error)

    def test_psycopg2_namespaces(self):
        """psycopg2's companion modules are the driver's, as attributes and
        as modules (code written for psycopg2 imports ``<driver>.extensions``)."""
        import importlib

        for name in ("extensions", "extras", "errors", "sql", "tz"):
            module = importlib.import_module(f"txfiberdb.dbapi.{name}")
            self.assertIs(module, importlib.import_module(f"psycopg2.{name}"))
            self.assertIs(getattr(dbapi, name), module)

    def test_connect_outside_fiber(self):
        d = run_in_fiber(lambda: None)  # keep the test itself in a fiber
        await_deferred(d)
        # Simulate a call on the hub by running it in a plain greenlet.
        import greenlet

        g = greenlet.greenlet(lambda: dbapi.connect(self.dsn))
        with self.assertRaises(NotInFiberError) as ctx:
            g.switch()
        self.assertIn("run_in_fiber", str(ctx.exception))

    def test_connection_refused(self):
        # A port with nothing listening.
        port = reactor.listenTCP(0, protocol.Factory())
        number = port.getHost().port
        await_deferred(port.stopListening())
        with self.assertRaises(psycopg2.OperationalError) as ctx:
            dbapi.connect(host="127.0.0.1", port=number, user="x", dbname="x")
        self.assertIn("refused", str(ctx.exception).lower())
        # As libpq's own messages do, it names the server.
        self.assertIn(
            f'connection to server at "127.0.0.1", port {number} failed',
            str(ctx.exception),
        )

    def test_connect_timeout(self):
        """A server that accepts and never answers: our own timer fires."""
        silent = protocol.ServerFactory.forProtocol(protocol.Protocol)
        port = reactor.listenTCP(0, silent, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        with self.assertRaises(psycopg2.OperationalError) as ctx:
            dbapi.connect(
                host="127.0.0.1",
                port=port.getHost().port,
                user="x",
                dbname="x",
                connect_timeout=0.3,
            )
        self.assertIn("timed out", str(ctx.exception))
        self.assertIn(f"port {port.getHost().port}", str(ctx.exception))
        # From the DSN too, and as a string (a SQLAlchemy URL's query).
        with self.assertRaises(psycopg2.OperationalError):
            dbapi.connect(
                f"host=127.0.0.1 port={port.getHost().port} user=x connect_timeout=1"
            )
        with self.assertRaises(psycopg2.OperationalError):
            dbapi.connect(
                host="127.0.0.1", port=port.getHost().port, connect_timeout="0.3"
            )

    def test_default_connect_timeout(self):
        """With no connect_timeout anywhere, DEFAULT_CONNECT_TIMEOUT applies."""
        silent = protocol.ServerFactory.forProtocol(protocol.Protocol)
        port = reactor.listenTCP(0, silent, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.patch(dbapi, "DEFAULT_CONNECT_TIMEOUT", 0.3)
        with self.assertRaises(psycopg2.OperationalError) as ctx:
            dbapi.connect(host="127.0.0.1", port=port.getHost().port, user="x")
        self.assertIn("timed out after 0.3 s", str(ctx.exception))

    def test_connect_to_stopping_and_starting_server(self):
        """
        Connecting while a server shuts down or starts up fails with the
        server's reason and logs nothing as unhandled (txpostgres's own
        connect cycle raised into the reactor when libpq dropped its socket
        half-way).
        """
        pg = TemporaryPostgres().start()
        self.addCleanup(pg.stop)
        outcomes = []

        def attempt():
            try:
                dbapi.connect(pg.dsn(), connect_timeout=2).close()
                outcomes.append("ok")
            except psycopg2.OperationalError as e:
                outcomes.append(str(e))

        attempts = [run_in_fiber(attempt) for _ in range(20)]
        pg.restart()  # blocking: the attempts are in flight meanwhile
        attempts += [run_in_fiber(attempt) for _ in range(20)]
        for d in attempts:
            await_deferred(d)
        self.assertEqual(len(outcomes), 40)
        for outcome in outcomes:
            if outcome != "ok":
                self.assertIn("connection to server", outcome)

    def test_dropped_connection_is_closed(self):
        """A connection garbage-collected while open does not linger."""
        import gc

        from twisted.logger import globalLogPublisher

        logged = []
        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        readers = len(reactor.getReaders())
        conn = dbapi.connect(self.dsn, application_name="forgotten")
        conn.cursor().execute("SELECT 1")
        pid = conn.raw_connection.get_backend_pid()
        del conn
        gc.collect()
        sleep(0.05)
        self.assertEqual(len(reactor.getReaders()), readers)
        for _ in range(100):  # the backend exits once it reads the goodbye
            if not self.admin("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,)):
                break
            sleep(0.02)
        else:
            self.fail("the backend of a dropped connection is still there")
        self.assertTrue(any("garbage-collected" in str(e.get("log_format")) for e in logged))


class CursorTests(DatabaseTestCase):
    def test_execute_and_fetch(self):
        conn = self.connect()
        cur = conn.cursor()
        cur.execute(
            "SELECT n, 'row ' || n AS label FROM generate_series(1, %(n)s) n", {"n": 5}
        )
        self.assertEqual([c.name for c in cur.description], ["n", "label"])
        self.assertEqual(cur.rowcount, 5)
        self.assertEqual(cur.statusmessage, "SELECT 5")
        self.assertEqual(cur.fetchone(), (1, "row 1"))
        cur.arraysize = 2
        self.assertEqual(cur.fetchmany(), [(2, "row 2"), (3, "row 3")])
        self.assertEqual(list(cur), [(4, "row 4"), (5, "row 5")])
        self.assertIsNone(cur.fetchone())
        self.assertEqual(cur.mogrify("SELECT %s", ("it's",)), b"SELECT 'it''s'")
        cur.execute("SELECT 1; SELECT 2")  # several statements: last result
        self.assertEqual(cur.fetchall(), [(2,)])
        cur.close()
        self.assertTrue(cur.closed)

    def test_errors_are_psycopg2_classes(self):
        conn = self.connect()
        cur = conn.cursor()
        cur.execute("CREATE TABLE uniq (id int PRIMARY KEY)")
        cur.execute("INSERT INTO uniq VALUES (1)")
        with self.assertRaises(psycopg2.IntegrityError):
            cur.execute("INSERT INTO uniq VALUES (1)")
        with self.assertRaises(psycopg2.errors.InFailedSqlTransaction):
            cur.execute("SELECT 1")
        conn.rollback()
        with self.assertRaises(psycopg2.ProgrammingError):
            cur.execute("SELEKT 1")
        conn.rollback()
        cur.execute("SELECT 1")
        self.assertEqual(cur.fetchone(), (1,))

    def test_notices(self):
        conn = self.connect()
        conn.cursor().execute("DO $$ BEGIN RAISE NOTICE 'hello there'; END $$")
        self.assertIn("hello there", conn.notices[-1])

    def test_copy_refused_before_sending(self):
        conn = self.connect()
        cur = conn.cursor()
        for sql in (
            "COPY (SELECT 1) TO STDOUT",
            "  copy pg_class FROM STDIN",
            "/* comment */ COPY x FROM STDIN",
            "SELECT 1; COPY x FROM STDIN",
        ):
            with self.assertRaises(psycopg2.NotSupportedError) as ctx:
                cur.execute(sql)
            self.assertIn("asynchronous", str(ctx.exception))
        self.assertRaises(psycopg2.NotSupportedError, cur.copy_expert, "COPY x TO STDOUT", None)
        cur.execute("SELECT 'COPY is fine inside a string'")
        self.assertEqual(cur.fetchone(), ("COPY is fine inside a string",))

    def test_copy_in_data_is_not_refused(self):
        """Only the statement is checked, never the values bound into it."""
        conn = self.connect()
        cur = conn.cursor()
        cur.execute("CREATE TEMP TABLE notes (v text)")
        texts = ["x;COPY t FROM STDIN", "; copy", "COPY (SELECT 1) TO STDOUT"]
        cur.executemany("INSERT INTO notes (v) VALUES (%s)", [(t,) for t in texts])
        cur.executemany("UPDATE notes SET v = v WHERE v = %s", [(t,) for t in texts])
        cur.execute("SELECT v FROM notes WHERE v = %s", (texts[0],))
        self.assertEqual(cur.fetchall(), [(texts[0],)])
        with self.assertRaises(psycopg2.NotSupportedError):
            cur.executemany("COPY notes FROM STDIN", [()])

    def test_composable_queries(self):
        """psycopg2.sql objects work as they do with psycopg2."""
        from psycopg2 import sql

        conn = self.connect()
        cur = conn.cursor()
        query = sql.SQL("SELECT {} AS {}").format(sql.Literal("x"), sql.Identifier("a b"))
        cur.execute(query)
        self.assertEqual((cur.fetchone(), cur.description[0].name), (("x",), "a b"))
        cur.execute(sql.SQL("SELECT %s + {}").format(sql.Literal(1)), (41,))
        self.assertEqual(cur.fetchone(), (42,))
        self.assertIn(b"'y'", cur.mogrify(sql.SQL("SELECT {}").format(sql.Literal("y"))))
        named = conn.cursor("named")
        named.execute(sql.SQL("SELECT generate_series(1, {})").format(sql.Literal(3)))
        self.assertEqual(named.fetchall(), [(1,), (2,), (3,)])
        conn.rollback()
        with self.assertRaises(TypeError):
            cur.execute(42)

    def test_two_fibers_one_connection(self):
        conn = self.connect()
        first = run_in_fiber(lambda: conn.cursor().execute("SELECT pg_sleep(0.2)"))

        def second():
            conn.cursor().execute("SELECT 1")

        with self.assertRaises(psycopg2.ProgrammingError) as ctx:
            await_deferred(run_in_fiber(second))
        self.assertIn("another fiber", str(ctx.exception))
        await_deferred(first)
        cur = conn.cursor()
        cur.execute("SELECT 2")
        self.assertEqual(cur.fetchone(), (2,))

    def test_callproc(self):
        conn = self.connect()
        cur = conn.cursor()
        cur.callproc("lower", ("ABC",))
        self.assertEqual(cur.fetchone(), ("abc",))


class TransactionTests(DatabaseTestCase):
    def setUp(self):
        self.admin("DROP TABLE IF EXISTS t; CREATE TABLE t (id int PRIMARY KEY, v text)")

    def count(self):
        return self.admin("SELECT count(*) FROM t")[0][0]

    def test_commit_and_rollback(self):
        conn = self.connect()
        cur = conn.cursor()
        cur.execute("INSERT INTO t VALUES (1, 'a')")
        self.assertTrue(conn.in_transaction)
        self.assertEqual(self.count(), 0)  # not visible before commit
        conn.commit()
        self.assertFalse(conn.in_transaction)
        self.assertEqual(self.count(), 1)
        cur.execute("INSERT INTO t VALUES (2, 'b')")
        conn.rollback()
        self.assertEqual(self.count(), 1)
        conn.commit()  # no transaction: a no-op
        conn.rollback()

    def test_context_manager_commits_or_rolls_back(self):
        conn = self.connect()
        with conn:
            conn.cursor().execute("INSERT INTO t VALUES (1, 'a')")
        self.assertEqual(self.count(), 1)
        with self.assertRaises(ZeroDivisionError):
            with conn:
                conn.cursor().execute("INSERT INTO t VALUES (2, 'b')")
                1 / 0
        self.assertEqual(self.count(), 1)
        self.assertFalse(conn.closed)

    def test_autocommit_sends_no_begin(self):
        conn = self.connect()
        conn.autocommit = True
        cur = conn.cursor()
        cur.execute("INSERT INTO t VALUES (1, 'a')")
        self.assertEqual(
            conn.get_transaction_status(), psycopg2.extensions.TRANSACTION_STATUS_IDLE
        )
        self.assertEqual(self.count(), 1)
        # Server side: each statement ran in a transaction of its own.
        cur.execute("SELECT txid_current()")
        first = cur.fetchone()[0]
        cur.execute("SELECT txid_current()")
        self.assertNotEqual(cur.fetchone()[0], first)

    def test_isolation_levels_seen_by_server(self):
        conn = self.connect()
        cur = conn.cursor()
        for level, name in [
            (psycopg2.extensions.ISOLATION_LEVEL_SERIALIZABLE, "serializable"),
            ("REPEATABLE READ", "repeatable read"),
            ("read committed", "read committed"),
            (None, "read committed"),
        ]:
            conn.isolation_level = level
            cur.execute("SHOW transaction_isolation")
            self.assertEqual(cur.fetchone()[0], name)
            conn.rollback()
        conn.set_session(readonly=True, deferrable=True, isolation_level="SERIALIZABLE")
        cur.execute("SHOW transaction_read_only")
        self.assertEqual(cur.fetchone()[0], "on")
        cur.execute("SHOW transaction_deferrable")
        self.assertEqual(cur.fetchone()[0], "on")
        with self.assertRaises(psycopg2.errors.ReadOnlySqlTransaction):
            cur.execute("INSERT INTO t VALUES (9, 'no')")
        conn.rollback()
        self.assertRaises(ValueError, setattr, conn, "isolation_level", "SOMETIMES")

    def test_settings_refused_inside_transaction(self):
        conn = self.connect()
        conn.cursor().execute("SELECT 1")
        with self.assertRaises(psycopg2.ProgrammingError):
            conn.autocommit = True
        with self.assertRaises(psycopg2.ProgrammingError):
            conn.set_session(isolation_level="SERIALIZABLE")
        conn.rollback()
        conn.autocommit = True

    def test_unsupported_raise_clearly(self):
        conn = self.connect()
        self.assertRaises(psycopg2.NotSupportedError, conn.lobject)
        self.assertRaises(psycopg2.NotSupportedError, conn.set_client_encoding, "latin1")


class ExecuteManyTests(DatabaseTestCase):
    """
    Statements and round trips counted on the server: a statement-level
    trigger logs statement_timestamp(), which is the time the server received
    the client's query message, shared by all statements of one message.
    """

    def setUp(self):
        self.admin(
            """
            DROP TABLE IF EXISTS t, stmt_log;
            CREATE TABLE t (id int PRIMARY KEY, v text);
            CREATE TABLE stmt_log (received timestamptz);
            CREATE OR REPLACE FUNCTION log_stmt() RETURNS trigger AS $$
              BEGIN INSERT INTO stmt_log VALUES (statement_timestamp());
              RETURN NULL; END $$ LANGUAGE plpgsql;
            CREATE TRIGGER logged AFTER INSERT OR UPDATE ON t
              FOR EACH STATEMENT EXECUTE FUNCTION log_stmt();
            """
        )

    def counts(self):
        """(statements, round trips) logged so far."""
        return self.admin("SELECT count(*), count(DISTINCT received) FROM stmt_log")[0]

    def test_insert_is_one_statement_per_page(self):
        conn = self.connect()
        cur = conn.cursor()
        rows = [(i, f"value {i}") for i in range(2500)]
        cur.executemany("INSERT INTO t (id, v) VALUES (%s, %s)", rows)
        self.assertEqual(cur.rowcount, 2500)
        conn.commit()
        self.assertEqual(self.admin("SELECT count(*), max(v) FROM t")[0], (2500, "value 999"))
        # 2500 rows, pages of 1000: three INSERT statements, three round trips.
        self.assertEqual(self.counts(), (3, 3))

    def test_update_is_batched(self):
        conn = self.connect()
        cur = conn.cursor()
        cur.executemany(
            "INSERT INTO t (id, v) VALUES (%(id)s, %(v)s)",
            [{"id": i, "v": "old"} for i in range(300)],
        )
        conn.commit()
        self.assertEqual(self.counts(), (1, 1))
        cur.executemany(
            "UPDATE t SET v = %(v)s WHERE id = %(id)s",
            [{"id": i, "v": f"new {i}"} for i in range(300)],
        )
        conn.commit()
        statements, round_trips = self.counts()
        self.assertEqual(statements, 301)
        # 300 UPDATEs in pages of 100 statements: three round trips.
        self.assertEqual(round_trips, 1 + 3)
        self.assertEqual(
            self.admin("SELECT count(*) FROM t WHERE v LIKE 'new %%'")[0][0], 300
        )
        self.assertEqual(cur.rowcount, -1)  # not knowable for a batch

    def test_empty(self):
        cur = self.connect().cursor()
        cur.executemany("INSERT INTO t VALUES (%s, %s)", [])
        self.assertEqual(cur.rowcount, 0)


class ServerCursorTests(DatabaseTestCase):
    def test_named_cursor_batches(self):
        conn = self.connect()
        cur = conn.cursor("big")
        cur.itersize = 100
        cur.execute("SELECT n FROM generate_series(1, %s) n", (1050,))
        self.assertEqual(cur.description[0].name, "n")
        self.assertEqual(cur.fetchone(), (1,))
        self.assertEqual(len(cur.fetchmany(250)), 250)
        rest = list(iter(cur.fetchone, None))
        self.assertEqual(rest[-1], (1050,))
        self.assertEqual(len(rest), 1050 - 251)
        cur.close()
        conn.commit()

    def test_fetchall(self):
        conn = self.connect()
        cur = conn.cursor("all")
        cur.itersize = 10
        cur.execute("SELECT n FROM generate_series(1, 35) n")
        self.assertEqual(cur.fetchone(), (1,))
        self.assertEqual(cur.fetchall(), [(n,) for n in range(2, 36)])
        self.assertEqual(cur.fetchall(), [])

    def test_autocommit_needs_withhold(self):
        conn = self.connect()
        conn.autocommit = True
        self.assertRaises(psycopg2.ProgrammingError, conn.cursor("c").execute, "SELECT 1")
        cur = conn.cursor("held", withhold=True)
        cur.execute("SELECT n FROM generate_series(1, 3) n")
        self.assertEqual(cur.fetchall(), [(1,), (2,), (3,)])

    def test_memory_stays_bounded(self):
        """A result far larger than memory growth allowed streams through."""
        conn = self.connect()
        cur = conn.cursor("stream")
        cur.itersize = 2000
        cur.execute("SELECT n, repeat('x', 200) FROM generate_series(1, 500000) n")
        base = rss_bytes()
        peak = base
        count = 0
        for row in cur:
            count += 1
            if count % 20000 == 0:
                peak = max(peak, rss_bytes())
        self.assertEqual(count, 500000)
        # The whole result as tuples of Python strings is ~150 MB.
        self.assertLess(peak - base, 40 * 1024 * 1024)
        conn.rollback()


class TypeTests(DatabaseTestCase):
    def roundtrip(self, sql, params=None):
        cur = self.connect().cursor()
        cur.execute(sql, params)
        return cur.fetchone()

    def test_types(self):
        u = uuid.uuid4()
        row = self.roundtrip(
            "SELECT %s::json, %s::jsonb, %s::uuid, ARRAY[1,2,3], 1.50::numeric, "
            "'2024-01-02 03:04:05+00'::timestamptz, '1 day 2 hours'::interval, "
            "%s::bytea, int4range(1, 5), '{a,b}'::text[]",
            (
                psycopg2.extras.Json({"a": 1}),
                psycopg2.extras.Json([1, "x"]),
                str(u),
                psycopg2.Binary(b"\x00\xff"),
            ),
        )
        self.assertEqual(row[0], {"a": 1})
        self.assertEqual(row[1], [1, "x"])
        self.assertEqual(row[2], u)
        self.assertEqual(row[3], [1, 2, 3])
        self.assertEqual(row[4], decimal.Decimal("1.50"))
        self.assertEqual(
            row[5], datetime.datetime(2024, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc)
        )
        self.assertEqual(row[6], datetime.timedelta(days=1, hours=2))
        self.assertEqual(bytes(row[7]), b"\x00\xff")
        self.assertEqual((row[8].lower, row[8].upper), (1, 5))
        self.assertEqual(row[9], ["a", "b"])

    def test_uuid_parameter(self):
        u = uuid.uuid4()
        self.assertEqual(self.roundtrip("SELECT %s", (u,))[0], u)

    def test_hstore(self):
        self.admin("CREATE EXTENSION IF NOT EXISTS hstore")
        conn = self.connect()
        self.assertTrue(conn.register_hstore())
        cur = conn.cursor()
        cur.execute("SELECT %s::hstore, ARRAY[%s::hstore]", ({"a": "1", "b": None}, {"c": "d"}))
        self.assertEqual(cur.fetchone(), ({"a": "1", "b": None}, [{"c": "d"}]))

    def test_hstore_missing(self):
        self.admin("DROP EXTENSION IF EXISTS hstore")
        self.assertFalse(self.connect().register_hstore())


class UnstorableValueTests(DatabaseTestCase):
    """
    Values PostgreSQL cannot store are refused before anything is sent, as
    psycopg2 does, but as a DataError (still a ValueError).
    """

    def check(self, value):
        conn = self.connect()
        cur = conn.cursor()
        for run in (
            lambda: cur.execute("SELECT %s", (value,)),
            lambda: cur.executemany("SELECT %s", [("ok",), (value,)]),
            lambda: conn.cursor("named").execute("SELECT %s", (value,)),
        ):
            with self.assertRaises(psycopg2.DataError) as ctx:
                run()
            self.assertIsInstance(ctx.exception, ValueError)
            self.assertNotIn(value, str(ctx.exception))  # no data in messages
            conn.rollback()
        cur.execute("SELECT 1")  # the connection is fine
        self.assertEqual(cur.fetchone(), (1,))

    def test_nul_character(self):
        self.check("secret\x00name")

    def test_unpaired_surrogate(self):
        self.check("secret\ud800name")

    def test_other_value_errors_unchanged(self):
        cur = self.connect().cursor()
        with self.assertRaises(ValueError) as ctx:
            cur.execute("SELECT %s %y", (1, 2))  # a programming error
        self.assertNotIsInstance(ctx.exception, psycopg2.DataError)


class FaultTests(DatabaseTestCase):
    def pid_of(self, conn):
        cur = conn.cursor()
        cur.execute("SELECT pg_backend_pid()")
        pid = cur.fetchone()[0]
        conn.rollback()
        return pid

    def test_backend_killed_while_idle(self):
        """
        check_alive() learns that the server ended an idle connection
        without a round trip; the connection then reports itself closed.
        """
        conn = self.connect()
        pid = self.pid_of(conn)
        self.assertTrue(conn.check_alive())
        self.admin("SELECT pg_terminate_backend(%s)", (pid,))
        sleep(0.2)  # the server's goodbye reaches our socket
        self.assertFalse(conn.check_alive())
        self.assertTrue(conn.closed)
        with self.assertRaises(psycopg2.InterfaceError) as ctx:
            conn.cursor().execute("SELECT 1")
        self.assertIn("the server ended it while it was idle", str(ctx.exception))
        # Nothing logged as an unhandled error: trial would fail the test.

    def test_backend_killed_while_idle_then_used(self):
        """
        Used without a check, a connection the server ended while idle fails
        as psycopg2's does (OperationalError), then reports itself closed.
        """
        conn = self.connect()
        pid = self.pid_of(conn)
        self.admin("SELECT pg_terminate_backend(%s)", (pid,))
        sleep(0.2)
        with self.assertRaises(psycopg2.OperationalError):
            conn.cursor().execute("SELECT 1")
        self.assertTrue(conn.closed)
        with self.assertRaises(psycopg2.InterfaceError):
            conn.cursor().execute("SELECT 1")

    def test_idle_connection_not_watched(self):
        """
        Outside a transaction, with no NOTIFY observer, a connection is not a
        reactor selectable (trial's clean-reactor check, pooled connections
        shared by tests); inside one, and with observers, it is.
        """
        conn = self.connect()
        wire = conn._wire
        cur = conn.cursor()
        cur.execute("SELECT 1")  # opens a transaction
        self.assertIn(wire, reactor.getReaders())
        # What trial's dirty-reactor report would show: what holds it.
        self.assertIn("a transaction open", repr(wire))
        self.assertIn("rollback()", repr(wire))
        conn.rollback()
        self.assertNotIn(wire, reactor.getReaders())
        conn.autocommit = True
        cur.execute("SELECT 1")
        # Autocommit: watched between statements, until the unit of work
        # ends (rollback()/commit(), which a pool's reset on return calls).
        self.assertIn(wire, reactor.getReaders())
        conn.rollback()
        self.assertNotIn(wire, reactor.getReaders())
        cur.execute("SELECT 1")
        conn.autocommit = False
        self.assertNotIn(wire, reactor.getReaders())
        conn.autocommit = True
        observer = lambda n: None  # noqa: E731
        conn.add_notify_observer(observer)
        self.assertIn(wire, reactor.getReaders())
        conn.remove_notify_observer(observer)
        self.assertNotIn(wire, reactor.getReaders())

    def test_backend_killed_mid_query(self):
        conn = self.connect()
        pid = self.pid_of(conn)
        query = run_in_fiber(lambda: conn.cursor().execute("SELECT pg_sleep(10)"))
        sleep(0.2)
        self.admin("SELECT pg_terminate_backend(%s)", (pid,))
        with self.assertRaises(psycopg2.OperationalError):
            await_deferred(query)
        self.assertTrue(conn.closed)
        with self.assertRaises(psycopg2.InterfaceError):
            conn.cursor().execute("SELECT 1")

    def test_server_restart(self):
        pg = TemporaryPostgres().start()
        self.addCleanup(pg.stop)
        conn = dbapi.connect(pg.dsn())
        self.addCleanup(conn.close)
        conn.cursor().execute("SELECT 1")
        conn.rollback()
        # Test set-up: pg_ctl blocks the reactor for the restart's second.
        pg.restart()
        sleep(0.2)
        with self.assertRaises((psycopg2.OperationalError, psycopg2.InterfaceError)):
            conn.cursor().execute("SELECT 1")
        self.assertTrue(conn.closed)
        fresh = dbapi.connect(pg.dsn())
        cur = fresh.cursor()
        cur.execute("SELECT 1")
        self.assertEqual(cur.fetchone(), (1,))
        fresh.close()


def start_proxy(testcase, target):
    """Run tests/tcp_proxy.py; return the port it listens on."""
    import sys

    from twisted.internet.defer import Deferred
    from twisted.internet.protocol import ProcessProtocol

    class Proxy(ProcessProtocol):
        def __init__(self):
            self.port = Deferred()
            self.ended = Deferred()
            self.out = b""

        def outReceived(self, data):
            self.out += data
            if b"\n" in self.out and not self.port.called:
                self.port.callback(int(self.out.split(b"\n")[0]))

        def processEnded(self, reason):
            if not self.port.called:
                self.port.errback(reason)
            self.ended.callback(None)

    proxy = Proxy()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    process = reactor.spawnProcess(
        proxy,
        sys.executable,
        [sys.executable, "-m", "tests.tcp_proxy", target],
        env=os.environ.copy(),
        path=root,
    )

    def stop():
        process.signalProcess("KILL")
        await_deferred(proxy.ended)

    testcase.addCleanup(stop)
    return await_deferred(proxy.port, timeout=30)


class CancellationTests(DatabaseTestCase):
    def active_sleeps(self):
        return self.admin(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE query LIKE 'BEGIN;SELECT pg_sleep%%' AND state = 'active'"
        )[0][0]

    def test_cancel_fiber_cancels_query(self):
        conn = self.connect()
        seen = []

        def sleeper():
            try:
                conn.cursor().execute("SELECT pg_sleep(30)")
            except CancelledError:
                seen.append("cancelled")
                raise

        d = run_in_fiber(sleeper)
        sleep(0.3)
        self.assertEqual(self.active_sleeps(), 1)
        d.cancel()
        with self.assertRaises(CancelledError):
            await_deferred(d)
        # The fiber finishes the protocol in the background: wait for it.
        for _ in range(50):
            if seen:
                break
            sleep(0.02)
        self.assertEqual(seen, ["cancelled"])
        self.assertEqual(self.active_sleeps(), 0)
        # The connection stays usable once its transaction is rolled back.
        self.assertFalse(conn.closed)
        conn.rollback()
        cur = conn.cursor()
        cur.execute("SELECT 42")
        self.assertEqual(cur.fetchone(), (42,))

    def assert_no_sleeps_soon(self):
        """The cancel is sent in the background of the cancelled fiber."""
        for _ in range(250):
            if not self.active_sleeps():
                return
            sleep(0.02)
        self.assertEqual(self.active_sleeps(), 0)

    def settle(self, conn):
        """Wait until the cancelled fiber has let go of ``conn``."""
        for _ in range(250):
            if conn._user is None:
                return
            sleep(0.02)
        self.fail("the cancelled fiber kept the connection")

    def cancel_a_sleep(self, conn, running=0.2, cursor=None):
        """
        Start ``pg_sleep(30)`` on ``conn`` (with ``cursor`` if given) in a
        fiber, cancel the fiber after ``running`` seconds, check the query
        ends on the server and the fiber lets go of ``conn``.
        """
        cursor = cursor or conn.cursor()
        d = run_in_fiber(cursor.execute, "SELECT pg_sleep(30)")
        sleep(running)
        self.assertEqual(self.active_sleeps(), 1)
        d.cancel()
        with self.assertRaises(CancelledError):
            await_deferred(d)
        self.assert_no_sleeps_soon()
        self.settle(conn)

    def spy_on_pqcancel(self, conn):
        """Count the calls of libpq's blocking cancel on ``conn``."""
        calls = []

        class Spy:
            def __init__(self, raw):
                self._spied = raw

            def cancel(self):
                calls.append(True)
                return self._spied.cancel()

            def __getattr__(self, name):
                return getattr(self._spied, name)

        conn._raw = Spy(conn._raw)
        return calls

    def test_cancel_does_not_block_the_reactor(self):
        """The cancel goes through a connection the fiber waits on, not PQcancel."""
        conn = self.connect()
        cursor = conn.cursor()  # a psycopg2 cursor: made before the spy
        pqcancels = self.spy_on_pqcancel(conn)
        self.cancel_a_sleep(conn, cursor=cursor)
        self.assertEqual(pqcancels, [])
        conn.rollback()

    def test_cancel_through_a_proxy(self):
        """
        Behind a TCP proxy (as behind PgBouncer, or a load balancer) the
        server sees another client port: the helper connection finds no such
        backend and cancels nothing; PQcancel, through the proxy, does it.
        """
        params = psycopg2.extensions.parse_dsn(self.dsn)
        host, pgport = params.get("host", "localhost"), params.get("port", "5432")
        if host.startswith("/"):
            target = f"unix:path={host}/.s.PGSQL.{pgport}"
        else:
            target = f"tcp:host={host}:port={pgport}"
        # In a process of its own: PQcancel blocks this process's reactor.
        port = start_proxy(self, target)
        conn = dbapi.connect(self.dsn, host="127.0.0.1", port=port)
        self.addCleanup(conn.close)
        cursor = conn.cursor()
        pqcancels = self.spy_on_pqcancel(conn)
        self.cancel_a_sleep(conn, cursor=cursor)
        self.assertEqual(pqcancels, [True])
        conn.rollback()

    def test_cancel_without_a_spare_connection(self):
        """
        The cancel normally goes through pg_cancel_backend() on a connection
        of its own; when the server refuses one (here the role's connection
        limit), libpq's cancel request still does it.
        """
        role = f"limited_{uuid.uuid4().hex[:8]}"
        password = psycopg2.extensions.parse_dsn(self.dsn).get("password")
        self.admin(
            f"CREATE ROLE {role} LOGIN CONNECTION LIMIT 1 PASSWORD %s", (password,)
        )
        self.addCleanup(self.admin, f"DROP ROLE {role}")
        conn = dbapi.connect(self.dsn, user=role)
        self.addCleanup(conn.close)
        with self.assertRaises(psycopg2.OperationalError):
            dbapi.connect(self.dsn, user=role).close()  # the limit holds
        self.cancel_a_sleep(conn, running=0.3)
        conn.rollback()
        cur = conn.cursor()
        cur.execute("SELECT current_user")
        self.assertEqual(cur.fetchone(), (role,))

    def test_wait_timeout_cancels_query(self):
        from txfiberdb.fiber import WaitTimeout

        conn = self.connect()

        def sleeper():
            with self.assertRaises(CancelledError):
                conn.cursor().execute("SELECT pg_sleep(30)")

        d = run_in_fiber(sleeper)
        with self.assertRaises(WaitTimeout):
            await_deferred(d, timeout=0.3)
        self.assert_no_sleeps_soon()
        self.settle(conn)

    def test_connection_cancel_method(self):
        conn = self.connect()
        d = run_in_fiber(lambda: conn.cursor().execute("SELECT pg_sleep(30)"))
        sleep(0.2)
        conn.cancel()
        with self.assertRaises(psycopg2.errors.QueryCanceled):
            await_deferred(d)
        conn.rollback()
        self.assertEqual(self.active_sleeps(), 0)


class NotifyTests(DatabaseTestCase):
    def test_listen_notify(self):
        conn = self.connect()
        conn.autocommit = True
        got = []
        conn.add_notify_observer(lambda n: got.append((n.channel, n.payload)))
        conn.cursor().execute("LISTEN shop_events")
        self.admin("NOTIFY shop_events, 'restocked'")
        for _ in range(100):
            if got:
                break
            sleep(0.01)
        self.assertEqual(got, [("shop_events", "restocked")])
