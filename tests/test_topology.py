"""
``python -m klein_demo.topology start`` / ``stop``: primary, replica,
PgBouncer and two demo workers as real processes; nothing left after stop.
"""

import json
import os
import re
import subprocess
import sys

from twisted.trial.unittest import TestCase

import klein_demo
from txfiberdb.testing import PgBouncerUnavailable, find_pgbouncer

from .test_demo import _processes_mentioning

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(klein_demo.__file__)))

try:
    find_pgbouncer()
    SKIP = None
except PgBouncerUnavailable as e:
    SKIP = str(e)


def _get(url, method="GET", body=None):
    import urllib.request

    request = urllib.request.Request(
        url,
        method=method,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"content-type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as r:
        return r.status, r.read().decode()


class TopologyTests(TestCase):
    skip = SKIP

    def topology(self, *args):
        return subprocess.run(
            [sys.executable, "-m", "klein_demo.topology", *args],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=ROOT,
        )

    def test_start_use_stop(self):
        # Blocking calls in a plain (not fiber) test: the reactor serves
        # nothing here.
        state = os.path.abspath(self.mktemp())
        started = self.topology(
            "start", "--workers", "2", "--port", "0", "--state", state
        )
        self.addCleanup(self.topology, "stop", "--state", state)
        self.assertEqual(started.returncode, 0, started.stdout + started.stderr)
        base = re.search(r"(http://127\.0\.0\.1:\d+)/", started.stdout).group(1)
        with open(os.path.join(state, "topology.json")) as f:
            record = json.load(f)
        dirs = [
            record["primary"]["directory"],
            record["replica"]["directory"],
            record["pgbouncer"]["directory"],
        ]
        self.assertEqual(_get(base + "/products/1")[0], 200)
        code, _ = _get(
            base + "/customers",
            "POST",
            {"name": "Topo", "email": "topo@example.com"},
        )
        self.assertEqual(code, 201)
        # The GET routes read on the replica (each worker counts its own).
        reads = 0
        for _ in range(20):
            _get(base + "/products/1")
            m = re.search(
                r'txfiberdb_reads_total\{target="replica"\} (\d+)',
                _get(base + "/metrics")[1],
            )
            reads = max(reads, int(m.group(1)))
        self.assertGreater(reads, 0)

        stopped = self.topology("stop", "--state", state)
        self.assertEqual(stopped.returncode, 0, stopped.stdout + stopped.stderr)
        self.assertIn("its workers drained", stopped.stdout)
        self.assertFalse(os.path.exists(state))
        for d in dirs:
            self.assertFalse(os.path.exists(d), d)
            self.assertEqual(_processes_mentioning(d), [])
        self.assertEqual(_processes_mentioning(state), [])

    def test_stop_with_nothing_running(self):
        result = self.topology("stop", "--state", os.path.abspath(self.mktemp()))
        self.assertEqual(result.returncode, 1)
        self.assertIn("no topology running", result.stderr)
        self.assertNotIn("Traceback", result.stderr)

    def test_a_port_in_use_is_refused_before_anything_starts(self):
        import socket

        state = os.path.abspath(self.mktemp())
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            result = self.topology("start", "--port", str(port), "--state", state)
        self.assertEqual(result.returncode, 1)
        self.assertIn(f"port {port} is not free", result.stderr)
        self.assertNotIn("Traceback", result.stderr)
        self.assertFalse(os.path.exists(os.path.join(state, "topology.json")))
