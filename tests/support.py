"""
Shared test fixtures: a fresh database per test case class on the test server.
"""

import uuid

from psycopg2.extensions import make_dsn

from txfiberdb import dbapi
from txfiberdb.testing import FiberTestCase, dsn_to_url, test_server


def _create_database():
    """CREATE DATABASE through the fibered driver (runs in a fiber)."""
    name = f"txfiberdb_test_{uuid.uuid4().hex[:12]}"
    conn = dbapi.connect(test_server())
    try:
        conn.autocommit = True
        conn.cursor().execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
    finally:
        conn.close()
    return make_dsn(test_server(), dbname=name)


class DatabaseTestCase(FiberTestCase):
    """
    A FiberTestCase with a database of its own (``self.dsn``, ``self.url``),
    created on the class's first test (trial has no setUpClass) and thrown
    away with the test server.
    """

    @property
    def dsn(self):
        cls = type(self)
        if "_dsn" not in cls.__dict__:
            cls._dsn = _create_database()
        return cls._dsn

    @property
    def url(self):
        return dsn_to_url(self.dsn)

    def connect(self, **kwargs):
        conn = dbapi.connect(self.dsn, **kwargs)
        self.addCleanup(conn.close)
        return conn

    def admin(self, sql, params=None):
        """Run ``sql`` on a separate autocommit connection; return all rows."""
        conn = dbapi.connect(self.dsn)
        try:
            conn.autocommit = True
            cur = conn.cursor()
            cur.execute(sql, params)
            return cur.fetchall() if cur.description else None
        finally:
            conn.close()
