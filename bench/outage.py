"""
Outage drill: what an outage costs in log volume and how the service comes
back.  Not a speed benchmark: it measures bytes of log and answers.

Starts a throwaway PostgreSQL and ``twistd -n klein-demo --dsn ...`` on it
(logging to a file), runs ``--clients`` client loops on ``GET /products/1``
(each loop sends its next request as soon as the last is answered, so an
outage is hammered as hard as the service answers), stops PostgreSQL for
``--outage`` seconds, starts it again, and reports:

- the requests answered during the outage, by status code;
- the bytes twistd wrote to its log during the outage (the issue's goal:
  under 200 KB for a 20 s outage under 30 clients), and tracebacks in it;
- the seconds from PostgreSQL being back to the first 200.

    python bench/outage.py [--clients 30] [--outage 20]
"""

from __future__ import annotations

import argparse
import collections
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import warnings

from twisted.internet import defer, reactor, task
from twisted.web.client import Agent, HTTPConnectionPool, readBody

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from txfiberdb.testing import TemporaryPostgres  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=30)
    parser.add_argument("--outage", type=float, default=20.0)
    args = parser.parse_args()

    pg = TemporaryPostgres().start()
    workdir = tempfile.mkdtemp(prefix="txfiberdb-outage-")
    logfile = os.path.join(workdir, "twistd.log")
    port = free_port()
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    proc = subprocess.Popen(
        [
            twistd, "-n", "--pidfile=", "--logfile", logfile, "klein-demo",
            "--dsn", pg.dsn(), "--sample-data",
            "--listen", f"tcp:{port}:interface=127.0.0.1",
        ],
        cwd=workdir,
    )
    try:
        run(pg, proc, logfile, port, args)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
        pg.stop()


def run(pg, proc, logfile, port, args) -> None:
    base = f"http://127.0.0.1:{port}".encode()
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = args.clients
    agent = Agent(reactor, pool=pool)
    phase = ["warm"]
    codes: dict[str, collections.Counter[int]] = collections.defaultdict(
        collections.Counter
    )
    first_ok_after = []
    back_at = []

    @defer.inlineCallbacks
    def client():
        while phase[0] != "done":
            try:
                response = yield agent.request(b"GET", base + b"/products/1")
                yield readBody(response)
                code = response.code
            except Exception:
                code = 0
            codes[phase[0]][code] += 1
            if phase[0] == "after" and code == 200 and not first_ok_after:
                first_ok_after.append(time.monotonic())

    @defer.inlineCallbacks
    def drill():
        for _ in range(600):
            try:
                response = yield agent.request(b"GET", base + b"/health/ready")
                yield readBody(response)
                if response.code == 200:
                    break
            except Exception:
                pass
            yield task.deferLater(reactor, 0.1, lambda: None)
        clients = [client() for _ in range(args.clients)]
        yield task.deferLater(reactor, 3, lambda: None)
        before = os.path.getsize(logfile)
        phase[0] = "outage"
        pg.stop_server()
        yield task.deferLater(reactor, args.outage, lambda: None)
        phase[0] = "after"
        pg.start_server()
        back_at.append(time.monotonic())
        during = os.path.getsize(logfile) - before
        yield task.deferLater(reactor, 5, lambda: None)
        phase[0] = "done"
        yield defer.DeferredList(clients)
        yield pool.closeCachedConnections()
        with open(logfile, errors="replace") as f:
            f.seek(before)
            text = f.read()
        print(f"clients: {args.clients}, outage: {args.outage:g} s")
        print(f"answers during the outage: {dict(codes['outage'])}")
        print(f"answers after it: {dict(codes['after'])}")
        print(f"log written during the outage: {during} bytes")
        print(f"tracebacks in the log since: {text.count('Traceback')}")
        if first_ok_after:
            print(f"first 200 after restart: {first_ok_after[0] - back_at[0]:.2f} s")
        reactor.stop()

    reactor.callWhenRunning(drill)
    reactor.run()


if __name__ == "__main__":
    main()
