"""
The ORM route's database work over a network with real latency: p50 latency
at 1 client and throughput at 20 clients, for txfiberdb and the usual ways
of running SQLAlchemy, in one run.

The operation is what a ``FiberRoutes`` route that reads one row does with
its Session: ``with Session(engine) as s: s.get(Item, id); s.commit()``
(a fresh Session, a pool of 20, a random primary key of 10,000 rows).  No
HTTP: Klein's own cost is the same for every client and would only blur the
round trips, which are what this benchmark is about.

Round trips per operation (what the latency multiplies):

- ``txfiberdb``: ``postgresql+txpostgres`` with the dialect's defaults:
  BEGIN + SELECT in one round trip (the SELECT prepared on the connection
  after 5 runs), the COMMIT of a transaction that only read is not waited
  for (``background_end``): **1 round trip**;
- ``txfiberdb-off``: the same with ``background_end=False,
  prepare_threshold=None``: BEGIN + SELECT, COMMIT: 2 round trips;
- ``threads``: sync SQLAlchemy + psycopg2 in ``deferToThread`` (20
  threads): BEGIN, SELECT, COMMIT: 3 round trips (psycopg2 sends BEGIN
  alone);
- ``asyncpg``: ``AsyncSession`` + ``postgresql+asyncpg`` (20 tasks): BEGIN,
  the SELECT (prepared once per connection, then bind/execute), COMMIT: 3
  round trips.

The latency: a network namespace and a veth pair with ``netem`` adding 1 ms
in each direction between the clients (in the namespace) and PostgreSQL
(outside), set up here and removed at the end (needs root and the netem
qdisc).  Where the kernel has no netem (``tc`` says "Specified qdisc kind is
unknown"), it says so and falls back to a user-space TCP proxy on loopback
that holds every chunk for 1 ms in each direction (its own process); the
round trip it adds is measured and printed (``SELECT 1`` through psycopg2),
and it costs CPU of its own, which lowers every client's throughput at 20
clients on a small machine.  ``--link none`` measures loopback.

Run:  python bench/latency.py [--rounds 3] [--seconds 3] [--link auto|netem|proxy|none]
"""

from __future__ import annotations

import os
import sys

if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(
    os.path.abspath(__file__)
):
    del sys.path[0]

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from importlib.metadata import version  # noqa: E402
from typing import Any  # noqa: E402


def _load_orm() -> Any:
    """bench/orm.py (its model, table set-up and quiet-machine gate)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "orm.py")
    spec = importlib.util.spec_from_file_location("txfiberdb_bench_orm", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


orm = _load_orm()
Item = orm.Item
WORKERS = 20
POOL = {"pool_size": WORKERS, "max_overflow": 0}
DELAY = 0.001  # each way
_perf = time.perf_counter


# --------------------------------------------------------------------------
# Children: one client per process.
# --------------------------------------------------------------------------


def _result(latencies: list[float], ops: int, wall: float) -> dict[str, Any]:
    return {"lat": latencies, "ops": ops, "wall": wall}


def child_txfiberdb(args: argparse.Namespace, **connect_args: Any) -> dict[str, Any]:
    from sqlalchemy import create_engine
    from sqlalchemy.orm import Session
    from twisted.internet import reactor
    from twisted.internet.defer import gatherResults

    from txfiberdb.fiber import await_deferred, run_in_fiber

    engine = create_engine(args.url_txpostgres, connect_args=connect_args, **POOL)

    def op(id: int) -> None:
        with Session(engine) as s:
            item = s.get(Item, id)
            assert item is not None and item.id == id
            s.commit()

    out: dict[str, Any] = {}

    def main() -> None:
        def worker(k: int, until: float, n: int, lat: list[float]) -> int:
            ids = orm._ids(100 + k)
            i = 0
            while True:
                t = _perf()
                op(ids[i & 4095])
                lat.append(_perf() - t)
                i += 1
                if (n and i >= n) or (not n and _perf() >= until):
                    return i

        workers = args.workers
        warm = [run_in_fiber(worker, k, 0, 30, []) for k in range(WORKERS)]
        await_deferred(gatherResults(warm))  # fills the pool, passes the threshold
        lat: list[float] = []
        start = _perf()
        ds = [
            run_in_fiber(worker, k, start + args.seconds, 0, lat)
            for k in range(workers)
        ]
        counts = await_deferred(gatherResults(ds))
        out.update(_result(lat, sum(counts), _perf() - start))
        engine.dispose()

    def go() -> None:
        d = run_in_fiber(main)
        d.addErrback(lambda f: out.update(error=f.getTraceback()))
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(go)
    reactor.run()
    return out


def child_txfiberdb_off(args: argparse.Namespace) -> dict[str, Any]:
    return child_txfiberdb(args, background_end=False, prepare_threshold=None)


def child_threads(args: argparse.Namespace) -> dict[str, Any]:
    from sqlalchemy import create_engine
    from sqlalchemy.orm import Session
    from twisted.internet import reactor
    from twisted.internet.defer import gatherResults, inlineCallbacks, returnValue
    from twisted.internet.threads import deferToThread

    engine = create_engine(args.url_psycopg2, **POOL)
    reactor.suggestThreadPoolSize(WORKERS)

    def op(id: int) -> None:
        with Session(engine) as s:
            item = s.get(Item, id)
            assert item is not None and item.id == id
            s.commit()

    @inlineCallbacks
    def worker(k: int, until: float, n: int, lat: list[float]) -> Any:
        ids = orm._ids(100 + k)
        i = 0
        while True:
            t = _perf()
            yield deferToThread(op, ids[i & 4095])
            lat.append(_perf() - t)
            i += 1
            if (n and i >= n) or (not n and _perf() >= until):
                returnValue(i)

    out: dict[str, Any] = {}

    @inlineCallbacks
    def main() -> Any:
        yield gatherResults([worker(k, 0, 30, []) for k in range(WORKERS)])
        lat: list[float] = []
        start = _perf()
        counts = yield gatherResults(
            [worker(k, start + args.seconds, 0, lat) for k in range(args.workers)]
        )
        out.update(_result(lat, sum(counts), _perf() - start))
        engine.dispose()

    def go() -> None:
        d = main()
        d.addErrback(lambda f: out.update(error=f.getTraceback()))
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(go)
    reactor.run()
    return out


def child_asyncpg(args: argparse.Namespace) -> dict[str, Any]:
    import asyncio

    from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

    async def main() -> dict[str, Any]:
        engine = create_async_engine(args.url_asyncpg, **POOL)

        async def op(id: int) -> None:
            async with AsyncSession(engine) as s:
                item = await s.get(Item, id)
                assert item is not None and item.id == id
                await s.commit()

        async def worker(k: int, until: float, n: int, lat: list[float]) -> int:
            ids = orm._ids(100 + k)
            i = 0
            while True:
                t = _perf()
                await op(ids[i & 4095])
                lat.append(_perf() - t)
                i += 1
                if (n and i >= n) or (not n and _perf() >= until):
                    return i

        await asyncio.gather(*[worker(k, 0, 30, []) for k in range(WORKERS)])
        lat: list[float] = []
        start = _perf()
        counts = await asyncio.gather(
            *[worker(k, start + args.seconds, 0, lat) for k in range(args.workers)]
        )
        result = _result(lat, sum(counts), _perf() - start)
        await engine.dispose()
        return result

    return asyncio.run(main())


def child_rtt(args: argparse.Namespace) -> dict[str, Any]:
    """The link's own round trip: psycopg2 ``SELECT 1``, blocking."""
    import psycopg2

    conn = psycopg2.connect(args.dsn)
    conn.autocommit = True
    cur = conn.cursor()
    lat = []
    for _ in range(300):
        t = _perf()
        cur.execute("SELECT 1")
        cur.fetchone()
        lat.append(_perf() - t)
    conn.close()
    return _result(lat[50:], len(lat) - 50, sum(lat[50:]))


CHILDREN: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "txfiberdb": child_txfiberdb,
    "txfiberdb-off": child_txfiberdb_off,
    "threads": child_threads,
    "asyncpg": child_asyncpg,
}
LABELS = {
    "txfiberdb": "postgresql+txpostgres, FiberRoutes-style (1 round trip)",
    "txfiberdb-off": "postgresql+txpostgres, levers off (2 round trips)",
    "threads": "sync SQLAlchemy + psycopg2 in `deferToThread` (3 round trips)",
    "asyncpg": "`AsyncSession` + asyncpg (3 round trips)",
}


# --------------------------------------------------------------------------
# The link: netem in a network namespace, or a delaying proxy.
# --------------------------------------------------------------------------


def proxy_main(target_port: int, delay: float) -> None:
    """A TCP proxy on 127.0.0.1 that holds each chunk ``delay`` s each way."""
    import asyncio

    async def main() -> None:
        loop = asyncio.get_running_loop()

        async def pump(src: Any, dst: Any) -> None:
            try:
                while True:
                    data = await src.read(65536)
                    if not data:
                        break
                    loop.call_later(delay, dst.write, data)
            except OSError:
                pass
            finally:
                loop.call_later(delay, dst.close)

        async def handle(reader: Any, writer: Any) -> None:
            try:
                r2, w2 = await asyncio.open_connection("127.0.0.1", target_port)
            except OSError:
                writer.close()
                return
            await asyncio.gather(pump(reader, w2), pump(r2, writer))

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        print(server.sockets[0].getsockname()[1], flush=True)
        await server.serve_forever()

    asyncio.run(main())


def _sh(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), capture_output=True, text=True)


class Link:
    """Where the clients reach PostgreSQL through, and how to run them."""

    kind = "none"
    host = "127.0.0.1"
    port: int = 0
    prefix: list[str] = []
    note = "loopback, no added latency"

    def close(self) -> None:
        pass


class ProxyLink(Link):
    kind = "proxy"

    def __init__(self, pg_port: int, reason: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--proxy", str(pg_port)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        self.port = int(self.proc.stdout.readline())
        self.note = (
            f"a user-space proxy holding each chunk {DELAY * 1e3:g} ms each way "
            f"(netem unavailable: {reason})"
        )

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait()


class NetemLink(Link):
    """
    A namespace ``txflat<pid>`` with one end of a veth pair; netem adds the
    delay on both ends.  PostgreSQL listens on the host end's address.
    """

    kind = "netem"

    def __init__(self) -> None:
        tag = os.getpid() % 100000
        self.ns = f"txflat{tag}"
        self.a, self.b = f"txfla{tag}", f"txflb{tag}"
        net = f"10.231.{tag % 250}"
        self.host, self.client = f"{net}.1", f"{net}.2"
        self.prefix = ["ip", "netns", "exec", self.ns]
        delay = f"{DELAY * 1e3:g}ms"
        steps = [
            ["ip", "netns", "add", self.ns],
            ["ip", "link", "add", self.a, "type", "veth", "peer", "name", self.b],
            ["ip", "link", "set", self.b, "netns", self.ns],
            ["ip", "addr", "add", f"{self.host}/30", "dev", self.a],
            ["ip", "link", "set", self.a, "up"],
            [*self.prefix, "ip", "addr", "add", f"{self.client}/30", "dev", self.b],
            [*self.prefix, "ip", "link", "set", self.b, "up"],
            [*self.prefix, "ip", "link", "set", "lo", "up"],
            ["tc", "qdisc", "add", "dev", self.a, "root", "netem", "delay", delay],
            [*self.prefix, "tc", "qdisc", "add", "dev", self.b, "root", "netem",
             "delay", delay],
        ]
        for step in steps:
            out = _sh(*step)
            if out.returncode:
                self.close()
                raise RuntimeError(
                    f"{' '.join(step)}: {(out.stderr or out.stdout).strip()}"
                )
        self.note = f"netem {delay} each way on a veth pair into namespace {self.ns}"

    def close(self) -> None:
        _sh("ip", "link", "del", self.a)
        _sh("ip", "netns", "del", self.ns)


def _start_server(link_kind: str) -> tuple[Any, Link]:
    """A TemporaryPostgres, and the link in front of it."""
    from txfiberdb.testing._postgres import TemporaryPostgres

    reason = ""
    if link_kind in ("auto", "netem"):
        try:
            link: Link = NetemLink()
        except RuntimeError as e:
            if link_kind == "netem":
                raise SystemExit(f"cannot add latency with netem: {e}") from None
            reason = str(e)
        else:
            hba = tempfile.NamedTemporaryFile(
                "w", suffix=".conf", delete=False, prefix="txf_hba_"
            )
            hba.write("local all all trust\nhost all all 0.0.0.0/0 trust\n")
            hba.close()
            os.chmod(hba.name, 0o644)
            pg = TemporaryPostgres(
                settings={
                    "listen_addresses": f"'127.0.0.1,{link.host}'",
                    "hba_file": hba.name,
                }
            ).start()
            link.port = pg.port
            return pg, link
    pg = TemporaryPostgres().start()
    if link_kind in ("auto", "proxy"):
        if not reason:
            reason = "--link proxy"
        return pg, ProxyLink(pg.port, reason)
    link = Link()
    link.port = pg.port
    return pg, link


def _run_child(
    link: Link, client: str, workers: int, args: argparse.Namespace
) -> dict[str, Any]:
    def url(driver: str) -> str:
        return f"postgresql+{driver}://postgres@{link.host}:{link.port}/bench"

    cmd = [*link.prefix, sys.executable, os.path.abspath(__file__), "--child", client]
    cmd += ["--workers", str(workers), "--seconds", str(args.seconds)]
    cmd += ["--url-txpostgres", url("txpostgres"), "--url-psycopg2", url("psycopg2")]
    cmd += ["--url-asyncpg", url("asyncpg")]
    cmd += ["--dsn", f"host={link.host} port={link.port} user=postgres dbname=bench"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{client} ({workers}) failed:\n{out.stderr}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if "error" in result:
        raise SystemExit(f"{client} ({workers}) failed:\n{result['error']}")
    return result  # type: ignore[no-any-return]


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0, help="per timed cell")
    parser.add_argument(
        "--link", choices=["auto", "netem", "proxy", "none"], default="auto"
    )
    parser.add_argument("--only", help="comma-separated clients (default: all)")
    parser.add_argument(
        "--quiet",
        type=float,
        default=0.25,
        help="start a client only when the machine's CPU use is below this (1: off)",
    )
    parser.add_argument("--child", choices=[*CHILDREN, "rtt"], help=argparse.SUPPRESS)
    parser.add_argument("--proxy", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, default=1, help=argparse.SUPPRESS)
    for name in ("url-txpostgres", "url-psycopg2", "url-asyncpg", "dsn"):
        parser.add_argument(f"--{name}", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.proxy:
        proxy_main(args.proxy, DELAY)
        return
    if args.child:
        child = child_rtt if args.child == "rtt" else CHILDREN[args.child]
        print(json.dumps(child(args)))
        return

    pg, link = _start_server(args.link)
    gate = orm.QuietGate(args.quiet, limit=20.0)
    results: dict[tuple[str, int], list[dict[str, Any]]] = {}
    try:
        import psycopg2

        admin = psycopg2.connect(pg.dsn("postgres"))
        admin.autocommit = True
        admin.cursor().execute("CREATE DATABASE bench")
        admin.close()
        server = orm._prepare(pg.dsn("bench"))
        rtt = _run_child(link, "rtt", 1, args)
        clients = list(CHILDREN)
        if args.only:
            clients = [c for c in clients if c in args.only.split(",")]
        started = _perf()
        for r in range(args.rounds):
            order = clients if r % 2 == 0 else clients[::-1]
            for workers in (1, WORKERS):
                for client in order:
                    gate.wait()
                    res = _run_child(link, client, workers, args)
                    results.setdefault((client, workers), []).append(res)
            print(
                f"round {r + 1}/{args.rounds} done ({_perf() - started:.0f} s)",
                file=sys.stderr,
            )
    finally:
        link.close()
        pg.stop()

    print(
        f"txfiberdb {orm._revision()}, Python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs, PostgreSQL {server}, SQLAlchemy "
        f"{version('sqlalchemy')}, Twisted {version('twisted')}, asyncpg "
        f"{version('asyncpg')}; link: {link.note}; measured round trip "
        f"(psycopg2 SELECT 1) p50 {_pct(rtt['lat'], 0.5) * 1e3:.2f} ms; median "
        f"of {args.rounds} rounds x {args.seconds:g} s per cell; waited "
        f"{gate.waited:.0f} s for a quiet machine"
        + (f" (gave up {gate.gave_up} times)" if gate.gave_up else "")
        + "\n"
    )
    print(
        "| client | 1 client p50 ms | 1 client p99 ms | ours p50 ÷ this "
        "| 20 clients ops/s | ours ops/s ÷ this |"
    )
    print("|---|---:|---:|---:|---:|---:|")

    def med(client: str, workers: int, f: Callable[[dict[str, Any]], float]) -> float:
        return statistics.median(f(r) for r in results[(client, workers)])

    p50 = {c: med(c, 1, lambda r: _pct(r["lat"], 0.5)) for c, _ in results if _ == 1}
    p99 = {c: med(c, 1, lambda r: _pct(r["lat"], 0.99)) for c, _ in results if _ == 1}
    tput = {
        c: med(c, WORKERS, lambda r: r["ops"] / r["wall"])
        for c, w in results
        if w == WORKERS
    }
    ours = "txfiberdb"
    for client in CHILDREN:
        if client not in p50:
            continue
        lr = f"{p50[ours] / p50[client]:.2f}" if ours in p50 else "-"
        tr = f"{tput[ours] / tput[client]:.2f}" if ours in tput else "-"
        print(
            f"| {LABELS[client]} | {p50[client] * 1e3:.2f} | {p99[client] * 1e3:.2f} "
            f"| {lr} | {tput[client]:,.0f} | {tr} |"
        )
    print()
    for other in ("threads", "asyncpg"):
        if ours in p50 and other in p50:
            print(
                f"- p50 at 1 client: ours / {other} = {p50[ours] / p50[other]:.2f} "
                "(goal <= 0.5)"
            )
        if ours in tput and other in tput:
            print(
                f"- throughput at 20 clients: ours / {other} = "
                f"{tput[ours] / tput[other]:.2f}x"
            )


if __name__ == "__main__":
    main()
