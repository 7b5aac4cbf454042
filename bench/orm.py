"""
SQLAlchemy point reads: operations per second for txfiberdb's dialect and the
usual ways of running SQLAlchemy with PostgreSQL, in one run.

Two operations on a table of 10,000 rows, each by a random primary key, at 1
worker and at 20 concurrent workers:

- ORM: ``with Session(engine) as s: s.get(Item, id)`` (a fresh Session per
  operation: checkout, BEGIN, SELECT, ROLLBACK, checkin);
- Core: ``with engine.connect() as c: c.execute(select(items).where(items.c.id
  == id)).first()`` (checkout, BEGIN, SELECT, ROLLBACK, checkin).

Clients, each in subprocesses of its own, all with a pool of 20
(``pool_size=20, max_overflow=0``, filled before timing):

- ``txfiberdb``: ``postgresql+txpostgres`` in fibers (20 fibers at 20 workers),
  with the dialect's defaults: the ROLLBACK that ends each operation is not
  waited for (``background_end``) and the SELECT is prepared on each
  connection after 5 runs (``prepare_threshold``);
- ``txfiberdb-off``: the same with both levers off
  (``background_end=False, prepare_threshold=None``);
- ``asyncpg``: ``create_async_engine("postgresql+asyncpg")`` with
  ``AsyncSession`` / ``AsyncConnection`` (20 tasks);
- ``deferToThread``: sync SQLAlchemy + psycopg2 called through
  ``twisted.internet.threads.deferToThread`` with 20 threads (the
  alchimia/adbapi way);
- ``sync``: sync SQLAlchemy + psycopg2 in one thread, one operation at a
  time; at "20 workers" its row repeats the one-worker figure, as the
  reference of what no concurrency at all gives.

The rounds of the clients are interleaved; the table gives the median over
``--rounds`` rounds of operations/s and client CPU per operation
(``time.process_time`` of the client process, all threads; the server's CPU
is not counted), with the ratio of ours to each.

As in bench/driver.py, the 1-worker runs pin the client process and its
server backend to the same CPU and, separately, to two different CPUs, so
that the scheduler's placement does not decide the figure; the 20-worker runs
are not pinned.  Each client starts only once the machine is quiet (other
processes below 25% CPU), to keep other work on a shared machine out of the
figures.

Run:  python bench/orm.py [--rounds 3] [--seconds 0.5]
The server: $TXFIBERDB_TEST_DSN if set (the table ``bench_items`` is created
in it, and dropped at the end), else a TemporaryPostgres of its own.
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
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from decimal import Decimal  # noqa: E402
from importlib.metadata import version  # noqa: E402
from typing import Any

from sqlalchemy import Numeric, String, select  # noqa: E402
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column  # noqa: E402

ROWS = 10_000
WORKERS = 20
POOL = {"pool_size": WORKERS, "max_overflow": 0}
WORKLOADS = [
    ("orm", "ORM `Session.get`, fresh Session"),
    ("core", "Core `select` by primary key"),
]
# phase: (label, workers, client CPUs, backend CPUs); None: not pinned.
CLIENT_CPU, SERVER_CPU = 0, 1
PHASES: dict[str, tuple[str, int, Any, Any]] = {
    "same": ("1, same CPU", 1, {CLIENT_CPU}, {CLIENT_CPU}),
    "cross": ("1, two CPUs", 1, {CLIENT_CPU}, {SERVER_CPU}),
    "one": ("1", 1, None, None),
    "par": ("20", WORKERS, None, None),
    "split": ("20, split", WORKERS, {CLIENT_CPU}, {SERVER_CPU}),
}

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


@functools.cache
def _ids(seed: int) -> list[int]:
    """
    4,096 random ids (indexed with ``i & 4095``): no RNG inside the loop.
    Cached: the warm-up computes them, the timed batches reuse them.
    """
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

    def __init__(self, workload: str, phase: str) -> None:
        self.key = f"{workload}|{phase}"
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


def _sync_loop(
    op: Callable[..., None], engine: Any, ids: list[int], until: float, n: int
) -> int:
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


# --------------------------------------------------------------------------
# Children: each runs the cells of one client in one phase, prints JSON.
# --------------------------------------------------------------------------


def _twisted_child(body: Callable[..., Any], args: argparse.Namespace) -> list[Any]:
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


def _workers(args: argparse.Namespace) -> int:
    return PHASES[args.phase][1]


def child_txfiberdb(args: argparse.Namespace, **connect_args: Any) -> list[Any]:
    from sqlalchemy import create_engine
    from twisted.internet.defer import gatherResults

    from txfiberdb.fiber import await_deferred, run_in_fiber

    engine = create_engine(
        _url(args.dsn, "txpostgres"), connect_args=connect_args, **POOL
    )

    def main(args: argparse.Namespace, cells: list[Cell]) -> None:
        workers = _workers(args)
        for k, (workload, _) in enumerate(WORKLOADS):
            op = OPS[workload]

            def batch(op: Any, until: float, n: int) -> int:
                ds = [
                    run_in_fiber(_sync_loop, op, engine, _ids(100 + k), until, n)
                    for k in range(workers)
                ]
                counts: list[int] = await_deferred(gatherResults(ds))  # type: ignore[arg-type]
                return sum(counts)

            batch(op, 0, args.warmup // workers + 1)
            if k == 0:
                _pin_backends(args)
            cell = Cell(workload, args.phase)
            cell.begin()
            cell.end(batch(op, _perf() + args.seconds, 0))
            cells.append(cell)
        engine.dispose()

    return _twisted_child(lambda a, c: run_in_fiber(main, a, c), args)


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
        workers = _workers(args)
        for k, (workload, _) in enumerate(WORKLOADS):
            op = OPS[workload]

            def batch(op: Any, until: float, n: int) -> Any:
                return gatherResults(
                    [worker(op, _ids(100 + k), until, n) for k in range(workers)]
                )

            yield batch(op, 0, args.warmup // workers + 1)
            if k == 0:
                _pin_backends(args)
            cell = Cell(workload, args.phase)
            cell.begin()
            counts = yield batch(op, _perf() + args.seconds, 0)
            cell.end(sum(counts))
            cells.append(cell)
        engine.dispose()

    return _twisted_child(body, args)


def child_sync(args: argparse.Namespace) -> list[Any]:
    from sqlalchemy import create_engine

    engine = create_engine(_url(args.dsn, "psycopg2"), **POOL)
    cells = []
    for k, (workload, _) in enumerate(WORKLOADS):
        op = OPS[workload]
        ids = _ids(100)
        _sync_loop(op, engine, ids, 0, args.warmup)
        if k == 0:
            _pin_backends(args)
        cell = Cell(workload, args.phase)
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
        workers = _workers(args)
        for k, (workload, _) in enumerate(WORKLOADS):
            op = aops[workload]

            async def batch(op: Any, until: float, n: int) -> int:
                counts = await asyncio.gather(
                    *[loop(op, engine, _ids(100 + k), until, n) for k in range(workers)]
                )
                return sum(counts)

            await batch(op, 0, args.warmup // workers + 1)
            if k == 0:
                _pin_backends(args)
            cell = Cell(workload, args.phase)
            cell.begin()
            cell.end(await batch(op, _perf() + args.seconds, 0))
            cells.append(cell)
        await engine.dispose()
        return cells

    return [c.as_dict() for c in asyncio.run(main())]


def child_txfiberdb_off(args: argparse.Namespace) -> list[Any]:
    """Both levers off: every ROLLBACK waited for, nothing prepared."""
    return child_txfiberdb(args, background_end=False, prepare_threshold=None)


CHILDREN: dict[str, Callable[[argparse.Namespace], list[Any]]] = {
    "txfiberdb": child_txfiberdb,
    "txfiberdb-off": child_txfiberdb_off,
    "asyncpg": child_asyncpg,
    "deferToThread": child_deferToThread,
    "sync": child_sync,
}

LABELS = {
    "txfiberdb": (
        "postgresql+txpostgres in a fiber",
        "postgresql+txpostgres, 20 fibers",
    ),
    "txfiberdb-off": (
        "postgresql+txpostgres in a fiber, levers off",
        "postgresql+txpostgres, 20 fibers, levers off",
    ),
    "asyncpg": (
        "asyncio + asyncpg, `AsyncSession` / `AsyncConnection`",
        "asyncio + asyncpg, 20 tasks",
    ),
    "deferToThread": (
        "psycopg2 in `deferToThread` (20-thread pool), 1 worker",
        "psycopg2 in `deferToThread`, 20 threads",
    ),
    "sync": (
        "psycopg2, sync, one thread",
        "psycopg2, sync, one thread (1-worker figure)",
    ),
}


# --------------------------------------------------------------------------
# Parent: the server, the rounds, the table.
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
    server = str(cur.fetchone()[0]).split()[0]
    conn.close()
    return server


def _drop(dsn: str) -> None:
    import psycopg2

    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    conn.cursor().execute("DROP TABLE IF EXISTS bench_items")
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
        idle = fields[3] + fields[4]
        return sum(fields), idle

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
    parser.add_argument("--seconds", type=float, default=0.5, help="per timed cell")
    parser.add_argument(
        "--warmup", type=int, default=200, help="operations before a cell"
    )
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
    phases = ["same", "cross", "par", "split"] if pin else ["one", "par"]
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
                    if client == "sync" and PHASES[phase][1] > 1:
                        continue  # one thread: its 1-worker figure stands for it
                    gate.wait()
                    for cell in _run_child(client, phase, args, dsn):
                        key = f"{client}|{cell['key']}"
                        ops = cell["ops"] / cell["wall"]
                        cpu_us = cell["cpu"] / cell["ops"] * 1e6
                        results.setdefault(key, []).append((ops, cpu_us))
                        if args.verbose:
                            print(
                                f"  {key}: {ops:,.0f} ops/s, {cpu_us:.0f} µs",
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
    singles = [p for p in phases if PHASES[p][1] == 1]
    print(
        f"txfiberdb {_revision()}, "
        f"Python {platform.python_version()}, {os.cpu_count()} CPUs, PostgreSQL "
        f"{server} on loopback TCP, SQLAlchemy {version('sqlalchemy')}, Twisted "
        f"{version('twisted')} (epoll), txpostgres {version('txpostgres')}, psycopg2 "
        f"{version('psycopg2-binary')}, asyncpg {version('asyncpg')}, greenlet "
        f"{version('greenlet')}; median of {args.rounds} rounds x {args.seconds} s "
        f"per cell; waited {gate.waited:.0f} s for a quiet machine"
        + (f" (gave up {gate.gave_up} times)" if gate.gave_up else "")
        + "\n"
    )
    print(
        "| operation | workers | client | operations/s | client CPU µs/op "
        "| ours ops/s ÷ this |"
    )
    print("|---|---|---|---:|---:|---:|")

    def rows(workload: str, phase: str) -> list[tuple[str, str]]:
        """(client label, result key) of the rows of one table section."""
        if PHASES[phase][1] == 1:
            return [(LABELS[c][0], f"{c}|{workload}|{phase}") for c in CHILDREN]
        out = [
            (LABELS[c][1], f"{c}|{workload}|{phase}") for c in CHILDREN if c != "sync"
        ]
        for p in singles:  # one thread: its 1-worker figures stand for it
            where = f", {PHASES[p][0][3:]}" if p != "one" else ""
            out.append((f"{LABELS['sync'][1]}{where}", f"sync|{workload}|{p}"))
        return out

    for workload, wlabel in WORKLOADS:
        for phase in phases:
            ours = med.get(f"txfiberdb|{workload}|{phase}")
            for label, key in rows(workload, phase):
                if key not in med:
                    continue
                ops, cpu = med[key]
                ratio = f"{ours[0] / ops:.2f}" if ours else "-"
                print(
                    f"| {wlabel} | {PHASES[phase][0]} | {label} | {ops:,.0f} "
                    f"| {cpu:.0f} | {ratio} |"
                )
    print()
    for workload, wlabel in WORKLOADS:
        for phase in phases:
            ours = med.get(f"txfiberdb|{workload}|{phase}")
            if PHASES[phase][1] == 1 or not ours:
                continue
            others = {
                label: med[key]
                for label, key in rows(workload, phase)
                if key in med and not key.startswith("txfiberdb|")
            }
            for label, (ops, _) in sorted(others.items(), key=lambda kv: -kv[1][0]):
                print(
                    f"- {wlabel}, {PHASES[phase][0]} workers: ours / {label} = "
                    f"{ours[0] / ops:.2f}x (goal > 1x)"
                )


if __name__ == "__main__":
    main()
