"""
Driver round trips: point queries per second and client CPU per query, for
txfiberdb.dbapi and the usual alternatives, in one run.

Two statements, ``SELECT 1`` and a primary-key point select
(``SELECT id, name, price FROM bench_items WHERE id = %s`` on 10,000 rows),
each run

- sequentially on ONE connection (one worker, one query in flight), and
- by 20 concurrent workers (20 queries in flight),

by every client below.  Each client runs in a subprocess of its own (the
Twisted reactor runs once per process, and no client pays for another's
imports or garbage); the rounds of the clients are interleaved, and the table
gives the median over ``--rounds`` rounds of queries/s and client CPU per
query (``time.process_time`` of the client process: all its threads, not the
server), with ratios of ours to each.

Clients (all autocommit: no BEGIN/COMMIT anywhere):

- ``txfiberdb``: ``txfiberdb.dbapi`` in fibers; parallel: 20 fibers, each
  with a connection of its own; one cursor per connection, reused.
- ``txpostgres``: ``Connection.runQuery`` (sequential), ``ConnectionPool``
  of 20 with 20 ``inlineCallbacks`` workers (parallel).
- ``adbapi``: ``twisted.enterprise.adbapi.ConnectionPool("psycopg2")``,
  20 threads; one worker (sequential) or 20 workers calling ``runQuery``.
- ``psycopg2``: blocking, one thread (sequential); parallel: 20 threads,
  each with its own connection (a reference: it is not an event-loop client).
- ``asyncpg``: ``Connection.fetchrow`` on the default asyncio loop; parallel:
  a pool of 20 with 20 tasks calling ``pool.fetchrow``, and 20 tasks each
  holding a connection of their own.

Run:  python bench/driver.py [--rounds 3] [--seconds 1.0]
A server: $TXFIBERDB_TEST_DSN if set (the table ``bench_items`` is created in
it, and dropped at the end), else a TemporaryPostgres of its own.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import threading
import time
from importlib.metadata import version
from typing import Any, Callable

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

_perf = time.perf_counter
_cpu = time.process_time


def _ids(seed: int) -> list[int]:
    """4,096 random ids (indexed with ``i & 4095``): no RNG inside the loop."""
    rnd = random.Random(seed)
    return [rnd.randint(1, ROWS) for _ in range(4096)]


def _params(workload: str, ids: list[int], i: int) -> Any:
    return (ids[i & 4095],) if workload == "pk" else None


def _check(workload: str, row: Any, params: Any) -> None:
    expected = 1 if workload == "select1" else params[0]
    assert row is not None and row[0] == expected, (workload, row, params)


class Cell:
    """One timed measurement: queries done, wall seconds, CPU seconds."""

    def __init__(self, workload: str, workers: int, variant: str) -> None:
        self.key = f"{workload}|{workers}|{variant}"
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
# Children: each runs every cell of one client and prints a JSON list.
# --------------------------------------------------------------------------


def _twisted_child(body: Callable[..., Any], args: argparse.Namespace) -> list[Any]:
    """Run ``body(args, cells)`` (returns a Deferred) in the one reactor run."""
    from twisted.internet import reactor
    from twisted.internet.defer import maybeDeferred

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


def child_txfiberdb(args: argparse.Namespace) -> list[Any]:
    from twisted.internet.defer import gatherResults

    from txfiberdb import dbapi
    from txfiberdb.fiber import await_deferred, run_in_fiber

    def loop(conn: Any, workload: str, ids: list[int], until: float, n: int) -> int:
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

    def connect() -> Any:
        conn = dbapi.connect(args.dsn)
        conn.autocommit = True
        return conn

    def main(args: argparse.Namespace, cells: list[Cell]) -> None:
        conn = connect()
        for workload, _ in WORKLOADS:
            ids = _ids(1)
            loop(conn, workload, ids, 0, args.warmup)
            cell = Cell(workload, 1, "seq")
            cell.begin()
            done = loop(conn, workload, ids, _perf() + args.seconds, 0)
            cell.end(done)
            cells.append(cell)
        conn.close()
        conns = [connect() for _ in range(WORKERS)]
        for workload, _ in WORKLOADS:

            def parallel(until: float, n: int) -> int:
                ds = [
                    run_in_fiber(loop, c, workload, _ids(100 + k), until, n)
                    for k, c in enumerate(conns)
                ]
                return sum(await_deferred(gatherResults(ds)))

            parallel(0, args.warmup // WORKERS + 1)
            cell = Cell(workload, WORKERS, "par")
            cell.begin()
            done = parallel(_perf() + args.seconds, 0)
            cell.end(done)
            cells.append(cell)
        for c in conns:
            c.close()

    def body(args: argparse.Namespace, cells: list[Cell]) -> Any:
        return run_in_fiber(main, args, cells)

    return _twisted_child(body, args)


def _icb_loop(run: Callable[..., Any], workload: str, ids: list[int], until: float, n: int) -> Any:
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
    args: argparse.Namespace, cells: list[Cell], run: Callable[..., Any], variant: str, workers: int
) -> Any:
    from twisted.internet.defer import gatherResults, inlineCallbacks

    @inlineCallbacks
    def go() -> Any:
        for workload, _ in WORKLOADS:

            def batch(until: float, n: int) -> Any:
                return gatherResults(
                    [_icb_loop(run, workload, _ids(100 + k), until, n) for k in range(workers)]
                )

            yield batch(0, args.warmup // workers + 1)
            cell = Cell(workload, workers, variant)
            cell.begin()
            counts = yield batch(_perf() + args.seconds, 0)
            cell.end(sum(counts))
            cells.append(cell)

    return go()


def child_txpostgres(args: argparse.Namespace) -> list[Any]:
    from twisted.internet.defer import inlineCallbacks
    from txpostgres import txpostgres

    @inlineCallbacks
    def body(args: argparse.Namespace, cells: list[Cell]) -> Any:
        conn = txpostgres.Connection()
        yield conn.connect(args.dsn)
        yield _icb_cells(args, cells, conn.runQuery, "seq", 1)
        conn.close()
        pool = txpostgres.ConnectionPool(None, args.dsn, min=WORKERS)
        yield pool.start()
        yield _icb_cells(args, cells, pool.runQuery, "par", WORKERS)
        pool.close()

    return _twisted_child(body, args)


def child_adbapi(args: argparse.Namespace) -> list[Any]:
    from twisted.enterprise import adbapi
    from twisted.internet import reactor
    from twisted.internet.defer import inlineCallbacks

    def autocommit(conn: Any) -> None:
        conn.autocommit = True

    @inlineCallbacks
    def body(args: argparse.Namespace, cells: list[Cell]) -> Any:
        reactor.suggestThreadPoolSize(WORKERS)
        pool = adbapi.ConnectionPool(
            "psycopg2", args.dsn, cp_min=WORKERS, cp_max=WORKERS, cp_openfun=autocommit
        )
        # 20 workers first, so that all 20 threads have their connection.
        yield _icb_cells(args, [], pool.runQuery, "par", WORKERS)
        yield _icb_cells(args, cells, pool.runQuery, "seq", 1)
        yield _icb_cells(args, cells, pool.runQuery, "par", WORKERS)
        pool.close()

    return _twisted_child(body, args)


def child_psycopg2(args: argparse.Namespace) -> list[Any]:
    import psycopg2

    def connect() -> Any:
        conn = psycopg2.connect(args.dsn)
        conn.autocommit = True
        return conn

    def loop(conn: Any, workload: str, ids: list[int], until: float, n: int) -> int:
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

    cells = []
    conn = connect()
    for workload, _ in WORKLOADS:
        ids = _ids(1)
        loop(conn, workload, ids, 0, args.warmup)
        cell = Cell(workload, 1, "seq")
        cell.begin()
        cell.end(loop(conn, workload, ids, _perf() + args.seconds, 0))
        cells.append(cell)
    conn.close()

    conns = [connect() for _ in range(WORKERS)]
    for workload, _ in WORKLOADS:

        def parallel(until_in: float, n: int) -> tuple[int, Cell]:
            counts = [0] * WORKERS
            gate = threading.Barrier(WORKERS + 1)
            deadline: list[float] = []

            def worker(k: int) -> None:
                gate.wait()
                until = deadline[0] if until_in else 0.0
                counts[k] = loop(conns[k], workload, _ids(100 + k), until, n)

            threads = [threading.Thread(target=worker, args=(k,)) for k in range(WORKERS)]
            for t in threads:
                t.start()
            cell = Cell(workload, WORKERS, "par")
            cell.begin()
            deadline.append(_perf() + until_in)
            gate.wait()
            for t in threads:
                t.join()
            cell.end(sum(counts))
            return sum(counts), cell

        parallel(0, args.warmup // WORKERS + 1)
        _, cell = parallel(args.seconds, 0)
        cells.append(cell)
    for c in conns:
        c.close()
    return [c.as_dict() for c in cells]


def child_asyncpg(args: argparse.Namespace) -> list[Any]:
    import asyncio

    import asyncpg
    import psycopg2.extensions

    params = psycopg2.extensions.parse_dsn(args.dsn)
    kw = {
        "host": params.get("host"),
        "port": int(params.get("port", 5432)),
        "user": params.get("user"),
        "password": params.get("password"),
        "database": params.get("dbname"),
    }

    async def loop(fetchrow: Any, workload: str, ids: list[int], until: float, n: int) -> int:
        sql = SQL_ASYNCPG[workload]
        i = 0
        while True:
            p = _params(workload, ids, i)
            row = await (fetchrow(sql, *p) if p else fetchrow(sql))
            i += 1
            if i == 1:
                _check(workload, row, p)
            if (n and i >= n) or (not n and _perf() >= until):
                return i

    async def cells_for(cells: list[Cell], fetchrows: list[Any], variant: str) -> None:
        for workload, _ in WORKLOADS:

            async def batch(until: float, n: int) -> int:
                counts = await asyncio.gather(
                    *[
                        loop(f, workload, _ids(100 + k), until, n)
                        for k, f in enumerate(fetchrows)
                    ]
                )
                return sum(counts)

            await batch(0, args.warmup // len(fetchrows) + 1)
            cell = Cell(workload, len(fetchrows), variant)
            cell.begin()
            cell.end(await batch(_perf() + args.seconds, 0))
            cells.append(cell)

    async def main() -> list[Cell]:
        cells: list[Cell] = []
        conn = await asyncpg.connect(**kw)
        await cells_for(cells, [conn.fetchrow], "seq")
        await conn.close()
        pool = await asyncpg.create_pool(min_size=WORKERS, max_size=WORKERS, **kw)
        await cells_for(cells, [pool.fetchrow] * WORKERS, "pool")
        await pool.close()
        conns = [await asyncpg.connect(**kw) for _ in range(WORKERS)]
        await cells_for(cells, [c.fetchrow for c in conns], "own")
        for c in conns:
            await c.close()
        return cells

    return [c.as_dict() for c in asyncio.run(main())]


CHILDREN: dict[str, Callable[[argparse.Namespace], list[Any]]] = {
    "txfiberdb": child_txfiberdb,
    "txpostgres": child_txpostgres,
    "adbapi": child_adbapi,
    "psycopg2": child_psycopg2,
    "asyncpg": child_asyncpg,
}

# (client, variant at 1 worker, variant at 20 workers, label at 1, label at 20)
ROWS_OF_TABLE = [
    ("txfiberdb", "seq", "par", "txfiberdb.dbapi in fibers", "txfiberdb.dbapi, 20 fibers x own connection"),
    ("txpostgres", "seq", "par", "txpostgres `Connection.runQuery`", "txpostgres `ConnectionPool(20).runQuery`"),
    ("adbapi", "seq", "par", "adbapi + psycopg2 (20 threads), 1 worker", "adbapi + psycopg2, 20 threads"),
    ("psycopg2", "seq", "par", "psycopg2 blocking", "psycopg2 blocking, 20 threads x own connection (reference)"),
    ("asyncpg", "seq", "pool", "asyncpg `fetchrow`", "asyncpg `pool(20).fetchrow`"),
    ("asyncpg", None, "own", None, "asyncpg, 20 tasks x own connection"),
]


# --------------------------------------------------------------------------
# Parent: the server, the table, the rounds.
# --------------------------------------------------------------------------


def _prepare(dsn: str) -> None:
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
    server = cur.fetchone()[0]
    conn.close()
    return server


def _drop(dsn: str) -> None:
    import psycopg2

    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    conn.cursor().execute(f"DROP TABLE IF EXISTS {TABLE}")
    conn.close()


def _run_child(client: str, args: argparse.Namespace, dsn: str) -> list[Any]:
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--child",
        client,
        "--dsn",
        dsn,
        "--seconds",
        str(args.seconds),
        "--warmup",
        str(args.warmup),
    ]
    out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if out.returncode:
        raise SystemExit(f"{client} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=1.0, help="per timed cell")
    parser.add_argument("--warmup", type=int, default=400, help="queries before a cell")
    parser.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    parser.add_argument("--dsn", help=argparse.SUPPRESS)
    parser.add_argument("--only", help="comma-separated clients (default: all)")
    args = parser.parse_args()

    if args.child:
        print(json.dumps(CHILDREN[args.child](args)))
        return

    server_pg = None
    dsn = os.environ.get("TXFIBERDB_TEST_DSN")
    if not dsn:
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        import psycopg2

        from txfiberdb.testing._postgres import TemporaryPostgres

        server_pg = TemporaryPostgres().start()
        admin = psycopg2.connect(server_pg.dsn("postgres"))
        admin.autocommit = True
        admin.cursor().execute("CREATE DATABASE bench")
        admin.close()
        dsn = server_pg.dsn("bench")
    try:
        server = _prepare(dsn)
        clients = list(CHILDREN)
        if args.only:
            clients = [c for c in clients if c in args.only.split(",")]
        results: dict[str, list[tuple[float, float]]] = {}
        started = _perf()
        for r in range(args.rounds):
            order = clients if r % 2 == 0 else clients[::-1]
            for client in order:
                for cell in _run_child(client, args, dsn):
                    key = f"{client}|{cell['key']}"
                    qps = cell["q"] / cell["wall"]
                    cpu_us = cell["cpu"] / cell["q"] * 1e6
                    results.setdefault(key, []).append((qps, cpu_us))
            print(f"round {r + 1}/{args.rounds} done ({_perf() - started:.0f} s)", file=sys.stderr)
        _drop(dsn)
    finally:
        if server_pg is not None:
            server_pg.stop()

    med = {
        k: (statistics.median(v[0] for v in vs), statistics.median(v[1] for v in vs))
        for k, vs in results.items()
    }
    print(
        f"Python {platform.python_version()}, {os.cpu_count()} CPUs, "
        f"PostgreSQL {server}, Twisted {version('twisted')}, txpostgres "
        f"{version('txpostgres')}, psycopg2 {version('psycopg2-binary')}, asyncpg "
        f"{version('asyncpg')}, greenlet {version('greenlet')}; {args.rounds} rounds "
        f"x {args.seconds} s per cell, median; loopback TCP\n"
    )
    print(
        "| statement | workers | client | queries/s | client CPU µs/query "
        "| ours q/s ÷ this | ours CPU ÷ this |"
    )
    print("|---|---:|---|---:|---:|---:|---:|")
    for workload, wlabel in WORKLOADS:
        for workers, idx in ((1, 1), (WORKERS, 2)):
            ours = med.get(f"txfiberdb|{workload}|{workers}|{'seq' if workers == 1 else 'par'}")
            for row in ROWS_OF_TABLE:
                client, variant, label = row[0], row[idx], row[idx + 2]
                key = f"{client}|{workload}|{workers}|{variant}"
                if variant is None or key not in med:
                    continue
                qps, cpu = med[key]
                rq = f"{ours[0] / qps:.2f}" if ours else "-"
                rc = f"{ours[1] / cpu:.2f}" if ours else "-"
                print(f"| {wlabel} | {workers} | {label} | {qps:,.0f} | {cpu:.1f} | {rq} | {rc} |")
    print()
    for workload, wlabel in WORKLOADS:
        ours = med.get(f"txfiberdb|{workload}|1|seq")
        raw = med.get(f"txpostgres|{workload}|1|seq")
        blocking = med.get(f"psycopg2|{workload}|1|seq")
        if ours and raw:
            print(f"- {wlabel}, sequential: ours / raw txpostgres = {ours[0] / raw[0]:.2f}x q/s (goal >= 2x)")
        if ours and blocking:
            print(
                f"- {wlabel}, sequential: our CPU/query / blocking psycopg2 = "
                f"{ours[1] / blocking[1]:.2f}x (goal <= 2x)"
            )


if __name__ == "__main__":
    main()
