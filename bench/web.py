"""
HTTP benchmark: the same small Klein app written three ways, under load.

The app has two routes over the demo shop's models (klein_demo.models):

- ``GET /test``: ``SELECT pg_sleep(0.1)`` in a Session (the query waits on
  the server; what matters is how many wait at once);
- ``GET /products/1``: ``session.get(Product, 1)`` as JSON (a quick query;
  what matters is the CPU each request costs).

Written three ways, each served by its own process:

- **txfiberdb**: ``FiberRoutes`` (each request in a fiber, a Session per
  request, ``postgresql+txpostgres``);
- **blocking**: the same SQLAlchemy code called straight from the Klein route
  on the reactor's thread, with psycopg2 (it blocks the reactor for each
  query: requests are served one at a time);
- **threads**: the same code in ``deferToThread``, psycopg2, with as many
  threads as pool connections (fewer threads would cap concurrency below the
  pool's and rig the comparison).

The pool is the same for all: ``pool_size`` 100 (the highest concurrency
measured) and no overflow (QueuePool closes an overflow connection when it
comes back to a full pool, so under load overflow connections would be
opened and closed all the time); so is the rest (Klein, JSON, no access log,
a listen backlog of 1024).  With ``--demo`` the full klein-demo app (metrics,
validation, the same pool) is measured too.  A **no-db** server (the same
Klein app with a timer instead of ``pg_sleep`` and a constant instead of the
query) shows what Twisted, Klein and the load generator cost by themselves:
the best any variant can do on this machine.

The load generator is ApacheBench (``ab``, apt-get install apache2-utils), a
separate process, on loopback; each (route, concurrency) gets a warm-up run,
then a measured run; rounds of all the variants are interleaved and the
table gives the medians.

Run:  python bench/web.py [--rounds 3] [--concurrency 20,100] [--demo]
      (a throwaway PostgreSQL is started unless TXFIBERDB_TEST_DSN is set)
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402
from importlib.metadata import version  # noqa: E402
from typing import Any  # noqa: E402

ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

VARIANTS = ["txfiberdb", "blocking", "threads"]
# The pool of every variant (and the threads variant's thread count).
POOL_SIZE = 100
MAX_OVERFLOW = 0


# -- the servers --------------------------------------------------------------


def _product_json(p: Any) -> dict[str, Any]:
    from klein_demo.app import product_json

    return product_json(p)


def _dumps(value: Any) -> bytes:
    from txfiberdb.klein import _json_default

    return json.dumps(value, default=_json_default).encode()


def serve(variant: str, url: str, port: int) -> None:
    """Run one variant's server until SIGTERM."""
    from klein import Klein
    from sqlalchemy import create_engine, text
    from sqlalchemy.orm import Session
    from twisted.internet import reactor
    from twisted.internet.endpoints import serverFromString
    from twisted.internet.threads import deferToThread
    from twisted.web.server import Site

    from klein_demo.models import Product

    def sleep_seconds(request: Any) -> float:
        return float(request.args.get(b"seconds", [b"0.1"])[0])

    app = Klein()
    pool = {"pool_size": POOL_SIZE, "max_overflow": MAX_OVERFLOW, "pool_timeout": 60}
    root: Any = None

    if variant == "txfiberdb":
        from txfiberdb.klein import FiberRoutes
        from txfiberdb.service import EngineService

        db = EngineService(url.replace("+psycopg2", "+txpostgres"), **pool)
        db.startService()
        routes = FiberRoutes(db, app)

        @routes.route("/test")
        def test(request: Any, session: Session) -> Any:
            seconds = sleep_seconds(request)
            session.execute(text("SELECT pg_sleep(:s)"), {"s": seconds})
            return {"slept": seconds}

        @routes.route("/products/<int:product_id>")
        def get_product(request: Any, session: Session, product_id: int) -> Any:
            return _product_json(session.get(Product, product_id))

    elif variant == "no-db":
        # The floor: Klein and twisted.web alone, no database at all (a
        # timer instead of pg_sleep, a constant instead of the product).
        from twisted.internet.task import deferLater

        constant = {
            "id": 1,
            "sku": "CUP-ESP",
            "name": "Espresso cup",
            "description": "",
            "price_cents": 650,
            "price": "6.50",
            "stock": 118,
            "created_at": "2026-01-01T00:00:00+00:00",
            "updated_at": "2026-01-01T00:00:00+00:00",
        }

        def as_json(body: Any, request: Any) -> bytes:
            request.setHeader(b"content-type", b"application/json")
            return _dumps(body)

        @app.route("/test")
        def test(request: Any) -> Any:
            seconds = sleep_seconds(request)
            return deferLater(reactor, seconds, lambda: {"slept": seconds}).addCallback(
                as_json, request
            )

        @app.route("/products/<int:product_id>")
        def get_product(request: Any, product_id: int) -> Any:
            return as_json(dict(constant, id=product_id), request)

    elif variant == "demo":
        from klein_demo.tap import ShopService

        shop = ShopService(
            url=url.replace("+psycopg2", "+txpostgres"),
            listen=f"tcp:{port}:interface=127.0.0.1:backlog=1024",
            pool_size=POOL_SIZE,
            max_overflow=MAX_OVERFLOW,
            pool_timeout=60,
            sample_data=False,
        )
        shop.site.log = lambda request: None  # type: ignore[method-assign]
        shop.startService()
        reactor.addSystemEventTrigger("before", "shutdown", shop.stopService)
        reactor.run()
        return

    else:
        engine = create_engine(url, **pool)

        def sleep_work(seconds: float) -> Any:
            with Session(engine) as session:
                session.execute(text("SELECT pg_sleep(:s)"), {"s": seconds})
                session.commit()
            return {"slept": seconds}

        def product_work(product_id: int) -> Any:
            with Session(engine) as session:
                body = _product_json(session.get(Product, product_id))
                session.commit()
            return body

        if variant == "blocking":

            @app.route("/test")
            def test(request: Any) -> Any:
                request.setHeader(b"content-type", b"application/json")
                return _dumps(sleep_work(sleep_seconds(request)))

            @app.route("/products/<int:product_id>")
            def get_product(request: Any, product_id: int) -> Any:
                request.setHeader(b"content-type", b"application/json")
                return _dumps(product_work(product_id))

        elif variant == "threads":
            reactor.suggestThreadPoolSize(POOL_SIZE + MAX_OVERFLOW)

            def as_json(body: Any, request: Any) -> bytes:
                request.setHeader(b"content-type", b"application/json")
                return _dumps(body)

            @app.route("/test")
            def test(request: Any) -> Any:
                return deferToThread(sleep_work, sleep_seconds(request)).addCallback(
                    as_json, request
                )

            @app.route("/products/<int:product_id>")
            def get_product(request: Any, product_id: int) -> Any:
                return deferToThread(product_work, product_id).addCallback(
                    as_json, request
                )

        else:
            raise SystemExit(f"unknown variant {variant}")

    @app.route("/health")
    def health(request: Any) -> Any:
        return b"ok"

    root = app.resource()
    site = Site(root)
    site.log = lambda request: None  # type: ignore[method-assign]
    endpoint = serverFromString(reactor, f"tcp:{port}:interface=127.0.0.1:backlog=1024")
    endpoint.listen(site)
    reactor.run()


# -- the harness ----------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_healthy(base: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(base + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit("server did not start")


AB_FIELDS = {
    "time": re.compile(r"Time taken for tests:\s+([\d.]+)"),
    "rps": re.compile(r"Requests per second:\s+([\d.]+)"),
    "failed": re.compile(r"Failed requests:\s+(\d+)"),
    "non2xx": re.compile(r"Non-2xx responses:\s+(\d+)"),
    "p50": re.compile(r"^\s+50%\s+(\d+)", re.M),
    "p99": re.compile(r"^\s+99%\s+(\d+)", re.M),
}


def ab(url: str, n: int, c: int) -> dict[str, float]:
    out = subprocess.run(
        ["ab", "-q", "-r", "-s", "120", "-n", str(n), "-c", str(c), url],
        capture_output=True,
        text=True,
        timeout=600,
    ).stdout
    result = {}
    for key, pattern in AB_FIELDS.items():
        m = pattern.search(out)
        result[key] = float(m.group(1)) if m else 0.0
    if not result["rps"]:
        raise SystemExit(f"ab failed on {url}:\n{out}")
    if result["failed"] or result["non2xx"]:
        print(
            f"  warning: {url} c={c}: {result['failed']:.0f} failed, "
            f"{result['non2xx']:.0f} non-2xx",
            file=sys.stderr,
        )
    return result


def workloads(concurrency: list[int]) -> list[tuple[str, str, int, int]]:
    """(label, path, n, c): /test n = max(100, 2c) (the blocking variant takes
    n * 0.1 s), /products/1 n = 2000."""
    out = []
    for c in concurrency:
        out.append(("/test", "/test", max(100, 2 * c), c))
    for c in concurrency:
        out.append(("/products/1", "/products/1", 2000, c))
    return out


def prepare_database(url: str) -> None:
    from sqlalchemy import create_engine
    from sqlalchemy.orm import Session

    from klein_demo.models import Base, load_sample_data

    engine = create_engine(url)
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        load_sample_data(session)
        session.commit()
    engine.dispose()


class Server:
    """One variant's server process, on a free port."""

    def __init__(self, variant: str, url: str) -> None:
        self.variant = variant
        port = free_port()
        self.base = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(
            [
                sys.executable,
                os.path.abspath(__file__),
                "--serve",
                variant,
                "--url",
                url,
                "--port",
                str(port),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", default="20,100")
    parser.add_argument(
        "--demo", action="store_true", help="measure the full demo app too"
    )
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.url, args.port)
        return
    if shutil.which("ab") is None:
        raise SystemExit("ab not found: apt-get install apache2-utils")

    from txfiberdb.testing import (
        TemporaryPostgres,
        create_database,
        drop_database,
        dsn_to_url,
    )

    variants = VARIANTS + (["demo"] if args.demo else []) + ["no-db"]
    # Every server keeps its pool open while the others are measured.
    needed = POOL_SIZE * (len(variants) - 1) + 20
    postgres = None
    if not os.environ.get("TXFIBERDB_TEST_DSN"):
        postgres = TemporaryPostgres(settings={"max_connections": str(needed)}).start()
        os.environ["TXFIBERDB_TEST_DSN"] = postgres.dsn()
    else:
        print(
            f"using $TXFIBERDB_TEST_DSN: its max_connections must be at least {needed}",
            file=sys.stderr,
        )
    dsn = create_database("bench_http")
    url = dsn_to_url(dsn, driver="psycopg2")
    prepare_database(url)
    loads = workloads([int(c) for c in args.concurrency.split(",")])
    # results[variant][(label, c)] = [ab result per round]
    results: dict[str, dict[tuple[str, int], list[dict[str, float]]]] = {
        v: {(label, c): [] for label, _, _, c in loads} for v in variants
    }
    servers = []
    try:
        # All servers run at once (idle when not measured); each workload is
        # run against every variant in turn, in a rotating order, so that
        # whatever else the machine does hits them all alike.
        servers = [Server(v, url) for v in variants]
        for server in servers:
            wait_healthy(server.base, server.proc)
        for r in range(args.rounds):
            for i, (label, path, n, c) in enumerate(loads):
                k = (r + i) % len(servers)
                for server in servers[k:] + servers[:k]:
                    print(
                        f"round {r + 1}/{args.rounds}: {label} c={c} {server.variant}",
                        file=sys.stderr,
                    )
                    ab(server.base + path, c, c)  # warm-up: connections, caches
                    results[server.variant][(label, c)].append(
                        ab(server.base + path, n, c)
                    )
    finally:
        for server in servers:
            server.stop()
        drop_database(dsn)
        if postgres is not None:
            postgres.stop()

    def median(variant: str, key: tuple[str, int], field: str) -> float:
        return statistics.median(run[field] for run in results[variant][key])

    def errors(variant: str, key: tuple[str, int]) -> str:
        bad = sum(run["failed"] + run["non2xx"] for run in results[variant][key])
        return f" **{bad:.0f} errors**" if bad else ""

    print(
        f"\n{platform.python_implementation()} {platform.python_version()}, "
        f"Twisted {version('twisted')}, SQLAlchemy {version('sqlalchemy')}, "
        f"Klein {version('klein')}, {os.cpu_count()} CPUs, {args.rounds} rounds, "
        f"medians\n"
    )
    header = (
        "| route | clients | requests |"
        + "".join(f" {v} req/s (p50/p99 ms) |" for v in variants)
        + " blocking / txfiberdb | threads / txfiberdb |"
    )
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for label, _path, n, c in loads:
        key = (label, c)
        cells = [
            f" {median(v, key, 'rps'):.0f} ({median(v, key, 'p50'):.0f}/"
            f"{median(v, key, 'p99'):.0f}){errors(v, key)} |"
            for v in variants
        ]
        fiber_time = median("txfiberdb", key, "time")
        ratios = [
            f" {median(v, key, 'time') / fiber_time:.2f} |"
            for v in ("blocking", "threads")
        ]
        print(f"| {label} | {c} | {n} |" + "".join(cells) + "".join(ratios))
    print(
        "\nratio: the variant's time for the run divided by txfiberdb's "
        "(above 1: txfiberdb is ahead)"
    )


if __name__ == "__main__":
    main()
