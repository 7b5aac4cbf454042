"""
Fault drills: klein-demo (in this process, and once under twistd) against a
PostgreSQL of its own that the tests kill backends of, restart under load,
stop for seconds, and replace by a socket that never answers; hostile input;
the log an outage writes; one slow route against the rest.

Every bad input gets a clear 4xx, nothing is lost, the service recovers by
itself, and nothing is logged as an unhandled error (trial fails a test that
logs one).
"""

import os
import subprocess
import sys
import tempfile
import uuid

from psycopg2.extensions import make_dsn
from twisted.internet import protocol, reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.logger import formatEvent, globalLogPublisher

import klein_demo
from klein_demo.tap import Options, ShopService
from txfiberdb import await_deferred, dbapi, pool_stats, run_in_fiber, sleep
from txfiberdb.testing import FiberTestCase, TemporaryPostgres, dsn_to_url

from .test_klein import HTTPClient, RawRequest, running_queries, wait_until

_server = None


def fault_server():
    """
    A PostgreSQL for these drills only (they stop and restart it), started on
    first use and removed at exit.
    """
    global _server
    if _server is None:
        _server = TemporaryPostgres().start()
    return _server


class _Exited(protocol.ProcessProtocol):
    def __init__(self):
        self.ended = Deferred()

    def processEnded(self, reason):
        self.ended.callback(reason.value.exitCode)


def pg_ctl(pg, *args):
    """
    Run ``pg_ctl`` on ``pg`` without blocking the reactor, so the service
    keeps serving (and failing) while the server stops or restarts.
    """
    import pwd

    argv = [os.path.join(pg.bindir, "pg_ctl"), "-D", pg.datadir, *args]
    uid = gid = None
    if os.geteuid() == 0:
        entry = pwd.getpwnam(pg._run_as or "nobody")
        uid, gid = entry.pw_uid, entry.pw_gid
    proto = _Exited()
    # No pipes: the server pg_ctl starts would inherit them and outlive it.
    devnull = os.open(os.devnull, os.O_RDWR)
    try:
        reactor.spawnProcess(
            proto,
            argv[0],
            argv,
            env=None,
            path=pg.directory,
            uid=uid,
            gid=gid,
            childFDs={0: devnull, 1: devnull, 2: devnull},
        )
    finally:
        os.close(devnull)
    return proto.ended


def pg_ctl_start(pg):
    return pg_ctl(pg, *pg.start_args(pg.port))


class LogCapture:
    """Every log event while it is installed, with the bytes twistd would write."""

    def __init__(self, testcase):
        self.events = []
        globalLogPublisher.addObserver(self.observe)
        testcase.addCleanup(globalLogPublisher.removeObserver, self.observe)

    def observe(self, event):
        # The service's log only: not the lines of this test's own HTTP
        # client, which runs in the same process (under twistd it would not).
        if not event.get("log_namespace", "").startswith("twisted.web.client"):
            self.events.append(event)

    def lines(self):
        return [formatEvent(e) for e in self.events]

    def size(self):
        # twistd writes "2026-12-01T08:00:00+0000 [namespace] " before each.
        return sum(
            len(line.encode()) + 40 + len(e.get("log_namespace", "")) + 1
            for e, line in zip(self.events, self.lines(), strict=True)
        )

    def mark(self):
        return len(self.events)

    def since(self, mark):
        tail = LogCapture.__new__(LogCapture)
        tail.events = self.events[mark:]
        return tail


class DrillTestCase(FiberTestCase):
    """klein-demo over a database of its own on :func:`fault_server`."""

    options = {"pool_size": 20, "max_overflow": 10, "pool_timeout": 5}
    password = None

    def setUp(self):
        self.pg = fault_server()
        self.ensure_running()
        self.dbname = f"faults_{uuid.uuid4().hex[:10]}"
        self.admin(f'CREATE DATABASE "{self.dbname}"', dbname="postgres")
        self.app_name = f"shop_{uuid.uuid4().hex[:8]}"
        dsn = make_dsn(self.pg.dsn(self.dbname), password=self.password)
        self.log = LogCapture(self)
        self.shop = ShopService(
            url=f"{dsn_to_url(dsn)}?application_name={self.app_name}",
            listen="tcp:0:interface=127.0.0.1",
            grace_period=5,
            sample_data=True,
            **self.options,
        )
        self.shop.startService()
        self.addCleanup(self.stop_shop)
        port = await_deferred(self.shop.listening)
        self.base = f"http://127.0.0.1:{port.getHost().port}"
        self.http = HTTPClient(self, self.base)

    def ensure_running(self):
        if not os.path.exists(os.path.join(self.pg.datadir, "postmaster.pid")):
            self.assertEqual(await_deferred(pg_ctl_start(self.pg)), 0)

    def stop_shop(self):
        self.ensure_running()  # a drill that failed half-way
        if self.shop.running:
            await_deferred(self.shop.stopService())

    def admin(self, sql, params=None, dbname=None):
        conn = dbapi.connect(self.pg.dsn(dbname or self.dbname))
        try:
            conn.autocommit = True
            cur = conn.cursor()
            cur.execute(sql, params)
            return cur.fetchall() if cur.description else None
        finally:
            conn.close()

    def kill_backends(self):
        """Terminate the shop's connections; return how many there were."""
        rows = self.admin(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name = %s",
            (self.app_name,),
        )
        return len(rows)

    def backends(self):
        return self.admin(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
            (self.app_name,),
        )[0][0]

    def get_all(self, paths, concurrency=10):
        """GET each path, ``concurrency`` at a time; the replies in order."""
        replies = [None] * len(paths)
        queue = list(enumerate(paths))

        def worker():
            while queue:
                i, path = queue.pop(0)
                d = self.http.start("GET", path).addTimeout(30, reactor)
                replies[i] = await_deferred(d)

        await_deferred(
            gatherResults([run_in_fiber(worker) for _ in range(concurrency)])
        )
        return replies


class IdleKillTests(DrillTestCase):
    def test_backends_killed_while_idle(self):
        """
        Every backend of an idle service killed: the next 100 requests are
        100 × 200, and the pool's figures count only live connections.
        """
        # Overlapping requests, so that the pool opens several connections.
        replies = self.get_all(["/test?seconds=0.3"] * 10, concurrency=10)
        self.assertEqual({r.code for r in replies}, {200})
        opened = self.backends()
        self.assertGreaterEqual(opened, 10)
        self.assertEqual(self.kill_backends(), opened)
        wait_until(lambda: self.backends() == 0, what="backends gone")
        sleep(0.1)
        stats = pool_stats(self.shop.db.engine)
        self.assertEqual((stats["open"], stats["idle"]), (0, 0))
        health = self.http.get("/health").json
        self.assertEqual(health["pool"]["open"], 0)
        paths = ["/products/1", "/products?limit=3", "/customers/1", "/orders/1"]
        replies = self.get_all([paths[i % 4] for i in range(100)])
        self.assertEqual([r.code for r in replies], [200] * 100)

    def test_killed_many_times(self):
        for _ in range(5):
            self.assertEqual(
                {r.code for r in self.get_all(["/products/2"] * 20)}, {200}
            )
            self.kill_backends()
            sleep(0.1)
        self.assertEqual(self.http.get("/products/2").code, 200)


class OutageTests(DrillTestCase):
    def place_orders_until(self, done, results, product_id):
        """A client loop: POST /orders of one unit until ``done``."""
        while not done:
            d = self.http.start(
                "POST",
                "/orders",
                {"customer_id": 1, "lines": [{"product_id": product_id, "quantity": 1}]},
            ).addTimeout(30, reactor)
            results.append(await_deferred(d))
            if results[-1].code != 201:
                sleep(0.05)

    def test_restart_under_load(self):
        """
        PostgreSQL restarted while orders are placed: each request is
        answered 201, 409 or 503 (never a 500 or a hang), every order that
        got a 201 is there afterwards, stock is never oversold, and the
        service serves again by itself.
        """
        patched = self.http.request("PATCH", "/products/5", {"stock": 100_000})
        self.assertEqual(patched.code, 200)
        stock = patched.json["stock"]
        sold_before = self.sold(5)
        done, results = [], []
        clients = [
            run_in_fiber(self.place_orders_until, done, results, 5) for _ in range(10)
        ]
        self.addCleanup(lambda: await_deferred(gatherResults(clients)))
        self.addCleanup(done.append, True)
        wait_until(lambda: len(results) >= 20, what="orders flowing")
        self.assertEqual(await_deferred(pg_ctl(self.pg, "-m", "fast", "-w", "restart")), 0)
        wait_until(
            lambda: len([r for r in results[-10:] if r.code == 201]) >= 5,
            timeout=60,
            what="orders placed again after the restart",
        )
        done.append(True)
        await_deferred(gatherResults(clients))
        codes = {r.code for r in results}
        self.assertLessEqual(codes, {201, 409, 503}, codes)
        placed = [r.json["id"] for r in results if r.code == 201]
        for order_id in placed:
            self.assertEqual(self.http.get(f"/orders/{order_id}").code, 200)
        sold = self.sold(5) - sold_before
        left = self.http.get("/products/5").json["stock"]
        self.assertGreaterEqual(left, 0)
        self.assertEqual(left + sold, stock)  # nothing lost, nothing doubled
        self.assertEqual(len(placed), sold)

    def sold(self, product_id):
        return self.admin(
            "SELECT coalesce(sum(quantity), 0) FROM order_lines WHERE product_id = %s",
            (product_id,),
        )[0][0]

    def test_stopped_for_seconds(self):
        """
        PostgreSQL stopped for a few seconds under 30 clients: 503 with
        Retry-After and readiness 503 with the reason while it is down,
        liveness 200 throughout, then 200 again by itself; the log stays
        small and holds no traceback.
        """
        self.assertEqual(self.http.get("/health/ready").code, 200)
        mark = self.log.mark()
        self.assertEqual(await_deferred(pg_ctl(self.pg, "-m", "fast", "-w", "stop")), 0)
        done, seen = [], []

        def client():
            while not done:
                d = self.http.start("GET", "/products/1").addTimeout(30, reactor)
                seen.append(await_deferred(d))

        clients = [run_in_fiber(client) for _ in range(30)]
        self.addCleanup(lambda: await_deferred(gatherResults(clients)))
        self.addCleanup(done.append, True)
        wait_until(lambda: len(seen) >= 300, what="requests during the outage")
        down = self.http.get("/products/1")
        self.assertEqual(down.code, 503)
        self.assertEqual(down.header("retry-after"), b"1")
        self.assertEqual(down.json, {"error": "database unavailable, try again later"})
        # (A result is cached for a second: wait that out.)
        wait_until(
            lambda: self.http.get("/health/ready").code == 503,
            timeout=10,
            what="readiness 503",
        )
        ready = self.http.get("/health/ready")
        self.assertEqual(ready.code, 503)
        self.assertEqual(ready.header("retry-after"), b"1")
        self.assertIn(f"port {self.pg.port}", ready.json["reason"])
        self.assertEqual(self.http.get("/health/live").code, 200)
        sleep(3)
        during = len(seen)
        self.assertEqual(await_deferred(pg_ctl_start(self.pg)), 0)
        wait_until(
            lambda: seen[-1].code == 200, timeout=30, what="served again by itself"
        )
        done.append(True)
        await_deferred(gatherResults(clients))
        self.assertLessEqual({r.code for r in seen}, {200, 503})
        wait_until(lambda: self.http.get("/health/ready").code == 200, timeout=5)
        outage = self.log.since(mark)
        text = "\n".join(outage.lines())
        self.assertNotIn("Traceback", text)
        # A line per kind and route per 10 s, not one per request: a few
        # kilobytes for several hundred failed requests (the goal,
        # 200 KB for a 20 s outage under 30 clients, is 10 KB a second).
        self.assertGreater(during, 300)
        self.assertLess(outage.size(), 20_000, text)


class SilentServerTests(FiberTestCase):
    def silent_port(self):
        silent = protocol.ServerFactory.forProtocol(protocol.Protocol)
        port = reactor.listenTCP(0, silent, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return port.getHost().port

    def test_startup_gives_up_after_connect_timeout(self):
        from sqlalchemy.exc import OperationalError

        log = LogCapture(self)
        port = self.silent_port()
        shop = ShopService(
            url=f"postgresql+txpostgres://x@127.0.0.1:{port}/x?connect_timeout=0.5",
            listen="tcp:0:interface=127.0.0.1",
        )
        shop.startService()
        self.addCleanup(lambda: await_deferred(shop.stopService()))
        with self.assertRaises(OperationalError) as ctx:
            await_deferred(shop.listening)
        self.assertIn("timed out after 0.5 s", str(ctx.exception))
        (line,) = [x for x in log.lines() if "could not start" in x]
        self.assertIn(f'"127.0.0.1", port {port}', line)

    def test_twistd_exits_nonzero_with_the_reason(self):
        """
        Under twistd, with $DATABASE_URL naming a server that never answers
        and no connect_timeout: the default timeout applies, twistd exits
        with status 1 and says why, and the password shows nowhere.
        """
        port = self.silent_port()
        workdir = tempfile.mkdtemp(prefix="txfiberdb-silent-")
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        root = os.path.dirname(os.path.dirname(os.path.abspath(klein_demo.__file__)))
        env = dict(
            os.environ,
            DATABASE_URL=f"postgresql://shop:s3cr3t-pw@127.0.0.1:{port}/shop",
            PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""),
        )
        proc = subprocess.Popen(
            [twistd, "-n", "--pidfile=", "klein-demo", "--listen", "tcp:0"],
            cwd=workdir,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
        )
        self.addCleanup(lambda: proc.poll() is None and proc.kill())
        wait_until(lambda: proc.poll() is not None, timeout=60, what="twistd exited")
        output = proc.stdout.read().decode(errors="replace")
        self.assertEqual(proc.returncode, 1, output)
        self.assertIn("could not start", output)
        self.assertIn(f'"127.0.0.1", port {port} failed: timed out after 10 s', output)
        self.assertNotIn("s3cr3t-pw", output)
        self.assertNotIn("Traceback", output)


class HostileInputTests(DrillTestCase):
    options = {"pool_size": 5, "max_overflow": 0, "pool_timeout": 5}

    def counts(self):
        return self.admin(
            "SELECT (SELECT count(*) FROM products), (SELECT count(*) FROM customers),"
            " (SELECT count(*) FROM orders),"
            " (SELECT string_agg(description, '|' ORDER BY id) FROM products)"
        )[0]

    def raw(self, method, path, text):
        return self.http.request(
            method,
            path,
            raw=text.encode("utf-8"),
            headers={b"content-type": [b"application/json"]},
        )

    def test_values_postgresql_cannot_store(self):
        before = self.counts()
        nul, surrogate, low = "\\u0000", "\\ud800", "\\udc00"
        cases = [
            ("POST", "/products", f'{{"sku": "NUL-1", "name": "a{nul}b", '
             f'"price_cents": 100}}', "name"),
            ("POST", "/products", f'{{"sku": "NUL-2", "name": "ok", '
             f'"description": "x{surrogate}y", "price_cents": 100}}', "description"),
            ("POST", "/customers", f'{{"name": "Ada{nul}", '
             f'"email": "ada@example.com"}}', "name"),
            ("POST", "/customers", f'{{"name": "Ada", '
             f'"email": "ada{nul}@example.com"}}', "email"),
            ("POST", "/customers", f'{{"name": "a{surrogate}b", '
             f'"email": "b@example.com"}}', "name"),
            ("POST", "/customers", f'{{"name": "a{low}b", '
             f'"email": "c@example.com"}}', "name"),
            ("PATCH", "/products/1", f'{{"description": "evil{nul}"}}', "description"),
            ("PUT", "/products/1", f'{{"sku": "S", "name": "n{nul}", '
             f'"price_cents": 1}}', "name"),
        ]
        for method, path, body, field in cases:
            r = self.raw(method, path, body)
            self.assertEqual(r.code, 400, (method, path, body, r))
            self.assertIn(field, r.json.get("details", {}), r.json)
        for path in ("/products?q=a%00b", "/products?sort=id%00", "/customers?limit=1%00"):
            r = self.http.get(path)
            self.assertEqual(r.code, 400, (path, r))
        self.assertEqual(self.counts(), before)

    def test_redirect_does_not_reflect_host(self):
        host, port = self.base.rsplit("/", 1)[-1].split(":")
        from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

        proto = RawRequest(
            b"GET /products//1 HTTP/1.1\r\nHost: evil.example:666\r\n"
            b"Connection: close\r\n\r\n"
        )
        await_deferred(connectProtocol(TCP4ClientEndpoint(reactor, host, int(port)), proto))
        await_deferred(proto.closed)
        head, _, body = proto.received.partition(b"\r\n\r\n")
        status = head.split(b"\r\n")[0]
        self.assertIn(status.split()[1], (b"301", b"308"), head)
        self.assertIn(b"\r\nLocation: /products/1\r\n", head)
        self.assertNotIn(b"evil.example", body)
        self.assertEqual(self.http.get("/products/1").code, 200)

    def test_oversized_and_malformed_never_500(self):
        bodies = [
            b"\xff\xfe", b"[]", b'"x"', b"{", b'{"sku": ' + b"[" * 5000 + b"]" * 5000 + b"}",
            b'{"sku": "A", "name": "n", "price_cents": 1e400}',
            b'{"sku": "A", "name": "n", "price_cents": -1}',
        ]
        for body in bodies:
            r = self.http.request(
                "POST", "/products", raw=body,
                headers={b"content-type": [b"application/json"]},
            )
            self.assertIn(r.code, (400, 413), (body[:40], r))


class StarvationTests(DrillTestCase):
    def test_slow_route_cannot_starve_the_rest(self):
        """
        30 × /test?seconds=10 then 10 × /products/1: the ordinary requests
        are served while the slow ones still hold their connections, and
        the slow route holds at most its share of the pool.
        """
        slow = [
            RawRequest.send(self.base, "GET", "/test?seconds=10") for _ in range(30)
        ]
        limit = (20 + 10) * 2 // 3
        wait_until(
            lambda: len(running_queries(self.admin, "pg_sleep(")) == limit,
            what=f"{limit} slow requests running",
        )
        replies = self.get_all(["/products/1"] * 10, concurrency=10)
        self.assertEqual([r.code for r in replies], [200] * 10)
        # Served while every slow query still runs: none had to finish first.
        self.assertEqual(len(running_queries(self.admin, "pg_sleep(")), limit)
        self.assertLessEqual(pool_stats(self.shop.db.engine)["checked_out"], limit)
        for request in slow:
            request.hang_up()
        wait_until(
            lambda: not running_queries(self.admin, "pg_sleep("),
            what="slow queries cancelled",
        )


class SecretTests(DrillTestCase):
    password = "s3cr3t-pw-1234"

    def test_password_shows_nowhere(self):
        """
        The URL's password (the server trusts local connections, so any
        password works) never shows in the log, /health, /metrics or an
        error body, also while the database is down.
        """
        bodies = [self.http.get(p).body for p in ("/health", "/health/ready", "/metrics")]
        await_deferred(pg_ctl(self.pg, "-m", "fast", "-w", "stop"))
        try:
            bodies += [
                self.http.get(p).body
                for p in ("/products/1", "/health", "/health/ready", "/metrics")
            ]
        finally:
            await_deferred(pg_ctl_start(self.pg))
        for body in bodies:
            self.assertNotIn(self.password.encode(), body)
        self.assertNotIn(self.password, "\n".join(self.log.lines()))


class DsnSourceTests(FiberTestCase):
    def test_database_url_and_dsn_file(self):
        url = "postgresql://shop:pw@db.example/shop"
        self.patch(os, "environ", dict(os.environ, DATABASE_URL=url))
        options = Options()
        options.parseOptions([])
        self.assertEqual(
            options["url"], "postgresql+txpostgres://shop:pw@db.example/shop"
        )
        with tempfile.NamedTemporaryFile("w", suffix=".url", delete=False) as f:
            f.write("  postgresql://other:pw2@db2.example/x\n")
        self.addCleanup(os.unlink, f.name)
        options = Options()
        options.parseOptions(["--dsn-file", f.name])  # wins over $DATABASE_URL
        self.assertEqual(
            options["url"], "postgresql+txpostgres://other:pw2@db2.example/x"
        )

    def test_bad_sources_are_usage_errors(self):
        from twisted.python import usage

        self.patch(os, "environ", {k: v for k, v in os.environ.items()
                                   if k != "DATABASE_URL"})
        with tempfile.NamedTemporaryFile("w", delete=False) as f:
            f.write("\n")
        self.addCleanup(os.unlink, f.name)
        for argv, needle in [
            (["--dsn", "x", "--dsn-file", f.name], "not both"),
            (["--dsn-file", f.name], "empty"),
            (["--dsn-file", "/nonexistent/url"], "No such file"),
            (["--dsn", "mysql://u:secretpw@h/d"], "not a PostgreSQL URL"),
        ]:
            with self.assertRaises(usage.UsageError) as ctx:
                Options().parseOptions(argv)
            self.assertIn(needle, str(ctx.exception))
            self.assertNotIn("secretpw", str(ctx.exception))

    def test_help_warns_about_ps(self):
        self.assertIn("`ps`", str(Options()))
