"""
Auto-prepare behind PgBouncer in transaction mode, where a client's
consecutive transactions run on different server connections: with
``prepare_threshold=None`` (as documented) nothing is prepared; left on, the
driver finds its statements lost, re-runs them unprepared when safe and turns
auto-prepare off on the connection, and never runs a wrong statement.
Needs the ``pgbouncer`` binary (Debian package ``pgbouncer``) and root (it
runs as ``nobody``).
"""

import os
import shutil
import socket
import subprocess
import tempfile
import time

import psycopg2.extensions
from sqlalchemy import create_engine, text
from twisted.internet.defer import gatherResults

from txfiberdb import await_deferred, run_in_fiber

from .support import DatabaseTestCase


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PgBouncer:
    def __init__(self, dsn):
        params = psycopg2.extensions.parse_dsn(dsn)
        self.dir = tempfile.mkdtemp(prefix="txf_pgb_")
        self.port = _free_port()
        self.dbname = params["dbname"]
        with open(os.path.join(self.dir, "users.txt"), "w") as f:
            f.write(f'"{params.get("user", "postgres")}" ""\n')
        with open(os.path.join(self.dir, "pgb.ini"), "w") as f:
            f.write(
                f"[databases]\n* = host={params['host']} port={params['port']}\n"
                f"[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {self.port}\n"
                f"auth_type = trust\nauth_file = {self.dir}/users.txt\n"
                "pool_mode = transaction\ndefault_pool_size = 3\n"
                f"unix_socket_dir =\nlogfile = {self.dir}/pgb.log\n"
                f"pidfile = {self.dir}/pgb.pid\n"
            )
        os.chmod(self.dir, 0o777)
        for name in os.listdir(self.dir):
            os.chmod(os.path.join(self.dir, name), 0o666)
        subprocess.run(
            ["pgbouncer", "-d", "-u", "nobody", os.path.join(self.dir, "pgb.ini")],
            check=True,
            capture_output=True,
        )
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.1).close()
                break
            except OSError:
                time.sleep(0.05)
        self.user = params.get("user", "postgres")

    def url(self, query=""):
        return (
            f"postgresql+txpostgres://{self.user}@127.0.0.1:{self.port}/"
            f"{self.dbname}{query}"
        )

    def stop(self):
        try:
            with open(os.path.join(self.dir, "pgb.pid")) as f:
                pid = int(f.read())
            os.kill(pid, 15)
            for _ in range(100):
                os.kill(pid, 0)
                time.sleep(0.02)
        except (OSError, ValueError):
            pass
        shutil.rmtree(self.dir, ignore_errors=True)


class PgBouncerTransactionModeTests(DatabaseTestCase):
    def setUp(self):
        if shutil.which("pgbouncer") is None:
            self.skipTest("pgbouncer is not installed (apt-get install pgbouncer)")
        if os.geteuid() != 0:
            self.skipTest("starting pgbouncer as nobody needs root")
        self.admin(
            "DROP TABLE IF EXISTS pgb_t; CREATE TABLE pgb_t (id int PRIMARY KEY, v text);"
            "INSERT INTO pgb_t SELECT i, 'v' || i FROM generate_series(1, 50) i"
        )
        self.bouncer = PgBouncer(self.dsn)
        self.addCleanup(self.bouncer.stop)

    def run_requests(self, engine):
        """10 fibers x 20 transactions, each reading one row; all results
        checked."""
        wrong = []

        def worker(k):
            for i in range(20):
                n = (k * 20 + i) % 50 + 1
                with engine.connect() as c:
                    v = c.execute(text("SELECT v FROM pgb_t WHERE id = :n"), {"n": n})
                    got = v.scalar()
                    if got != f"v{n}":
                        wrong.append((n, got))
                    c.commit()

        await_deferred(gatherResults([run_in_fiber(worker, k) for k in range(10)]))
        return wrong

    def connections(self, engine):
        pool = engine.pool
        return [r.dbapi_connection for r in pool._pool._items if r.dbapi_connection]

    def test_prepare_threshold_none_prepares_nothing(self):
        engine = create_engine(
            self.bouncer.url("?prepare_threshold=none"), pool_size=10, max_overflow=0
        )
        self.addCleanup(engine.dispose)
        self.assertEqual(self.run_requests(engine), [])
        conns = self.connections(engine)
        self.assertTrue(conns)
        for conn in conns:
            self.assertIsNone(conn.prepare_threshold)

    def test_auto_prepare_left_on_is_safe(self):
        engine = create_engine(
            self.bouncer.url("?prepare_threshold=0"), pool_size=10, max_overflow=0
        )
        self.addCleanup(engine.dispose)
        self.assertEqual(self.run_requests(engine), [])
        self.assertEqual(self.run_requests(engine), [])
        conns = self.connections(engine)
        self.assertTrue(
            any(c._prepared is None for c in conns),
            "no connection found its statements lost and turned auto-prepare off",
        )
