"""
Live clients: ``--clients`` (1,000) Server-Sent Events streams held open on
``GET /events``, the server's memory per held client, and the delay from the
COMMIT of a stock change to its event arriving at every client.

Two servers, one after the other, on the same throwaway PostgreSQL:

- **fibers**: ``twistd -n klein-demo`` (txfiberdb: one fiber per stream,
  parked on the one LISTEN connection; no pool connection held);
- **threads**: the same stream served the way a thread-per-request (WSGI)
  server would, one OS thread per client (``ThreadingHTTPServer``): each
  thread blocks on its own queue, fed by one LISTEN thread (psycopg2,
  ``select()``), so the database side is the same single connection; the
  snapshot is read through a 20-connection psycopg2 pool, as the demo's.

For each: the clients connect in batches of 50 (each waits for its
snapshot), the server's RSS is read (``/proc/<pid>/status``) with
``--warm`` clients connected and again with all of them; memory per client
is the difference over the clients added.  Then ``--rounds`` times: a
transaction ``UPDATE products SET stock = stock - 1 ... ; SELECT
pg_notify('stock', ...)`` (what ``POST /orders`` announces) is committed by
blocking psycopg2 in this process; the clock starts when ``commit()``
returns, and each client's delay is the time its socket delivered the
event.  All clients live in this one process (one Twisted reactor): their own
reading is included in the delays, which makes them pessimistic.

    python bench/live.py [--clients 1000] [--rounds 20] [--only fibers|threads]

Loopback only.  ``ulimit -n`` is raised as far as the hard limit allows.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import resource
import select
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

BATCH = 50


def raise_nofile(wanted: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def threads_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Threads:"):
                return int(line.split()[1])
    return 0


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("server did not start")


# -- the thread-per-client server ---------------------------------------------


def serve_threads(dsn: str, port: int) -> None:
    import psycopg2
    import psycopg2.pool

    pool = psycopg2.pool.ThreadedConnectionPool(1, 20, dsn)
    slots = threading.BoundedSemaphore(20)
    subscribers: set[queue.Queue] = set()
    lock = threading.Lock()

    def listener() -> None:
        conn = psycopg2.connect(dsn)
        conn.autocommit = True
        conn.cursor().execute("LISTEN stock; LISTEN orders")
        seq = 0
        while True:
            select.select([conn], [], [], 15)
            conn.poll()
            while conn.notifies:
                n = conn.notifies.pop(0)
                seq += 1
                with lock:
                    targets = list(subscribers)
                for q in targets:
                    try:
                        q.put_nowait((n.channel, n.payload, seq))
                    except queue.Full:
                        pass

    def snapshot() -> str:
        with slots:
            conn = pool.getconn()
            try:
                cur = conn.cursor()
                cur.execute(
                    "SELECT id, sku, name, stock, price_cents FROM products "
                    "ORDER BY id LIMIT 500"
                )
                rows = cur.fetchall()
                conn.rollback()
            finally:
                pool.putconn(conn)
        keys = ("id", "sku", "name", "stock", "price_cents")
        return json.dumps({"products": [dict(zip(keys, r)) for r in rows]})

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            if self.path != "/events":
                self.send_error(404)
                return
            q: queue.Queue = queue.Queue(maxsize=1000)
            with lock:
                subscribers.add(q)
            try:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream; charset=utf-8")
                self.send_header("Cache-Control", "no-cache")
                self.end_headers()
                data = snapshot()
                self.wfile.write(f"event: snapshot\ndata: {data}\n\n".encode())
                self.wfile.flush()
                while True:
                    try:
                        channel, payload, seq = q.get(timeout=15)
                    except queue.Empty:
                        self.wfile.write(b": keep-alive\n\n")
                        continue
                    self.wfile.write(
                        f"event: {channel}\nid: {seq}\ndata: {payload}\n\n".encode()
                    )
                    self.wfile.flush()
            except OSError:
                pass
            finally:
                with lock:
                    subscribers.discard(q)

    threading.Thread(target=listener, daemon=True).start()

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 1024

    Server(("127.0.0.1", port), Handler).serve_forever()


# -- the clients ----------------------------------------------------------------


def run_clients(args, port: int, server_pid: int, dsn: str) -> dict:
    from twisted.internet import defer, reactor, task
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
    from twisted.internet.protocol import Protocol

    state: dict = {"marker": None, "arrivals": {}, "snapshots": 0}

    class Client(Protocol):
        def __init__(self) -> None:
            self.tail = b""
            self.ready: defer.Deferred = defer.Deferred()

        def connectionMade(self) -> None:
            self.transport.write(b"GET /events HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")

        def dataReceived(self, data: bytes) -> None:
            now = time.monotonic()
            seen = self.tail + data
            self.tail = seen[-300:]
            if not self.ready.called and b"event: snapshot" in seen:
                state["snapshots"] += 1
                self.ready.callback(None)
            marker = state["marker"]
            if marker is not None and marker in seen and self not in state["arrivals"]:
                state["arrivals"][self] = now

        def connectionLost(self, reason: object) -> None:
            if not self.ready.called:
                self.ready.errback(RuntimeError("stream closed before its snapshot"))

    import psycopg2

    db = psycopg2.connect(dsn)
    cur = db.cursor()
    results: dict = {}

    async def connect(n: int) -> list:
        clients = []
        for start in range(0, n, BATCH):
            batch = [Client() for _ in range(min(BATCH, n - start))]
            endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=30)
            await defer.gatherResults([connectProtocol(endpoint, c) for c in batch])
            await defer.gatherResults([c.ready for c in batch])
            clients.extend(batch)
        return clients

    async def settle() -> None:
        await task.deferLater(reactor, 2.0, lambda: None)

    async def main() -> None:
        warm = await connect(args.warm)
        await settle()
        base = rss_kib(server_pid)
        rest = await connect(args.clients - args.warm)
        clients = warm + rest
        await settle()
        held = rss_kib(server_pid)
        results["rss_base_kib"] = base
        results["rss_held_kib"] = held
        results["per_client_kib"] = (held - base) / (args.clients - args.warm)
        results["threads"] = threads_of(server_pid)
        delays: list[float] = []
        last: list[float] = []
        for r in range(args.rounds + 1):
            cur.execute(
                "UPDATE products SET stock = stock + 1 WHERE id = "
                "(SELECT min(id) FROM products) "
                "RETURNING id, sku, name, stock, price_cents"
            )
            row = cur.fetchone()
            payload = json.dumps(
                dict(zip(("id", "sku", "name", "stock", "price_cents"), row))
            )
            cur.execute("SELECT pg_notify('stock', %s)", (payload,))
            state["arrivals"] = {}
            state["marker"] = f'"stock": {row[3]}, "price_cents"'.encode()
            db.commit()
            committed = time.monotonic()
            deadline = committed + 30
            while len(state["arrivals"]) < len(clients) and time.monotonic() < deadline:
                await task.deferLater(reactor, 0.005, lambda: None)
            got = [t - committed for t in state["arrivals"].values()]
            if len(got) < len(clients):
                raise RuntimeError(f"round {r}: {len(got)}/{len(clients)} arrived")
            if r:  # round 0 warms up
                delays.extend(got)
                last.append(max(got))
            await task.deferLater(reactor, 0.2, lambda: None)
        delays.sort()
        results["p50_ms"] = 1000 * delays[len(delays) // 2]
        results["p99_ms"] = 1000 * delays[int(len(delays) * 0.99)]
        results["max_ms"] = 1000 * delays[-1]
        results["every_client_p50_ms"] = 1000 * statistics.median(last)
        results["every_client_max_ms"] = 1000 * max(last)
        results["rss_end_kib"] = rss_kib(server_pid)
        results["round_max_ms"] = [round(1000 * x, 1) for x in last]
        for c in clients:
            c.transport.loseConnection()

    def run() -> defer.Deferred:
        return defer.ensureDeferred(main())

    failure: list = []

    def done(result: object) -> None:
        if not isinstance(result, type(None)):
            failure.append(result)
        reactor.stop()

    reactor.callWhenRunning(lambda: run().addBoth(done))
    reactor.run()
    db.close()
    if failure:
        failure[0].raiseException()
    return results


def start_fibers(dsn: str, port: int, workdir: str) -> subprocess.Popen:
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    return subprocess.Popen(
        [
            twistd,
            "-n",
            "--pidfile=",
            "--logfile",
            os.path.join(workdir, "twistd.log"),
            "klein-demo",
            "--dsn",
            dsn,
            "--sample-data",
            "--listen",
            f"tcp:{port}:interface=127.0.0.1:backlog=1024",
        ],
        cwd=workdir,
    )


def start_threads(dsn: str, port: int, workdir: str) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            os.path.abspath(__file__),
            "--serve-threads",
            "--dsn",
            dsn,
            "--port",
            str(port),
        ],
        cwd=workdir,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--warm", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--only", choices=["fibers", "threads"])
    parser.add_argument("--serve-threads", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--dsn", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    limit = raise_nofile(4 * args.clients + 1024)
    if args.serve_threads:
        serve_threads(args.dsn, args.port)
        return
    if limit < 2 * args.clients + 200:
        sys.exit(f"ulimit -n is {limit}: too low for {args.clients} clients")

    from txfiberdb.testing import TemporaryPostgres

    pg = TemporaryPostgres().start()
    rows = []
    try:
        dsn = pg.dsn()
        if args.only == "threads":
            # The schema and sample data come from the demo: run it once.
            workdir = tempfile.mkdtemp(prefix="txfiberdb-live-seed-")
            port = free_port()
            seed = start_fibers(dsn, port, workdir)
            wait_port(port, seed)
            seed.send_signal(signal.SIGTERM)
            seed.wait(60)
        for kind, start in [("fibers", start_fibers), ("threads", start_threads)]:
            if args.only and kind != args.only:
                continue
            workdir = tempfile.mkdtemp(prefix=f"txfiberdb-live-{kind}-")
            port = free_port()
            proc = start(dsn, port, workdir)
            try:
                wait_port(port, proc)
                time.sleep(1.0)
                result = run_clients_subprocess(args, port, proc.pid, dsn)
                rows.append((kind, result))
                print(kind, json.dumps(result), flush=True)
            finally:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    finally:
        pg.stop()
    print()
    print(f"{args.clients} clients held, {args.rounds} rounds")
    print()
    print(
        "| server | RSS before (MiB) | RSS held (MiB) | KiB / client | threads |"
        " p50 (ms) | p99 (ms) | max (ms) | every client, median round (ms) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for kind, r in rows:
        print(
            f"| {kind} | {r['rss_base_kib'] / 1024:.1f} | {r['rss_held_kib'] / 1024:.1f}"
            f" | {r['per_client_kib']:.1f} | {r['threads']} | {r['p50_ms']:.1f}"
            f" | {r['p99_ms']:.1f} | {r['max_ms']:.1f} | {r['every_client_p50_ms']:.1f} |"
        )


def run_clients_subprocess(args, port: int, pid: int, dsn: str) -> dict:
    """The clients in a child process: each run gets a fresh reactor."""
    out = subprocess.run(
        [
            sys.executable,
            os.path.abspath(__file__),
            "--clients-only",
            json.dumps(
                {
                    "clients": args.clients,
                    "warm": args.warm,
                    "rounds": args.rounds,
                    "port": port,
                    "pid": pid,
                    "dsn": dsn,
                }
            ),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def clients_only(spec: str) -> None:
    s = json.loads(spec)
    raise_nofile(4 * s["clients"] + 1024)
    args = argparse.Namespace(clients=s["clients"], warm=s["warm"], rounds=s["rounds"])
    print(json.dumps(run_clients(args, s["port"], s["pid"], s["dsn"])))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--clients-only":
        clients_only(sys.argv[2])
    else:
        main()
