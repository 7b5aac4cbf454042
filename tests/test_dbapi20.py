"""
PEP 249 conformance: Stuart Bishop's DB-API 2.0 test suite (``dbapi20.py``,
vendored as psycopg2 vendors it) against ``txfiberdb.dbapi`` in fibers, and
against psycopg2 (blocking) on the same server as the reference.

The suite leaves two tests to each driver (``test_nextset``,
``test_setoutputsize``); both are given psycopg2's behaviour here.
"""

import psycopg2
from twisted.trial.unittest import SynchronousTestCase

from txfiberdb import dbapi
from txfiberdb.testing import create_database

from . import dbapi20
from .support import DatabaseTestCase


class DriverSpecific:
    """The tests dbapi20 leaves to the driver, as psycopg2 behaves."""

    def test_nextset(self):
        # psycopg2 has nextset() and refuses it: one result set per execute.
        con = self._connect()
        try:
            cur = con.cursor()
            cur.execute("SELECT 1")
            with self.assertRaises(self.driver.NotSupportedError):
                cur.nextset()
        finally:
            con.close()

    def test_setoutputsize(self):
        # A no-op, as in psycopg2: the cursor still works afterwards.
        con = self._connect()
        try:
            cur = con.cursor()
            cur.setoutputsize(10, 0)
            cur.execute("SELECT repeat('x', 100)")
            self.assertEqual(len(cur.fetchone()[0]), 100)
        finally:
            con.close()


class TxfiberdbDBAPI20Tests(DriverSpecific, DatabaseTestCase, dbapi20.DatabaseAPI20Test):
    """Every test of the suite in a fiber (FiberTestCase), set-up included."""

    driver = dbapi

    def _connect(self):
        return dbapi.connect(self.dsn)


class Psycopg2DBAPI20Tests(
    DriverSpecific, SynchronousTestCase, dbapi20.DatabaseAPI20Test
):
    """The reference: psycopg2 itself, blocking, on the same server."""

    driver = psycopg2
    _dsn = None

    def _connect(self):
        cls = type(self)
        if cls._dsn is None:
            cls._dsn = create_database("txfiberdb_dbapi20")
        return psycopg2.connect(cls._dsn)
