"""
Driver round trips: point queries per second and client CPU per query, for
txfiberdb.dbapi and the usual alternatives, in one run.

Two statements, ``SELECT 1`` and a primary-key point select
(``SELECT id, name, price FROM bench_items WHERE id = %s`` on 10,000 rows,
random ids), each run

- sequentially on ONE connection (one query in flight), and
- by 20 concurrent workers (20 queries in flight),

by every client below.  Each client runs in subprocesses of its own (the
Twisted reactor runs once per process, and no client pays for another's
imports or garbage); the rounds of the clients are interleaved, and the table
gives the median over ``--rounds`` rounds of queries/s and client CPU per
query (``time.process_time`` of the client process, all its threads; the
server's CPU is not counted), with the ratios of ours to each.

Where things run.  On a small VM the figures depend mostly on where the
scheduler puts the client and the server's backends: on the same CPU a
sequential query costs client CPU + server CPU + two context switches; on
two CPUs each reply also waits for an idle CPU to wake up (tens of µs on a
VM).  Left to itself the scheduler flips between the two from run to run and
with the load of other processes.  So, with our own server (not with
$TXFIBERDB_TEST_DSN), the client process and its backends are pinned
(``sched_setaffinity``) in four setups:

- 1 worker, client and backend on the SAME CPU ("1, same CPU");
- 1 worker, client and backend on TWO CPUs ("1, two CPUs");
- 20 workers, nothing pinned ("20");
- 20 workers, the client on one CPU, all its backends on the other
  ("20, split": as with the database on another machine).

Each client starts only once the machine is quiet (other processes below 25%
CPU), to keep other work on a shared machine out of the figures.

Clients (all in autocommit: no BEGIN/COMMIT anywhere):

- ``txfiberdb``: ``txfiberdb.dbapi`` in fibers; one cursor per connection,
  reused; at 20 workers, 20 fibers each with a connection of its own.
- ``txfiberdb-prepared``: the same with ``prepare_threshold=5`` (auto-prepare,
  the dialect's default): from the 6th run on, ``EXECUTE`` of a statement
  prepared on the connection.
- ``txpostgres``: ``Connection.runQuery`` (sequential); 20
  ``inlineCallbacks`` workers on a ``ConnectionPool`` of 20.
- ``adbapi``: ``twisted.enterprise.adbapi.ConnectionPool("psycopg2")``,
  ``runQuery``: 1 thread and connection (sequential); 20 threads and
  connections with 20 workers.
- ``psycopg2``: blocking, one thread; at 20 workers, 20 threads each with
  its own connection (a reference: it is not an event-loop client).
- ``asyncpg``: ``Connection.fetchrow`` on the default asyncio loop; at 20
  workers both a pool of 20 with 20 tasks calling ``pool.fetchrow`` and 20
  tasks each holding a connection of its own.

Run:  python bench/driver.py [--rounds 3] [--seconds 0.4]
The server: $TXFIBERDB_TEST_DSN if set (the table ``bench_items`` is created
in it, and dropped at the end; nothing is pinned), else a TemporaryPostgres
of its own.
"""

from __future__ import annotations

import os
import sys

# Run as a script, this directory comes first on sys.path: keep sibling
# scripts from shadowing modules (a bench/http.py once hid the stdlib's).
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(
    os.path.abspath(__file__)
):
    del sys.path[0]

import argparse  # noqa: E402
import functools  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from importlib.metadata import version  # noqa: E402
from typing import Any

ROWS = 10_000
WORKERS = 20
TABLE = "bench_items"
SQL = {
    "select1": "SELECT 1",
    "pk": f"SELECT id, name, price FROM {TABLE} WHERE id = %s",
}
SQL_ASYNCPG = {
    "select1": "SELECT 1",
    "pk": f"SELECT id, name, price FROM {TABLE} WHERE id = $1",
}
WORKLOADS = [("select1", "`SELECT 1`"), ("pk", "primary-key select")]
# phase: (label, workers, client CPUs, backend CPUs); None: not pinned.
CLIENT_CPU, SERVER_CPU = 0, 1
PHASES: dict[str, tuple[str, int, Any, Any]] = {
    "same": ("1, same CPU", 1, {CLIENT_CPU}, {CLIENT_CPU}),
    "cross": ("1, two CPUs", 1, {CLIENT_CPU}, {SERVER_CPU}),
    "seq": ("1", 1, None, None),
    "par": ("20", WORKERS, None, None),
    "split": ("20, split", WORKERS, {CLIENT_CPU}, {SERVER_CPU}),
}

_perf = time.perf_counter
_cpu = time.process_time


@functools.cache
def _ids(seed: int) -> list[int]:
    """
    4,096 random ids (indexed with ``i & 4095``): no RNG inside the loop.
    Cached: the warm-up computes them, the timed batches reuse them.
    """
    rnd = random.Random(seed)
    return [rnd.randint(1, ROWS) for _ in range(4096)]


def _params(workload: str, ids: list[int], i: int) -> Any:
    return (ids[i & 4095],) if workload == "pk" else None


def _check(workload: str, row: Any, params: Any) -> None:
    expected = 1 if workload == "select1" else params[0]
    assert row is not None and row[0] == expected, (workload, row, params)


def _workers(args: argparse.Namespace) -> int:
    return PHASES[args.phase][1]


def _pin_backends(args: argparse.Namespace) -> None:
    """
    Pin every client backend of the database (this client's connections:
    nobody else uses the database meanwhile) as the phase says.  Blocking
    psycopg2, called after a warm-up, before timing.
    """
    cpus = PHASES[args.phase][3]
    if cpus is None:
        return
    import psycopg2

    conn = psycopg2.connect(args.dsn)
    try:
        cur = conn.cursor()
        cur.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
            "AND backend_type = 'client backend' AND pid <> pg_backend_pid()"
        )
        for (pid,) in cur.fetchall():
            os.sched_setaffinity(pid, cpus)
    finally:
        conn.close()


class Cell:
    """One timed measurement: queries done, wall seconds, CPU seconds."""

    def __init__(self, workload: str, variant: str) -> None:
        self.key = f"{workload}|{variant}"
        self.queries = 0
        self.wall = 0.0
        self.cpu = 0.0

    def begin(self) -> None:
        gc.collect()
        self._w, self._c = _perf(), _cpu()

    def end(self, queries: int) -> None:
        self.wall = _perf() - self._w
        self.cpu = _cpu() - self._c
        self.queries = queries

    def as_dict(self) -> dict[str, Any]:
        return {"key": self.key, "q": self.queries, "wall": self.wall, "cpu": self.cpu}


# --------------------------------------------------------------------------
# Children: each runs the cells of one client in one phase, prints JSON.
# --------------------------------------------------------------------------


def _twisted_child(body: Callable[..., Any], args: argparse.Namespace) -> list[Any]:
    """Run ``body(args, cells)`` (may return a Deferred) in one reactor run."""
    from twisted.internet import reactor as _reactor
    from twisted.internet.defer import maybeDeferred

    reactor: Any = _reactor
    cells: list[Cell] = []
    outcome: list[Any] = []

    def go() -> None:
        d = maybeDeferred(body, args, cells)
        d.addBoth(outcome.append)
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(go)
    reactor.run()
    if outcome and hasattr(outcome[0], "raiseException"):
        outcome[0].raiseException()
    return [c.as_dict() for c in cells]


def _sync_loop(conn: Any, workload: str, ids: list[int], until: float, n: int) -> int:
    """One worker on a DB-API connection (txfiberdb.dbapi or psycopg2)."""
    cur = conn.cursor()
    sql = SQL[workload]
    i = 0
    while True:
        params = _params(workload, ids, i)
        cur.execute(sql, params)
        row = cur.fetchone()
        i += 1
        if i == 1:
            _check(workload, row, params)
        if (n and i >= n) or (not n and _perf() >= until):
            return i


def child_txfiberdb(args: argparse.Namespace, **options: Any) -> list[Any]:
    from twisted.internet.defer import gatherResults

    from txfiberdb import dbapi
    from txfiberdb.fiber import await_deferred, run_in_fiber

    def connect() -> Any:
        conn = dbapi.connect(args.dsn, **options)
        conn.autocommit = True
        return conn

    def main(args: argparse.Namespace, cells: list[Cell]) -> None:
        conns = [connect() for _ in range(_workers(args))]
        for workload, _ in WORKLOADS:

            def batch(workload: str, until: float, n: int) -> int:
                ds = [
                    run_in_fiber(_sync_loop, c, workload, _ids(100 + k), until, n)
                    for k, c in enumerate(conns)
                ]
                counts: list[int] = await_deferred(gatherResults(ds))  # type: ignore[arg-type]
                return sum(counts)

            batch(workload, 0, args.warmup // len(conns) + 1)
            _pin_backends(args)
            cell = Cell(workload, args.phase)
            cell.begin()
            cell.end(batch(workload, _perf() + args.seconds, 0))
            cells.append(cell)
        for c in conns:
            c.close()

    return _twisted_child(lambda a, c: run_in_fiber(main, a, c), args)


def _icb_worker(
    run: Callable[..., Any], workload: str, ids: list[int], until: float, n: int
) -> Any:
    """An inlineCallbacks worker: ``yield run(sql, params)`` until done."""
    from twisted.internet.defer import inlineCallbacks, returnValue

    @inlineCallbacks
    def go() -> Any:
        sql = SQL[workload]
        i = 0
        while True:
            params = _params(workload, ids, i)
            rows = yield run(sql, params)
            i += 1
            if i == 1:
                _check(workload, rows[0], params)
            if (n and i >= n) or (not n and _perf() >= until):
                returnValue(i)

    return go()


def _icb_cells(
    args: argparse.Namespace, cells: list[Cell], run: Callable[..., Any]
) -> Any:
    from twisted.internet.defer import gatherResults, inlineCallbacks

    workers = _workers(args)

    @inlineCallbacks
    def go() -> Any:
        for workload, _ in WORKLOADS:

            def batch(workload: str, until: float, n: int) -> Any:
                return gatherResults(
                    [
                        _icb_worker(run, workload, _ids(100 + k), until, n)
                        for k in range(workers)
                    ]
                )

            yield batch(workload, 0, args.warmup // workers + 1)
            _pin_backends(args)
            cell = Cell(workload, args.phase)
            cell.begin()
            counts = yield batch(workload, _perf() + args.seconds, 0)
            cell.end(sum(counts))
            cells.append(cell)

    return go()


def child_txpostgres(args: argparse.Namespace) -> list[Any]:
    from twisted.internet.defer import inlineCallbacks
    from txpostgres import txpostgres

    @inlineCallbacks
    def body(args: argparse.Namespace, cells: list[Cell]) -> Any:
        if _workers(args) > 1:
            pool = txpostgres.ConnectionPool(None, args.dsn, min=WORKERS)
            yield pool.start()
            yield _icb_cells(args, cells, pool.runQuery)
            pool.close()
        else:
            conn = txpostgres.Connection()
            yield conn.connect(args.dsn)
            yield _icb_cells(args, cells, conn.runQuery)
            conn.close()

    return _twisted_child(body, args)


def child_adbapi(args: argparse.Namespace) -> list[Any]:
    from twisted.enterprise import adbapi
    from twisted.internet.defer import inlineCallbacks

    def autocommit(conn: Any) -> None:
        conn.autocommit = True

    @inlineCallbacks
    def body(args: argparse.Namespace, cells: list[Cell]) -> Any:
        workers = _workers(args)
        pool = adbapi.ConnectionPool(
            "psycopg2", args.dsn, cp_min=workers, cp_max=workers, cp_openfun=autocommit
        )
        yield _icb_cells(args, cells, pool.runQuery)
        pool.close()

    return _twisted_child(body, args)


def child_psycopg2(args: argparse.Namespace) -> list[Any]:
    import psycopg2

    def connect() -> Any:
        conn = psycopg2.connect(args.dsn)
        conn.autocommit = True
        return conn

    cells = []
    if _workers(args) == 1:
        conn = connect()
        for workload, _ in WORKLOADS:
            ids = _ids(100)
            _sync_loop(conn, workload, ids, 0, args.warmup)
            _pin_backends(args)
            cell = Cell(workload, args.phase)
            cell.begin()
            cell.end(_sync_loop(conn, workload, ids, _perf() + args.seconds, 0))
            cells.append(cell)
        conn.close()
        return [c.as_dict() for c in cells]

    conns = [connect() for _ in range(WORKERS)]
    for workload, _ in WORKLOADS:

        def batch(workload: str, seconds: float, n: int) -> Cell:
            counts = [0] * WORKERS
            barrier = threading.Barrier(WORKERS + 1)
            deadline: list[float] = []

            def worker(k: int) -> None:
                barrier.wait()
                until = deadline[0] if seconds else 0.0
                counts[k] = _sync_loop(conns[k], workload, _ids(100 + k), until, n)

            threads = [
                threading.Thread(target=worker, args=(k,)) for k in range(WORKERS)
            ]
            for t in threads:
                t.start()
            cell = Cell(workload, args.phase)
            cell.begin()
            deadline.append(_perf() + seconds)
            barrier.wait()
            for t in threads:
                t.join()
            cell.end(sum(counts))
            return cell

        batch(workload, 0, args.warmup // WORKERS + 1)
        _pin_backends(args)
        cells.append(batch(workload, args.seconds, 0))
    for c in conns:
        c.close()
    return [c.as_dict() for c in cells]


def child_asyncpg(args: argparse.Namespace) -> list[Any]:
    import asyncio

    import asyncpg
    import psycopg2.extensions

    p = psycopg2.extensions.parse_dsn(args.dsn)
    kw = {
        "host": p.get("host"),
        "port": int(p.get("port", 5432)),
        "user": p.get("user"),
        "password": p.get("password"),
        "database": p.get("dbname"),
    }

    async def loop(
        fetchrow: Any, workload: str, ids: list[int], until: float, n: int
    ) -> int:
        sql = SQL_ASYNCPG[workload]
        i = 0
        while True:
            params = _params(workload, ids, i)
            row = await (fetchrow(sql, *params) if params else fetchrow(sql))
            i += 1
            if i == 1:
                _check(workload, row, params)
            if (n and i >= n) or (not n and _perf() >= until):
                return i

    async def cells_for(cells: list[Cell], fetchrows: list[Any], variant: str) -> None:
        for workload, _ in WORKLOADS:

            async def batch(workload: str, until: float, n: int) -> int:
                counts = await asyncio.gather(
                    *[
                        loop(f, workload, _ids(100 + k), until, n)
                        for k, f in enumerate(fetchrows)
                    ]
                )
                return sum(counts)

            await batch(workload, 0, args.warmup // len(fetchrows) + 1)
            _pin_backends(args)
            cell = Cell(workload, variant)
            cell.begin()
            cell.end(await batch(workload, _perf() + args.seconds, 0))
            cells.append(cell)

    async def main() -> list[Cell]:
        cells: list[Cell] = []
        if _workers(args) == 1:
            conn = await asyncpg.connect(**kw)
            await cells_for(cells, [conn.fetchrow], args.phase)
            await conn.close()
            return cells
        pool = await asyncpg.create_pool(min_size=WORKERS, max_size=WORKERS, **kw)
        await cells_for(cells, [pool.fetchrow] * WORKERS, args.phase)
        await pool.close()
        conns = [await asyncpg.connect(**kw) for _ in range(WORKERS)]
        await cells_for(cells, [c.fetchrow for c in conns], args.phase + "-own")
        for c in conns:
            await c.close()
        return cells

    return [c.as_dict() for c in asyncio.run(main())]


def child_txfiberdb_prepared(args: argparse.Namespace) -> list[Any]:
    """txfiberdb.dbapi with auto-prepare at the dialect's default threshold."""
    return child_txfiberdb(args, prepare_threshold=5)


CHILDREN: dict[str, Callable[[argparse.Namespace], list[Any]]] = {
    "txfiberdb": child_txfiberdb,
    "txfiberdb-prepared": child_txfiberdb_prepared,
    "txpostgres": child_txpostgres,
    "adbapi": child_adbapi,
    "psycopg2": child_psycopg2,
    "asyncpg": child_asyncpg,
}

# (client, variant suffix, label at 1 worker, label at 20 workers)
TABLE_ROWS = [
    (
        "txfiberdb",
        "",
        "txfiberdb.dbapi in a fiber",
        "txfiberdb.dbapi, 20 fibers x own connection",
    ),
    (
        "txfiberdb-prepared",
        "",
        "txfiberdb.dbapi in a fiber, auto-prepare",
        "txfiberdb.dbapi, 20 fibers x own connection, auto-prepare",
    ),
    (
        "txpostgres",
        "",
        "txpostgres `Connection.runQuery`",
        "txpostgres `ConnectionPool(20).runQuery`",
    ),
    ("adbapi", "", "adbapi + psycopg2, 1 thread", "adbapi + psycopg2, 20 threads"),
    (
        "psycopg2",
        "",
        "psycopg2 blocking",
        "psycopg2 blocking, 20 threads x own connection (reference)",
    ),
    ("asyncpg", "", "asyncpg `fetchrow`", "asyncpg `pool(20).fetchrow`, 20 tasks"),
    ("asyncpg", "-own", None, "asyncpg, 20 tasks x own connection"),
]


# --------------------------------------------------------------------------
# Parent: the server, the rounds, the table.
# --------------------------------------------------------------------------


def _prepare(dsn: str) -> str:
    import psycopg2

    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    cur = conn.cursor()
    cur.execute(f"DROP TABLE IF EXISTS {TABLE}")
    cur.execute(
        f"CREATE TABLE {TABLE} (id integer PRIMARY KEY, name text NOT NULL, "
        f"price numeric(10, 2) NOT NULL)"
    )
    cur.execute(
        f"INSERT INTO {TABLE} SELECT i, 'item ' || i, (i % 1000) / 10.0 "
        f"FROM generate_series(1, {ROWS}) i"
    )
    cur.execute(f"VACUUM ANALYZE {TABLE}")
    cur.execute("SHOW server_version")
    server = str(cur.fetchone()[0]).split()[0]
    conn.close()
    return server


def _drop(dsn: str) -> None:
    import psycopg2

    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    conn.cursor().execute(f"DROP TABLE IF EXISTS {TABLE}")
    conn.close()


def _revision() -> str:
    """txfiberdb's version and git revision (``+dirty`` with local changes)."""
    from txfiberdb import __version__

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        rev = subprocess.run(
            ["git", "-C", root, "describe", "--always", "--dirty=+dirty"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        rev = ""
    return f"{__version__} ({rev})" if rev else __version__


def _busy(interval: float = 0.25) -> float:
    """The machine's CPU use (0..1) over ``interval``, from /proc/stat."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        return sum(fields), fields[3] + fields[4]

    t0, i0 = sample()
    time.sleep(interval)
    t1, i1 = sample()
    return 1 - (i1 - i0) / max(t1 - t0, 1)


class QuietGate:
    """Wait (up to ``limit`` s) until the machine is quiet before a child."""

    def __init__(self, threshold: float, limit: float) -> None:
        self.threshold = threshold
        self.limit = limit
        self.waited = 0.0
        self.gave_up = 0

    def wait(self) -> None:
        if self.threshold >= 1:
            return
        start = _perf()
        while _busy() > self.threshold:
            if _perf() - start > self.limit:
                self.gave_up += 1
                break
        self.waited += _perf() - start


def _run_child(
    client: str, phase: str, args: argparse.Namespace, dsn: str
) -> list[Any]:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", client]
    cmd += ["--phase", phase, "--dsn", dsn]
    cmd += ["--seconds", str(args.seconds), "--warmup", str(args.warmup)]
    cpus = PHASES[phase][2]

    def preexec() -> None:  # the client process, and all its threads
        if cpus is not None:
            os.sched_setaffinity(0, cpus)

    out = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=preexec)
    if out.returncode:
        raise SystemExit(f"{client} ({phase}) failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=0.4, help="per timed cell")
    parser.add_argument("--warmup", type=int, default=400, help="queries before a cell")
    parser.add_argument("--only", help="comma-separated clients (default: all)")
    parser.add_argument(
        "--quiet",
        type=float,
        default=0.25,
        help="start a client only when the machine's CPU use is below this (1: off)",
    )
    parser.add_argument("--phases", help="comma-separated setups (default: all)")
    parser.add_argument("--verbose", action="store_true", help="print every cell")
    parser.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    parser.add_argument("--phase", choices=sorted(PHASES), help=argparse.SUPPRESS)
    parser.add_argument("--dsn", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        print(json.dumps(CHILDREN[args.child](args)))
        return

    server_pg = None
    dsn = os.environ.get("TXFIBERDB_TEST_DSN")
    if not dsn:
        import psycopg2

        from txfiberdb.testing._postgres import TemporaryPostgres

        server_pg = TemporaryPostgres().start()
        admin = psycopg2.connect(server_pg.dsn("postgres"))
        admin.autocommit = True
        admin.cursor().execute("CREATE DATABASE bench")
        admin.close()
        dsn = server_pg.dsn("bench")
    # Pin only our own server's processes, and only with two CPUs or more.
    pin = server_pg is not None and len(os.sched_getaffinity(0)) >= 2
    phases = ["same", "cross", "par", "split"] if pin else ["seq", "par"]
    if args.phases:
        phases = [p for p in phases if p in args.phases.split(",")]
    gate = QuietGate(args.quiet, limit=20.0)
    try:
        server = _prepare(dsn)
        clients = list(CHILDREN)
        if args.only:
            clients = [c for c in clients if c in args.only.split(",")]
        results: dict[str, list[tuple[float, float]]] = {}
        started = _perf()
        for r in range(args.rounds):
            order = clients if r % 2 == 0 else clients[::-1]
            for phase in phases:
                for client in order:
                    gate.wait()
                    for cell in _run_child(client, phase, args, dsn):
                        key = f"{client}|{cell['key']}"
                        qps = cell["q"] / cell["wall"]
                        cpu_us = cell["cpu"] / cell["q"] * 1e6
                        results.setdefault(key, []).append((qps, cpu_us))
                        if args.verbose:
                            print(
                                f"  {key}: {qps:,.0f} q/s, {cpu_us:.1f} µs",
                                file=sys.stderr,
                            )
            print(
                f"round {r + 1}/{args.rounds} done ({_perf() - started:.0f} s)",
                file=sys.stderr,
            )
        _drop(dsn)
    finally:
        if server_pg is not None:
            server_pg.stop()

    med = {
        k: (statistics.median(v[0] for v in vs), statistics.median(v[1] for v in vs))
        for k, vs in results.items()
    }
    print(
        f"txfiberdb {_revision()}, "
        f"Python {platform.python_version()}, {os.cpu_count()} CPUs, PostgreSQL "
        f"{server} on loopback TCP, Twisted {version('twisted')} (epoll), txpostgres "
        f"{version('txpostgres')}, psycopg2 {version('psycopg2-binary')}, asyncpg "
        f"{version('asyncpg')}, greenlet {version('greenlet')}; median of "
        f"{args.rounds} rounds x {args.seconds} s per cell; waited {gate.waited:.0f} s "
        "for a quiet machine"
        + (f" (gave up {gate.gave_up} times)" if gate.gave_up else "")
        + "\n"
    )
    print(
        "| statement | workers | client | queries/s | client CPU µs/query "
        "| ours q/s ÷ this | ours CPU ÷ this |"
    )
    print("|---|---|---|---:|---:|---:|---:|")
    for workload, wlabel in WORKLOADS:
        for phase in phases:
            label_, workers, _, _ = PHASES[phase]
            ours = med.get(f"txfiberdb|{workload}|{phase}")
            for client, suffix, label1, label20 in TABLE_ROWS:
                key = f"{client}|{workload}|{phase}{suffix}"
                label = label20 if workers > 1 else label1
                if label is None or key not in med:
                    continue
                qps, cpu = med[key]
                rq = f"{ours[0] / qps:.2f}" if ours else "-"
                rc = f"{ours[1] / cpu:.2f}" if ours else "-"
                print(
                    f"| {wlabel} | {label_} | {label} | {qps:,.0f} | {cpu:.1f} "
                    f"| {rq} | {rc} |"
                )
    print()
    for workload, wlabel in WORKLOADS:
        for phase in phases:
            if PHASES[phase][1] == 1:
                continue
            prep = med.get(f"txfiberdb-prepared|{workload}|{phase}")
            raw = med.get(f"txpostgres|{workload}|{phase}")
            own = med.get(f"asyncpg|{workload}|{phase}-own")
            where = f"{wlabel}, {PHASES[phase][0]} workers, auto-prepare"
            if prep and raw:
                print(
                    f"- {where}: ours / raw txpostgres = {prep[0] / raw[0]:.2f}x q/s "
                    "(goal >= 1.3x)"
                )
            if prep and own:
                print(
                    f"- {where}: ours / asyncpg x own connection = "
                    f"{prep[0] / own[0]:.2f}x q/s (goal >= 1.0x)"
                )
    for workload, wlabel in WORKLOADS:
        for phase in phases:
            if PHASES[phase][1] > 1:
                continue
            ours = med.get(f"txfiberdb|{workload}|{phase}")
            raw = med.get(f"txpostgres|{workload}|{phase}")
            blocking = med.get(f"psycopg2|{workload}|{phase}")
            where = f"{wlabel}, sequential ({PHASES[phase][0]})"
            if ours and raw:
                print(
                    f"- {where}: ours / raw txpostgres = {ours[0] / raw[0]:.2f}x q/s "
                    "(goal >= 2x)"
                )
            if ours and blocking:
                print(
                    f"- {where}: our CPU per query / blocking psycopg2's = "
                    f"{ours[1] / blocking[1]:.2f}x (goal <= 2x)"
                )


if __name__ == "__main__":
    main()
