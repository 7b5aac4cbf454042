"""
SQLAlchemy point reads: operations per second for txfiberdb's dialect and the
usual ways of running SQLAlchemy with PostgreSQL, in one run.

Two operations on a table of 10,000 rows, each by primary key, at 1 worker
and at 20 concurrent workers:

- ORM: ``with Session(engine) as s: s.get(Item, id)`` (a fresh Session per
  operation: checkout, BEGIN, SELECT, ROLLBACK, checkin);
- Core: ``with engine.connect() as c: c.execute(select(items).where(items.c.id
  == id)).first()``.

Clients, each in a subprocess of its own, all with a pool of 20
(``pool_size=20, max_overflow=0``, filled before timing):

- ``txfiberdb``: ``postgresql+txpostgres`` in fibers (20 fibers at 20 workers);
- ``asyncpg``: ``create_async_engine("postgresql+asyncpg")`` with
  ``AsyncSession`` / ``AsyncConnection`` (20 tasks);
- ``deferToThread``: sync SQLAlchemy + psycopg2 called through
  ``twisted.internet.threads.deferToThread`` with 20 threads (the
  alchimia/adbapi way);
- ``sync``: sync SQLAlchemy + psycopg2 in one thread: one operation at a
  time; at "20 workers" its row repeats the same one-thread figure, as the
  reference of what no concurrency at all gives.

The rounds of the clients are interleaved; the table gives the median over
``--rounds`` rounds of operations/s and client CPU per operation
(``time.process_time`` of the client process, all threads), with the ratio
of ours to each.

Run:  python bench/orm.py [--rounds 3] [--seconds 1.0]
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
from decimal import Decimal
from importlib.metadata import version
from typing import Any, Callable

from sqlalchemy import Numeric, String, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

ROWS = 10_000
WORKERS = 20
POOL = {"pool_size": WORKERS, "max_overflow": 0}
WORKLOADS = [
    ("orm", "ORM `Session.get`, fresh Session"),
    ("core", "Core `select` by primary key"),
]

_perf = time.perf_counter
_cpu = time.process_time


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "bench_items"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(50))
    price: Mapped[Decimal] = mapped_column(Numeric(10, 2))


items = Item.__table__


def _ids(seed: int) -> list[int]:
    """4,096 random ids (indexed with ``i & 4095``): no RNG inside the loop."""
    rnd = random.Random(seed)
    return [rnd.randint(1, ROWS) for _ in range(4096)]


# The two operations, synchronous (txfiberdb, deferToThread, sync).


def orm_get(engine: Any, id: int) -> None:
    with Session(engine) as s:
        item = s.get(Item, id)
        assert item is not None and item.id == id


def core_pk(engine: Any, id: int) -> None:
    with engine.connect() as c:
        row = c.execute(select(items).where(items.c.id == id)).first()
        assert row is not None and row.id == id


OPS = {"orm": orm_get, "core": core_pk}


class Cell:
    """One timed measurement: operations done, wall seconds, CPU seconds."""

    def __init__(self, workload: str, workers: int) -> None:
        self.key = f"{workload}|{workers}"
        self.ops = 0
        self.wall = 0.0
        self.cpu = 0.0

    def begin(self) -> None:
        gc.collect()
        self._w, self._c = _perf(), _cpu()

    def end(self, ops: int) -> None:
        self.wall = _perf() - self._w
        self.cpu = _cpu() - self._c
        self.ops = ops

    def as_dict(self) -> dict[str, Any]:
        return {"key": self.key, "ops": self.ops, "wall": self.wall, "cpu": self.cpu}


def _sync_loop(op: Callable[..., None], engine: Any, ids: list[int], until: float, n: int) -> int:
    i = 0
    while True:
        op(engine, ids[i & 4095])
        i += 1
        if (n and i >= n) or (not n and _perf() >= until):
            return i


def _url(dsn: str, driver: str) -> Any:
    import psycopg2.extensions
    from sqlalchemy.engine import URL

    p = psycopg2.extensions.parse_dsn(dsn)
    return URL.create(
        f"postgresql+{driver}",
        username=p.get("user"),
        password=p.get("password"),
        host=p.get("host"),
        port=int(p["port"]) if "port" in p else None,
        database=p.get("dbname"),
    )


# --------------------------------------------------------------------------
# Children: each runs every cell of one client and prints a JSON list.
# --------------------------------------------------------------------------


def _twisted_child(body: Callable[..., Any], args: argparse.Namespace) -> list[Any]:
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
    from sqlalchemy import create_engine
    from twisted.internet.defer import gatherResults

    from txfiberdb.fiber import await_deferred, run_in_fiber

    engine = create_engine(_url(args.dsn, "txpostgres"), **POOL)

    def main(args: argparse.Namespace, cells: list[Cell]) -> None:
        for workers in (1, WORKERS):
            for workload, _ in WORKLOADS:
                op = OPS[workload]

                def batch(until: float, n: int) -> int:
                    ds = [
                        run_in_fiber(_sync_loop, op, engine, _ids(100 + k), until, n)
                        for k in range(workers)
                    ]
                    return sum(await_deferred(gatherResults(ds)))

                batch(0, args.warmup // workers + 1)
                cell = Cell(workload, workers)
                cell.begin()
                cell.end(batch(_perf() + args.seconds, 0))
                cells.append(cell)
        engine.dispose()

    def body(args: argparse.Namespace, cells: list[Cell]) -> Any:
        return run_in_fiber(main, args, cells)

    return _twisted_child(body, args)


def child_deferToThread(args: argparse.Namespace) -> list[Any]:
    from sqlalchemy import create_engine
    from twisted.internet import reactor
    from twisted.internet.defer import gatherResults, inlineCallbacks, returnValue
    from twisted.internet.threads import deferToThread

    engine = create_engine(_url(args.dsn, "psycopg2"), **POOL)

    @inlineCallbacks
    def worker(op: Callable[..., None], ids: list[int], until: float, n: int) -> Any:
        i = 0
        while True:
            yield deferToThread(op, engine, ids[i & 4095])
            i += 1
            if (n and i >= n) or (not n and _perf() >= until):
                returnValue(i)

    @inlineCallbacks
    def body(args: argparse.Namespace, cells: list[Cell]) -> Any:
        reactor.suggestThreadPoolSize(WORKERS)
        for workers in (WORKERS, 1, WORKERS):  # the first pass fills the pool
            for workload, _ in WORKLOADS:
                op = OPS[workload]

                def batch(until: float, n: int) -> Any:
                    return gatherResults(
                        [worker(op, _ids(100 + k), until, n) for k in range(workers)]
                    )

                yield batch(0, args.warmup // workers + 1)
                cell = Cell(workload, workers)
                cell.begin()
                counts = yield batch(_perf() + args.seconds, 0)
                cell.end(sum(counts))
                cells.append(cell)
        del cells[: len(WORKLOADS)]
        engine.dispose()

    return _twisted_child(body, args)


def child_sync(args: argparse.Namespace) -> list[Any]:
    from sqlalchemy import create_engine

    engine = create_engine(_url(args.dsn, "psycopg2"), **POOL)
    cells = []
    for workload, _ in WORKLOADS:
        op = OPS[workload]
        ids = _ids(100)
        _sync_loop(op, engine, ids, 0, args.warmup)
        cell = Cell(workload, 1)
        cell.begin()
        cell.end(_sync_loop(op, engine, ids, _perf() + args.seconds, 0))
        cells.append(cell)
    engine.dispose()
    return [c.as_dict() for c in cells]


def child_asyncpg(args: argparse.Namespace) -> list[Any]:
    import asyncio

    from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

    async def orm(engine: Any, id: int) -> None:
        async with AsyncSession(engine) as s:
            item = await s.get(Item, id)
            assert item is not None and item.id == id

    async def core(engine: Any, id: int) -> None:
        async with engine.connect() as c:
            row = (await c.execute(select(items).where(items.c.id == id))).first()
            assert row is not None and row.id == id

    aops = {"orm": orm, "core": core}

    async def loop(op: Any, engine: Any, ids: list[int], until: float, n: int) -> int:
        i = 0
        while True:
            await op(engine, ids[i & 4095])
            i += 1
            if (n and i >= n) or (not n and _perf() >= until):
                return i

    async def main() -> list[Cell]:
        engine = create_async_engine(_url(args.dsn, "asyncpg"), **POOL)
        cells: list[Cell] = []
        for workers in (WORKERS, 1, WORKERS):  # the first pass fills the pool
            for workload, _ in WORKLOADS:
                op = aops[workload]

                async def batch(until: float, n: int) -> int:
                    counts = await asyncio.gather(
                        *[loop(op, engine, _ids(100 + k), until, n) for k in range(workers)]
                    )
                    return sum(counts)

                await batch(0, args.warmup // workers + 1)
                cell = Cell(workload, workers)
                cell.begin()
                cell.end(await batch(_perf() + args.seconds, 0))
                cells.append(cell)
        await engine.dispose()
        return cells[len(WORKLOADS) :]

    return [c.as_dict() for c in asyncio.run(main())]


CHILDREN: dict[str, Callable[[argparse.Namespace], list[Any]]] = {
    "txfiberdb": child_txfiberdb,
    "asyncpg": child_asyncpg,
    "deferToThread": child_deferToThread,
    "sync": child_sync,
}

LABELS = {
    "txfiberdb": ("postgresql+txpostgres in fibers", "postgresql+txpostgres, 20 fibers"),
    "asyncpg": ("asyncio + asyncpg (`AsyncSession` / `AsyncConnection`)", "asyncio + asyncpg, 20 tasks"),
    "deferToThread": ("psycopg2 in `deferToThread` (20 threads), 1 worker", "psycopg2 in `deferToThread`, 20 threads"),
    "sync": ("psycopg2, sync, one thread", "psycopg2, sync, one thread (the 1-worker figure)"),
}


# --------------------------------------------------------------------------
# Parent: the server, the table, the rounds.
# --------------------------------------------------------------------------


def _prepare(dsn: str) -> str:
    import psycopg2

    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    cur = conn.cursor()
    cur.execute("DROP TABLE IF EXISTS bench_items")
    cur.execute(
        "CREATE TABLE bench_items (id integer PRIMARY KEY, name varchar(50) NOT NULL, "
        "price numeric(10, 2) NOT NULL)"
    )
    cur.execute(
        "INSERT INTO bench_items SELECT i, 'item ' || i, (i % 1000) / 10.0 "
        f"FROM generate_series(1, {ROWS}) i"
    )
    cur.execute("VACUUM ANALYZE bench_items")
    cur.execute("SHOW server_version")
    server = cur.fetchone()[0]
    conn.close()
    return server


def _drop(dsn: str) -> None:
    import psycopg2

    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    conn.cursor().execute("DROP TABLE IF EXISTS bench_items")
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
    parser.add_argument("--warmup", type=int, default=200, help="operations before a cell")
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
                    ops = cell["ops"] / cell["wall"]
                    cpu_us = cell["cpu"] / cell["ops"] * 1e6
                    results.setdefault(key, []).append((ops, cpu_us))
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
        f"PostgreSQL {server}, SQLAlchemy {version('sqlalchemy')}, Twisted "
        f"{version('twisted')}, txpostgres {version('txpostgres')}, psycopg2 "
        f"{version('psycopg2-binary')}, asyncpg {version('asyncpg')}, greenlet "
        f"{version('greenlet')}; {args.rounds} rounds x {args.seconds} s per cell, "
        f"median; loopback TCP\n"
    )
    print("| operation | workers | client | operations/s | client CPU µs/op | ours ops/s ÷ this |")
    print("|---|---:|---|---:|---:|---:|")
    for workload, wlabel in WORKLOADS:
        for workers, idx in ((1, 0), (WORKERS, 1)):
            ours = med.get(f"txfiberdb|{workload}|{workers}")
            for client in CHILDREN:
                # The sync client has one figure: it serves one worker at a time.
                key = f"{client}|{workload}|{1 if client == 'sync' else workers}"
                if key not in med:
                    continue
                ops, cpu = med[key]
                ratio = f"{ours[0] / ops:.2f}" if ours else "-"
                label = LABELS[client][idx]
                print(f"| {wlabel} | {workers} | {label} | {ops:,.0f} | {cpu:.0f} | {ratio} |")
    print()
    for workload, wlabel in WORKLOADS:
        ours = med.get(f"txfiberdb|{workload}|{WORKERS}")
        if not ours:
            continue
        others = {
            c: med[k]
            for c in CHILDREN
            if c != "txfiberdb"
            and (k := f"{c}|{workload}|{1 if c == 'sync' else WORKERS}") in med
        }
        if others:
            best = max(others, key=lambda c: others[c][0])
            print(
                f"- {wlabel}, 20 workers: ours / best alternative ({best}) = "
                f"{ours[0] / others[best][0]:.2f}x (goal > 1x)"
            )


if __name__ == "__main__":
    main()
