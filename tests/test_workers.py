"""
Several worker processes on one port: ``twistd -n klein-demo --workers N``
as real processes (supervisor, workers, one throwaway PostgreSQL), and
:mod:`txfiberdb.workers` on its own.
"""

import os
import re
import shutil
import signal
import subprocess
import sys

from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

import klein_demo
from klein_demo.tap import Options
from txfiberdb import await_deferred
from txfiberdb.testing import FiberTestCase
from txfiberdb.workers import MAX_WORKERS, connection_budget

from .test_demo import _processes_mentioning
from .test_klein import HTTPClient, wait_until

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(klein_demo.__file__)))


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped) is not running.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class OptionsTests(SynchronousTestCase):
    def test_bad_worker_counts_refused_clearly(self):
        for value in ["0", "-1", "x", "1.5", "", str(MAX_WORKERS + 1)]:
            with self.assertRaises(usage.UsageError) as caught:
                Options().parseOptions(["--workers", value])
            message = str(caught.exception)
            self.assertTrue(message.startswith("--workers must be"), message)
            self.assertNotIn("Traceback", message)

    def test_endpoints_that_cannot_be_shared_refused(self):
        import twisted.test

        pem = os.path.join(os.path.dirname(twisted.test.__file__), "server.pem")
        ssl = f"ssl:8443:privateKey={pem}"
        with self.assertRaises(usage.UsageError) as caught:
            Options().parseOptions(["--workers", "2", "--listen", ssl])
        self.assertIn("cannot be shared by worker processes", str(caught.exception))
        # One process may use it; a key that cannot be read is a usage error.
        Options().parseOptions(["--listen", ssl])
        with self.assertRaises(usage.UsageError):
            Options().parseOptions(["--listen", "ssl:8443:privateKey=/nonexistent.pem"])

    def test_replica_options(self):
        options = Options()
        options.parseOptions(
            ["--replica", "postgresql://r1/shop", "--replica", "host=r2 dbname=shop"]
        )
        self.assertEqual(
            options["replica-urls"],
            [
                "postgresql+txpostgres://r1/shop",
                "postgresql+txpostgres://r2/shop",
            ],
        )
        with self.assertRaises(usage.UsageError) as caught:
            Options().parseOptions(["--replica", "mysql://secret@r1/shop"])
        self.assertIn("--replica: not a PostgreSQL URL", str(caught.exception))
        self.assertNotIn("secret", str(caught.exception))

    def test_good_worker_count(self):
        options = Options()
        options.parseOptions(["--workers", "3", "--pool-size", "5"])
        self.assertEqual(options["workers"], 3)
        self.assertEqual(options.arguments, ["--workers", "3", "--pool-size", "5"])

    def test_connection_budget(self):
        self.assertEqual(connection_budget(4, 20, 10)[0], 120)
        total, line = connection_budget(4, 20, 10, max_connections=100, reserved=3)
        self.assertEqual(total, 120)
        self.assertIn("MORE than the server allows", line)
        total, line = connection_budget(2, 5, 0, max_connections=100, reserved=3)
        self.assertIn("the server allows 97", line)
        self.assertIsNone(connection_budget(2, 5, -1)[0])


class BackoffTests(FiberTestCase):
    def test_a_worker_that_dies_at_once_is_restarted_ever_later(self):
        from txfiberdb.workers import WorkerSupervisor

        supervisor = WorkerSupervisor(
            ["-c", "import sys; sys.exit(3)"],
            "tcp:0:interface=127.0.0.1",
            1,
            min_restart_delay=0.01,
            max_restart_delay=0.08,
            exit_on_failure=False,
        )
        supervisor.privilegedStartService()
        supervisor.startService()
        try:
            wait_until(lambda: supervisor.restarts >= 6, what="six restarts")
        finally:
            await_deferred(supervisor.stopService())
        # Doubling from the minimum up to the maximum: never a tight loop.
        self.assertEqual(
            supervisor.restart_delays[:6], [0.01, 0.02, 0.04, 0.08, 0.08, 0.08]
        )
        self.assertEqual(supervisor.running_workers, {})


class TwistdTestCase(FiberTestCase):
    """Starts ``twistd -n PLUGIN ...`` and cleans up after it (no tests here)."""

    def start(self, *args):
        return self.start_plugin("klein-demo", *args)

    def start_plugin(self, plugin, *args):
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        workdir = self.mktemp()
        os.makedirs(workdir)
        self.log_path = os.path.join(workdir, "twistd.log")
        env = dict(
            os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")
        )
        env.pop("DATABASE_URL", None)
        with open(self.log_path, "wb") as log_file:
            proc = subprocess.Popen(
                [twistd, "-n", "--pidfile=", plugin, *args],
                cwd=workdir,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=env,
            )

        def cleanup():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            for pid in self.worker_pids():
                if _alive(pid):
                    os.kill(pid, signal.SIGKILL)

        self.addCleanup(cleanup)
        return proc

    def log_text(self):
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def worker_pids(self):
        return [
            int(p)
            for p in re.findall(r"worker \d+ started \(pid (\d+)\)", self.log_text())
        ]


class SupervisorTests(TwistdTestCase):
    """The demo under twistd with --workers 2: real processes, real sockets."""

    def test_workers_share_a_port_restart_and_drain(self):
        proc = self.start(
            "--workers",
            "2",
            "--pool-size",
            "3",
            "--max-overflow",
            "2",
            "--listen",
            "tcp:0:interface=127.0.0.1",
        )

        def serving():
            if proc.poll() is not None:
                raise AssertionError(
                    f"twistd exited ({proc.returncode}):\n{self.log_text()}"
                )
            return "all 2 workers serving" in self.log_text()

        wait_until(serving, timeout=120, interval=0.1, what="2 workers serving")
        text = self.log_text()
        port = int(re.search(r"sharing 127\.0\.0\.1:(\d+)", text).group(1))
        # The bound is stated, and checked against the server's max_connections.
        self.assertIn(
            "2 worker(s) x (pool_size 3 + max_overflow 2) = at most 10 database "
            "connections (the server allows",
            text,
        )
        pgdir = re.search(r"throwaway PostgreSQL running in (\S+)", text).group(1)
        # One throwaway server for everyone.
        self.assertEqual(text.count("throwaway PostgreSQL running in"), 1)

        http = HTTPClient(self, f"http://127.0.0.1:{port}")
        http.pool.persistent = False  # a new connection each time

        def answering_pids(n):
            pids = set()
            for _ in range(n):
                body = http.get("/metrics").body.decode()
                pids.add(
                    int(
                        re.search(
                            r'klein_demo_worker_info\{pid="(\d+)",worker="\d"', body
                        ).group(1)
                    )
                )
            return pids

        first = set(self.worker_pids())
        self.assertEqual(len(first), 2)
        # Connections are spread over both workers (the kernel hashes them
        # over the SO_REUSEPORT group: 40 all to one is ~1e-12).
        self.assertEqual(answering_pids(40), first)
        self.assertEqual(http.get("/products/1").code, 200)

        # A worker killed outright is replaced.
        victim = sorted(first)[0]
        os.kill(victim, signal.SIGKILL)
        wait_until(
            lambda: len(self.worker_pids()) == 3,
            timeout=60,
            interval=0.1,
            what="a new worker started",
        )
        self.assertIn("was killed by SIGKILL; starting another", self.log_text())
        current = set(self.worker_pids()) - {victim}
        wait_until(
            lambda: answering_pids(20) == current,
            timeout=60,
            interval=0.2,
            what="both workers (one new) answering",
        )

        # SIGTERM: a request in flight finishes, then everything exits.
        slow = [http.start("GET", "/test?seconds=2") for _ in range(4)]

        def in_flight():
            body = http.get("/metrics").body.decode()
            n = re.search(r"klein_demo_units_of_work_inflight (\d+)", body)
            return n is not None and int(n.group(1)) >= 1

        wait_until(in_flight, what="slow requests in flight")
        proc.send_signal(signal.SIGTERM)
        for d in slow:
            r = await_deferred(d)
            self.assertEqual((r.code, r.json), (200, {"slept": 2.0}))
        wait_until(
            lambda: proc.poll() is not None,
            timeout=90,
            interval=0.1,
            what="the supervisor exited",
        )
        output = self.log_text()
        self.assertIn(proc.returncode, (0, -signal.SIGTERM), output)
        self.assertNotIn("Traceback", output)
        self.assertNotIn("supervisor is gone", output)
        self.assertEqual(output.count("throwaway PostgreSQL stopped and removed"), 1)
        self.assertEqual([p for p in self.worker_pids() if _alive(p)], [])
        self.assertEqual(_processes_mentioning(pgdir), [])
        self.assertFalse(os.path.exists(pgdir))

    def test_workers_that_cannot_start_stop_the_supervisor(self):
        # Nothing listens on port 1 of loopback: every worker fails at start.
        proc = self.start(
            "--workers",
            "2",
            "--dsn",
            "postgresql://nobody@127.0.0.1:1/none",
            "--listen",
            "tcp:0:interface=127.0.0.1",
        )
        wait_until(
            lambda: proc.poll() is not None,
            timeout=90,
            interval=0.1,
            what="the supervisor exited",
        )
        output = self.log_text()
        self.assertEqual(proc.returncode, 1, output)
        self.assertIn("before serving (see its log above); giving up", output)
        self.assertNotIn("starting another", output)
        self.assertEqual([p for p in self.worker_pids() if _alive(p)], [])

    def test_an_address_that_cannot_be_bound_is_one_line(self):
        path = "/" + "x" * 200 + "/s"  # longer than a unix socket path may be
        proc = self.start("--workers", "2", "--listen", f"unix:{path}")
        wait_until(
            lambda: proc.poll() is not None,
            timeout=90,
            interval=0.1,
            what="the supervisor exited",
        )
        output = self.log_text()
        self.assertEqual(proc.returncode, 1, output)
        self.assertIn("supervisor: cannot listen on unix:/xxx", output)
        self.assertNotIn("Traceback", output)
        self.assertEqual(self.worker_pids(), [])

    def test_unix_socket_inherited_by_the_workers(self):
        from .support import _create_database

        dsn = _create_database()
        import tempfile

        directory = tempfile.mkdtemp(prefix="txw-")
        self.addCleanup(shutil.rmtree, directory, True)
        path = os.path.join(directory, "s")
        proc = self.start(
            "--workers",
            "2",
            "--pool-size",
            "2",
            "--dsn",
            dsn,
            "--listen",
            f"unix:{path}",
        )
        wait_until(
            lambda: (
                proc.poll() is not None or "all 2 workers serving" in self.log_text()
            ),
            timeout=120,
            interval=0.1,
            what="2 workers serving",
        )
        self.assertIsNone(proc.poll(), self.log_text())

        def get(route):
            # A blocking request on a unix socket, served by other processes.
            import socket

            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(30)
                s.connect(path)
                s.sendall(f"GET {route} HTTP/1.0\r\nHost: shop\r\n\r\n".encode())
                data = b""
                while chunk := s.recv(65536):
                    data += chunk
            return data.decode()

        self.assertIn("200 OK", get("/products"))
        pids = {
            int(re.search(r'pid="(\d+)"', get("/metrics")).group(1)) for _ in range(10)
        }
        self.assertLessEqual(pids, set(self.worker_pids()))
        proc.send_signal(signal.SIGTERM)
        wait_until(
            lambda: proc.poll() is not None,
            timeout=90,
            interval=0.1,
            what="the supervisor exited",
        )
        self.assertNotIn("Traceback", self.log_text())
        self.assertEqual([p for p in self.worker_pids() if _alive(p)], [])

    def test_workers_stop_when_the_supervisor_is_killed(self):
        from .support import _create_database

        proc = self.start(
            "--workers",
            "2",
            "--pool-size",
            "2",
            "--dsn",
            _create_database(),
            "--listen",
            "tcp:0:interface=127.0.0.1",
        )
        wait_until(
            lambda: (
                proc.poll() is not None or "all 2 workers serving" in self.log_text()
            ),
            timeout=120,
            interval=0.1,
            what="2 workers serving",
        )
        self.assertIsNone(proc.poll(), self.log_text())
        pids = self.worker_pids()
        proc.kill()  # SIGKILL: no clean-up in the supervisor at all
        proc.wait()
        wait_until(
            lambda: not any(_alive(p) for p in pids),
            timeout=90,
            interval=0.1,
            what="the orphaned workers exited",
        )
        self.assertEqual(self.log_text().count("the supervisor is gone"), 2)


PLUGIN_MODULE = """
import os

from twisted.application.service import Service
from twisted.web.resource import Resource
from twisted.web.server import Site

from txfiberdb.workers import WorkerOptions, listen, serve_workers


class Options(WorkerOptions):
    optParameters = [["listen", "l", "tcp:8080", "Where to listen."]]


class Pid(Resource):
    isLeaf = True

    def render_GET(self, request):
        return str(os.getpid()).encode()


class Hello(Service):
    def __init__(self, description):
        self.description = description
        self.port = None

    def startService(self):
        super().startService()
        from twisted.internet import reactor

        listen(reactor, self.description, Site(Pid())).addCallback(
            lambda port: setattr(self, "port", port)
        )

    def stopService(self):
        super().stopService()
        if self.port is not None:
            return self.port.stopListening()


def makeService(options):
    return serve_workers(options, lambda o: Hello(o["listen"]))
"""

PLUGIN_DROPIN = """
from twisted.application.service import ServiceMaker

hello = ServiceMaker("hello-workers", "hello_workers", "pids", "hello-workers")
"""


class OwnPluginTests(TwistdTestCase):
    """A user's own twistd plugin gets --workers from txfiberdb.workers alone."""

    def test_own_plugin(self):
        import socket
        import tempfile
        import urllib.request

        root = tempfile.mkdtemp(prefix="txw-plugin-")
        self.addCleanup(shutil.rmtree, root, True)
        os.makedirs(os.path.join(root, "twisted", "plugins"))
        with open(os.path.join(root, "hello_workers.py"), "w") as f:
            f.write(PLUGIN_MODULE)
        with open(
            os.path.join(root, "twisted", "plugins", "hello_dropin.py"), "w"
        ) as f:
            f.write(PLUGIN_DROPIN)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        old = os.environ.get("PYTHONPATH", "")
        os.environ["PYTHONPATH"] = root + (os.pathsep + old if old else "")
        try:
            proc = self.start_plugin(
                "hello-workers",
                "--workers",
                "2",
                "--listen",
                f"tcp:{port}:interface=127.0.0.1",
            )
        finally:
            os.environ["PYTHONPATH"] = old
        wait_until(
            lambda: (
                proc.poll() is not None or "all 2 workers serving" in self.log_text()
            ),
            timeout=120,
            interval=0.1,
            what="2 workers serving",
        )
        self.assertIsNone(proc.poll(), self.log_text())

        def pid():
            # Blocking, against other processes: a new connection each time.
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30) as r:
                return int(r.read())

        self.assertEqual({pid() for _ in range(40)}, set(self.worker_pids()))
        proc.send_signal(signal.SIGTERM)
        wait_until(
            lambda: proc.poll() is not None,
            timeout=90,
            interval=0.1,
            what="the supervisor exited",
        )
        self.assertNotIn("Traceback", self.log_text())
        self.assertEqual([p for p in self.worker_pids() if _alive(p)], [])
