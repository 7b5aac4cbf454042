"""
Auto-prepare (``prepare_threshold``): statements run often on a connection
are prepared on the server with SQL ``PREPARE`` and run with ``EXECUTE``,
with psycopg 3's semantics.  Against a real PostgreSQL: what the server has
prepared is read from ``pg_prepared_statements``, results are compared with
the unprepared path.
"""

import datetime
import decimal
import uuid

import psycopg2
from sqlalchemy import create_engine, text

from txfiberdb import dbapi

from .support import DatabaseTestCase

# Statements and parameters whose results must not change when prepared:
# the declared parameter types must give what psycopg2's literals give.
CASES = [
    ("SELECT %s", (5,)),
    ("SELECT %s", (-5,)),
    ("SELECT %s", (2**40,)),
    ("SELECT %s", (-(2**31),)),
    ("SELECT %s", (-(2**31) - 1,)),
    ("SELECT %s", (2**31,)),
    ("SELECT %s", (-(2**63),)),
    ("SELECT %s", (2**63,)),
    ("SELECT %s", (10**30,)),
    ("SELECT %s", (1.5,)),
    ("SELECT %s", (float("inf"),)),
    ("SELECT %s", (decimal.Decimal("5"),)),
    ("SELECT %s", (decimal.Decimal("1.50"),)),
    ("SELECT %s", (decimal.Decimal("NaN"),)),
    ("SELECT %s", (True,)),
    ("SELECT %s", (None,)),
    ("SELECT %s", ("text",)),
    ("SELECT %s", (b"\x00\x01",)),
    ("SELECT %s", (datetime.datetime(2020, 1, 2, 3, 4, 5),)),
    ("SELECT %s", (datetime.datetime(2020, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc),)),
    ("SELECT %s", (datetime.date(2020, 1, 2),)),
    ("SELECT %s", (datetime.time(3, 4, 5),)),
    ("SELECT %s", (datetime.timedelta(days=1, seconds=3),)),
    ("SELECT %s", (uuid.UUID("12345678-1234-5678-1234-567812345678"),)),
    ("SELECT %s + 1", (1.5,)),
    ("SELECT %s + 1", (5,)),
    ("SELECT %s / 2", (5,)),
    ("SELECT %s / 2", (decimal.Decimal("5"),)),
    ("SELECT %s || %s", ("a", "b")),
    ("SELECT %s IS NULL", (None,)),
    ("SELECT %s::int", ("12",)),
    ("SELECT pg_typeof(%s)::text", ("x",)),
    ("SELECT pg_typeof(%s)::text", (7,)),
    ("SELECT x FROM pt WHERE x = %s", (2,)),
    ("SELECT x FROM pt WHERE t = %s", ("two",)),
    ("SELECT x FROM pt WHERE ts > %s ORDER BY x", ("2020-01-01",)),
    ("SELECT x FROM pt WHERE t LIKE 't%%' ORDER BY x", ()),
    ("SELECT x FROM pt WHERE t LIKE %s ORDER BY x", ("t%",)),
    ("SELECT %(a)s, %(b)s, %(a)s", {"a": 1, "b": "b"}),
    ("SELECT 1", None),
    ("VALUES (%s, %s)", (1, "a")),
    ("SELECT x FROM pt WHERE x = ANY(%s)", ([1, 2],)),  # a list: unprepared
]


class PrepareTests(DatabaseTestCase):
    def setUp(self):
        self.admin(
            "DROP TABLE IF EXISTS pt; CREATE TABLE pt (x int, t text, ts timestamp);"
            "INSERT INTO pt VALUES (1, 'one', '2019-01-01'), (2, 'two', '2021-01-01')"
        )

    def prepared(self, conn):
        cur = conn.cursor()
        cur.execute(
            "SELECT name, statement FROM pg_prepared_statements "
            "WHERE name LIKE '\\_txf\\_%%' "
            "AND statement NOT LIKE '%%pg_prepared_statements%%' ORDER BY prepare_time"
        )
        return cur.fetchall()

    def test_prepared_after_threshold_runs(self):
        conn = self.connect(prepare_threshold=3)
        cur = conn.cursor()
        for i in range(3):
            cur.execute("SELECT x FROM pt WHERE x = %s", (1,))
            self.assertEqual(cur.fetchall(), [(1,)])
        self.assertEqual(self.prepared(conn), [])
        cur.execute("SELECT x FROM pt WHERE x = %s", (2,))
        self.assertEqual(cur.fetchall(), [(2,)])
        [(name, statement)] = self.prepared(conn)
        self.assertIn("SELECT x FROM pt WHERE x = $1", statement)
        self.assertIn(name.encode(), cur.query)
        self.assertEqual(cur.statusmessage, "SELECT 1")
        self.assertEqual(cur.rowcount, 1)

    def test_threshold_none_never_prepares(self):
        conn = self.connect()
        self.assertIsNone(conn.prepare_threshold)
        cur = conn.cursor()
        for _ in range(10):
            cur.execute("SELECT x FROM pt WHERE x = %s", (1,))
        self.assertEqual(self.prepared(conn), [])

    def test_results_equal_unprepared(self):
        plain = self.connect()
        prepared = self.connect(prepare_threshold=0)
        for autocommit in (False, True):
            plain.autocommit = prepared.autocommit = autocommit
            for sql, params in CASES:
                expected = []
                got = []
                for conn, out in ((plain, expected), (prepared, got)):
                    cur = conn.cursor()
                    for _ in range(2):
                        cur.execute(sql, params)
                        out.append(
                            (
                                repr(cur.fetchall()),  # NaN != NaN
                                [(d.name, d.type_code) for d in cur.description],
                                cur.rowcount,
                                cur.statusmessage,
                            )
                        )
                self.assertEqual(got, expected, f"{sql} {params!r}")
                self.assertEqual(
                    prepared.get_transaction_status(),
                    plain.get_transaction_status(),
                    "a refused PREPARE left its mark on the transaction",
                )
            plain.rollback()
            prepared.rollback()
        names = [s for _, s in self.prepared(prepared)]
        self.assertTrue(any("WHERE x = $1" in s for s in names), names)
        self.assertFalse(any("ANY($1)" in s for s in names), names)

    def test_writes_prepared(self):
        conn = self.connect(prepare_threshold=0)
        cur = conn.cursor()
        for i in range(3):
            cur.execute("INSERT INTO pt (x, t) VALUES (%s, %s)", (10 + i, "w"))
            self.assertEqual(cur.rowcount, 1)
        cur.execute("UPDATE pt SET t = %s WHERE x >= %s", ("u", 10))
        self.assertEqual((cur.rowcount, cur.statusmessage), (3, "UPDATE 3"))
        conn.commit()
        self.assertEqual(self.admin("SELECT count(*) FROM pt WHERE t = 'u'"), [(3,)])

    def test_not_prepared(self):
        conn = self.connect(prepare_threshold=0)
        conn.autocommit = True
        cur = conn.cursor()
        for sql in (
            "SELECT 1; SELECT 2",
            "SET application_name = 'x'",
            "CREATE TEMP TABLE IF NOT EXISTS tmp_np (x int)",
            "SHOW server_version",
        ):
            cur.execute(sql)
            cur.execute(sql)
        conn.autocommit = False
        named = conn.cursor("c1")
        named.execute("SELECT x FROM pt")
        named.fetchall()
        named.close()
        conn.rollback()
        self.assertEqual(self.prepared(conn), [])

    def test_lru_deallocates(self):
        conn = self.connect(prepare_threshold=0, prepared_max=2)
        cur = conn.cursor()
        for n in range(4):
            cur.execute(f"SELECT {n} + %s", (1,))
            self.assertEqual(cur.fetchall(), [(n + 1,)])
        statements = [s for _, s in self.prepared(conn)]
        self.assertLessEqual(len(statements), 3)  # the 4th's drop goes with the 5th
        cur.execute("SELECT 9 + %s", (1,))
        statements = [s for _, s in self.prepared(conn)]
        self.assertEqual(len(statements), 2, statements)
        self.assertIn("SELECT 9 + $1", statements[-1])
        cur.execute("SELECT 0 + %s", (1,))  # evicted: prepared again
        self.assertEqual(cur.fetchall(), [(1,)])

    def test_plan_invalidated_by_ddl_outside_transaction(self):
        """``cached plan must not change result type`` at the first statement
        of a transaction: re-run unprepared, the user's query succeeds, the
        statement is prepared again on its next run."""
        conn = self.connect(prepare_threshold=0)
        cur = conn.cursor()
        cur.execute("SELECT * FROM pt WHERE x = %s", (1,))
        cur.execute("SELECT * FROM pt WHERE x = %s", (1,))
        conn.rollback()
        self.admin("ALTER TABLE pt ADD COLUMN extra int DEFAULT 7")
        cur.execute("SELECT * FROM pt WHERE x = %s", (1,))
        self.assertEqual(cur.fetchall()[0][-1], 7)
        self.assertEqual(conn.get_transaction_status(), 2)  # in its transaction
        cur.execute("SELECT * FROM pt WHERE x = %s", (1,))
        self.assertEqual(cur.fetchall()[0][-1], 7)
        self.assertIn(b"EXECUTE", cur.query)
        conn.commit()

    def test_plan_invalidated_by_ddl_in_autocommit(self):
        conn = self.connect(prepare_threshold=0)
        conn.autocommit = True
        cur = conn.cursor()
        cur.execute("SELECT * FROM pt WHERE x = %s", (1,))
        self.admin("ALTER TABLE pt ADD COLUMN extra2 int DEFAULT 8")
        cur.execute("SELECT * FROM pt WHERE x = %s", (1,))
        self.assertEqual(cur.fetchall()[0][-1], 8)

    def test_plan_invalidated_inside_a_transaction_raises(self):
        """Documented: inside a transaction that ran other statements, the
        failed EXECUTE has aborted it; the error is raised (as psycopg 3
        does) and the statement is prepared again afterwards."""
        conn = self.connect(prepare_threshold=0)
        cur = conn.cursor()
        cur.execute("SELECT * FROM pt WHERE x = %s", (1,))
        conn.commit()
        cur.execute("SELECT 1")  # a transaction in progress
        self.admin("ALTER TABLE pt ADD COLUMN extra3 int DEFAULT 9")
        with self.assertRaises(psycopg2.errors.FeatureNotSupported) as ctx:
            cur.execute("SELECT * FROM pt WHERE x = %s", (1,))
        self.assertIn("cached plan must not change result type", str(ctx.exception))
        conn.rollback()
        cur.execute("SELECT * FROM pt WHERE x = %s", (1,))
        self.assertEqual(cur.fetchall()[0][-1], 9)

    def test_user_discard_all_and_deallocate_all(self):
        conn = self.connect(prepare_threshold=0)
        conn.autocommit = True
        cur = conn.cursor()
        for reset in ("DISCARD ALL", "DEALLOCATE ALL"):
            cur.execute("SELECT x FROM pt WHERE x = %s", (1,))
            cur.execute("SELECT x FROM pt WHERE x = %s", (1,))
            self.assertEqual(len(self.prepared(conn)), 1)
            cur.execute(reset)
            self.assertEqual(self.prepared(conn), [])
            cur.execute("SELECT x FROM pt WHERE x = %s", (2,))
            self.assertEqual(cur.fetchall(), [(2,)])

    def test_statements_lost_behind_our_back(self):
        """A statement the server no longer has (a pooler switched server
        connections, a DEALLOCATE we did not see): re-run unprepared when
        safe; after three such losses auto-prepare turns itself off."""
        conn = self.connect(prepare_threshold=0)
        conn.autocommit = True
        cur = conn.cursor()
        for _ in range(3):
            cur.execute("SELECT x FROM pt WHERE x = %s", (1,))
            cur.execute("SELECT x FROM pt WHERE x = %s", (1,))
            # Hidden from the driver's DISCARD/DEALLOCATE check: a function.
            cur.execute("SELECT pg_catalog.set_config('x.y', 'z', false)")
            raw = conn.raw_connection.cursor()
            raw.execute("DEALLOCATE ALL")  # async: completes with the next poll
            import select

            while conn.raw_connection.poll() != psycopg2.extensions.POLL_OK:
                select.select([conn.raw_connection], [], [], 1)
            cur.execute("SELECT x FROM pt WHERE x = %s", (2,))
            self.assertEqual(cur.fetchall(), [(2,)])
        self.assertIsNone(conn._prepared)

    def test_names_unique_per_connection(self):
        a = self.connect(prepare_threshold=0)
        b = self.connect(prepare_threshold=0)
        for conn in (a, b):
            conn.cursor().execute("SELECT x FROM pt WHERE x = %s", (1,))
        self.assertNotEqual(self.prepared(a)[0][0], self.prepared(b)[0][0])

    def test_threshold_from_the_url(self):
        for query, expected in (("", 5), ("?prepare_threshold=none", None), ("?prepare_threshold=1", 1)):
            engine = create_engine(self.url + query, pool_size=1)
            try:
                with engine.connect() as c:
                    self.assertEqual(c.connection.dbapi_connection.prepare_threshold, expected)
                    for _ in range(7):
                        c.execute(text("SELECT x FROM pt WHERE x = :x"), {"x": 1})
                    n = c.execute(
                        text("SELECT count(*) FROM pg_prepared_statements WHERE name LIKE '\\_txf\\_%'")
                    ).scalar()
                    self.assertEqual(n, 0 if expected is None else 1)
            finally:
                engine.dispose()

    def test_bad_threshold(self):
        with self.assertRaises(ValueError):
            dbapi.connect(self.dsn, prepare_threshold=-1)

    def test_ddl_on_the_same_connection_forgets_prepared(self):
        """As psycopg 3: after CREATE/ALTER/DROP on the connection, its
        prepared statements are deallocated, so that a prepared ``SELECT *``
        never meets ``cached plan must not change result type`` from DDL of
        its own, even inside a transaction."""
        conn = self.connect(prepare_threshold=0)
        cur = conn.cursor()
        cur.execute("SELECT * FROM pt WHERE x = %s", (1,))
        cur.execute("ALTER TABLE pt ADD COLUMN own int DEFAULT 6")
        cur.execute("SELECT * FROM pt WHERE x = %s", (1,))
        self.assertEqual(cur.fetchall()[0][-1], 6)
        conn.commit()
        self.assertEqual(len(self.prepared(conn)), 1)

    def test_bad_placeholders_fail_as_unprepared(self):
        """What psycopg2 refuses is refused on every run, also once the
        statement would be due for preparing."""
        conn = self.connect(prepare_threshold=0)
        cur = conn.cursor()
        for sql, params, error in (
            ("SELECT 'a%'", (), IndexError),
            ("SELECT %s, 'a%'", (1,), IndexError),
            ("SELECT %d", (1,), ValueError),
            ("SELECT %(a)s", {"b": 1}, KeyError),
            ("SELECT %s, %s", (1,), IndexError),
        ):
            for _ in range(3):
                with self.assertRaises(error):
                    cur.execute(sql, params)
            conn.rollback()
        self.assertEqual(self.prepared(conn), [])

    def test_reconnect_starts_afresh(self):
        """A connection the server ended is replaced by the pool; the new one
        has no prepared statements, and prepares its own."""
        engine = create_engine(
            self.url + "?prepare_threshold=0", pool_size=1, max_overflow=0
        )
        self.addCleanup(engine.dispose)
        query = text("SELECT x FROM pt WHERE x = :x")
        with engine.connect() as c:
            self.assertEqual(c.execute(query, {"x": 1}).scalar(), 1)
            old = c.connection.dbapi_connection
        mine = [k for k in old._prepared.names if "FROM pt" in k[0]]
        self.assertEqual(len(mine), 1)
        self.admin("SELECT pg_terminate_backend(%s)", (old.get_backend_pid(),))
        from txfiberdb import sleep

        sleep(0.2)
        with engine.connect() as c:
            self.assertEqual(c.execute(query, {"x": 2}).scalar(), 2)
            new = c.connection.dbapi_connection
            self.assertIsNot(new, old)
            mine = [s for _, s in self.prepared(new) if "FROM pt" in s]
            self.assertEqual(len(mine), 1)
