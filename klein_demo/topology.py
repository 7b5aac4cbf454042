# -*- test-case-name: tests.test_topology -*-
"""
The whole picture on one machine, no containers: a PostgreSQL primary, a
streaming replica of it, PgBouncer (transaction mode) in front of the
primary, and ``twistd klein-demo --workers N`` behind one port.

::

    python -m klein_demo.topology start [--workers 2] [--port 8080]
                                        [--state DIR] [--pool-size 10]
    python -m klein_demo.topology status [--state DIR]
    python -m klein_demo.topology stop [--state DIR]

``start`` prints the URLs and leaves everything running in the background
(the servers in temporary directories, the demo daemonized by twistd, its
log in the state directory); ``stop`` stops it all in order (demo workers
drain, then PgBouncer, the replica, the primary) and removes every
directory it made.  The state directory (default
``$TMPDIR/txfiberdb-topology``) holds what ``stop`` needs.

Layout::

    clients -> :8080 (SO_REUSEPORT) -> worker 1..N --writes--> PgBouncer -> primary
                                                  \\--reads (GET)--> replica
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Any

from txfiberdb.testing import (
    PgBouncerUnavailable,
    PostgresUnavailable,
    TemporaryPgBouncer,
    TemporaryPostgres,
    TemporaryReplica,
    dsn_to_url,
)

DEFAULT_STATE = os.path.join(tempfile.gettempdir(), "txfiberdb-topology")


def _state_file(state: str) -> str:
    return os.path.join(state, "topology.json")


def _pg_record(pg: TemporaryPostgres) -> dict[str, Any]:
    return {
        "directory": pg.directory,
        "bindir": pg.bindir,
        "port": pg.port,
        "run_as": pg._run_as,
    }


def _pg_stop(record: dict[str, Any]) -> None:
    pg = TemporaryPostgres(bindir=record["bindir"], port=record["port"])
    pg.directory = record["directory"]
    pg._run_as = record["run_as"]
    pg.stop()


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _terminate(pid: int, timeout: float) -> bool:
    """SIGTERM ``pid``, wait up to ``timeout`` s, then SIGKILL; whether it ran."""
    if not _alive(pid):
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _alive(pid):
        os.kill(pid, signal.SIGKILL)
    return True


def _tail(path: str, lines: int = 15) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return "(no log)"


def _read_pid(pidfile: str) -> int:
    try:
        with open(pidfile) as f:
            return int(f.read().strip() or 0)
    except (OSError, ValueError):
        return 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(args: argparse.Namespace) -> int:
    state = os.path.abspath(args.state)
    if os.path.exists(_state_file(state)):
        print(
            f"a topology is already running (state in {state}): "
            f"'python -m klein_demo.topology stop --state {state}' first",
            file=sys.stderr,
        )
        return 1
    if not 1 <= args.workers <= 64:
        print("--workers must be from 1 to 64", file=sys.stderr)
        return 2
    if not 0 <= args.port <= 65535:
        print("--port must be from 0 to 65535", file=sys.stderr)
        return 2
    port = args.port or _free_port()
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as e:
            print(f"topology: port {port} is not free: {e.strerror}", file=sys.stderr)
            return 1
    os.makedirs(state, exist_ok=True)
    record: dict[str, Any] = {"state": state}
    made: list[Any] = []
    try:
        primary = TemporaryPostgres().start()
        made.append(primary)
        record["primary"] = _pg_record(primary)
        replica = TemporaryReplica(primary).start()
        made.append(replica)
        record["replica"] = _pg_record(replica)
        bouncer = TemporaryPgBouncer(
            primary.host, primary.port, default_pool_size=args.pgbouncer_pool
        ).start()
        made.append(bouncer)
        assert bouncer.process is not None
        record["pgbouncer"] = {
            "pid": bouncer.process.pid,
            "directory": bouncer.directory,
        }
        with open(_state_file(state), "w") as f:
            json.dump(record, f)
        log = os.path.join(state, "klein-demo.log")
        pidfile = os.path.join(state, "twistd.pid")
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        result = subprocess.run(
            [
                twistd,
                f"--pidfile={pidfile}",
                f"--logfile={log}",
                "klein-demo",
                "--workers",
                str(args.workers),
                "--pool-size",
                str(args.pool_size),
                "--max-overflow",
                "0",
                "--dsn",
                # Transaction mode: no server-side prepared statements (a
                # statement does not follow a client between server
                # connections; doc/howto/performance.md).
                dsn_to_url(bouncer.dsn()) + "?prepare_threshold=none",
                "--replica",
                replica.dsn(),
                "--sample-data",
                "--listen",
                f"tcp:{port}:interface=127.0.0.1",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if result.returncode:
            raise RuntimeError(
                f"twistd klein-demo did not start: {result.stdout}{result.stderr}"
            )
        record["twistd_pidfile"] = pidfile
        with open(_state_file(state), "w") as f:
            json.dump(record, f)
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(base + "/health/ready", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the demo did not become ready:\n" + _tail(log))
            pid = _read_pid(pidfile)
            if pid and not _alive(pid):
                raise RuntimeError("the demo exited:\n" + _tail(log))
            time.sleep(0.2)
        # The schema and sample data were written on the primary just now:
        # serve the URLs once the replica has them too.
        replica.wait_for(primary)
    except (PostgresUnavailable, PgBouncerUnavailable, RuntimeError, OSError) as e:
        print(f"topology: could not start: {e}", file=sys.stderr)
        stop_state(state, quiet=True)
        for thing in reversed(made):
            thing.stop()
        return 1
    # Everything now outlives this command: stop() owns the clean-up.
    import atexit

    for thing in made:
        atexit.unregister(thing.stop)
    print(f"""topology running (state: {state})
  shop (klein-demo, {args.workers} workers): {base}/   ({base}/metrics is per worker)
  PgBouncer (transaction mode):    {bouncer.dsn()}
  PostgreSQL primary:              {primary.dsn()}
  PostgreSQL replica (GET routes): {replica.dsn()}
  demo log:                        {log}
stop it with: {sys.executable} -m klein_demo.topology stop --state {state}""")
    return 0


def stop_state(state: str, quiet: bool = False) -> int:
    try:
        with open(_state_file(state)) as f:
            record = json.load(f)
    except FileNotFoundError:
        if not quiet:
            print(f"no topology running (no {_state_file(state)})", file=sys.stderr)
        return 1
    pidfile = record.get("twistd_pidfile")
    if pidfile and os.path.exists(pidfile):
        with open(pidfile) as f:
            pid = int(f.read().strip() or 0)
        if pid and _terminate(pid, timeout=60):
            print(f"demo (pid {pid}) stopped: its workers drained")
    bouncer = record.get("pgbouncer")
    if bouncer:
        _terminate(bouncer["pid"], timeout=10)
        shutil.rmtree(bouncer["directory"], ignore_errors=True)
        print("PgBouncer stopped")
    for name in ("replica", "primary"):
        if name in record:
            _pg_stop(record[name])
            print(f"PostgreSQL {name} stopped and removed")
    shutil.rmtree(state, ignore_errors=True)
    return 0


def status(args: argparse.Namespace) -> int:
    try:
        with open(_state_file(os.path.abspath(args.state))) as f:
            record = json.load(f)
    except FileNotFoundError:
        print("no topology running")
        return 1
    print(json.dumps(record, indent=2))
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m klein_demo.topology")
    sub = parser.add_subparsers(dest="command", required=True)
    p_start = sub.add_parser("start", help="start primary, replica, PgBouncer, demo")
    p_start.add_argument("--workers", type=int, default=2)
    p_start.add_argument("--port", type=int, default=8080, help="0: any free port")
    p_start.add_argument("--pool-size", type=int, default=10)
    p_start.add_argument("--pgbouncer-pool", type=int, default=20)
    for p in (p_start, sub.add_parser("stop"), sub.add_parser("status")):
        p.add_argument("--state", default=DEFAULT_STATE)
    args = parser.parse_args(argv)
    if args.command == "start":
        return start(args)
    if args.command == "stop":
        return stop_state(os.path.abspath(args.state))
    return status(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
