"""
Worker processes benchmark: ``twistd -n klein-demo --workers N`` at N = 1
and 2, in one run, on one throwaway PostgreSQL.

Routes (the demo's own, with its metrics, validation and access log):

- ``GET /products/1``: ``session.get`` as JSON: CPU-bound in the worker
  (SQLAlchemy's ORM costs most of it), so a second worker should help on a
  machine with a core to spare;
- ``GET /test?seconds=0.1``: ``pg_sleep(0.1)``: waits on the server, so one
  worker already serves ``concurrency`` at once; more workers change little.

The load generator is ApacheBench (``ab``, apt-get install apache2-utils) on
loopback, a new connection per request (so the kernel spreads them over the
workers).  Each (N, route) gets a warm-up run, then a measured run; rounds
alternate N = 1 and N = 2 and the table gives medians and the ratio.  The
machine's cores are shared by ab, PostgreSQL and the workers: the ratio says
what a second worker buys *here*, not on a machine with cores to spare.

Run:  python bench/workers.py [--rounds 3] [--requests 3000] [--concurrency 20]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from txfiberdb.testing import TemporaryPostgres  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(workers: int, url: str, port: int) -> subprocess.Popen[bytes]:
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    proc = subprocess.Popen(
        [
            twistd,
            "-n",
            "--pidfile=",
            "klein-demo",
            "--workers",
            str(workers),
            "--dsn",
            url,
            "--sample-data",
            "--listen",
            f"tcp:{port}:interface=127.0.0.1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=os.path.dirname(HERE),
    )
    deadline = time.monotonic() + 120
    seen: set[str] = set()
    while time.monotonic() < deadline and len(seen) < workers:
        if proc.poll() is not None:
            raise SystemExit(
                f"klein-demo --workers {workers} exited ({proc.returncode})"
            )
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{port}/metrics", timeout=2
            ) as r:
                m = re.search(rb'pid="(\d+)"', r.read())
                if m:
                    seen.add(m.group(1).decode())
        except OSError:
            time.sleep(0.2)
    return proc


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


TICK = os.sysconf("SC_CLK_TCK")


def machine_ticks() -> tuple[int, int]:
    """(busy, total) CPU ticks of the whole machine since boot (/proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry))
            except OSError:
                pass
    return found


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime + stime
        except OSError:
            pass
    return total / TICK


def measured(
    url: str, n: int, c: int, workers: list[int], pg: list[int]
) -> dict[str, float]:
    """One ab run, and where the CPU went meanwhile (in cores)."""
    import resource

    busy0, total0 = machine_ticks()
    w0, p0 = cpu_seconds(workers), cpu_seconds(pg)
    ab0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    rps = ab(url, n, c)
    wall = time.monotonic() - t0
    ab1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy1, total1 = machine_ticks()
    cores = os.cpu_count() or 1
    return {
        "rps": rps,
        "machine": (busy1 - busy0) / max(1, total1 - total0) * cores,
        "workers": (cpu_seconds(workers) - w0) / wall,
        "postgres": (cpu_seconds(pg) - p0) / wall,
        "ab": (ab1.ru_utime + ab1.ru_stime - ab0.ru_utime - ab0.ru_stime) / wall,
    }


def ab(url: str, n: int, c: int) -> float:
    out = subprocess.run(
        ["ab", "-q", "-n", str(n), "-c", str(c), url],
        capture_output=True,
        text=True,
        timeout=300,
    ).stdout
    failed = re.search(r"Failed requests:\s+(\d+)", out)
    non2xx = re.search(r"Non-2xx responses:\s+(\d+)", out)
    if (failed and int(failed.group(1))) or non2xx:
        print(
            f"  warning: {url}: failed {failed and failed.group(1)}, "
            f"non-2xx {non2xx and non2xx.group(1)}"
        )
    m = re.search(r"Requests per second:\s+([\d.]+)", out)
    if not m:
        raise SystemExit(f"ab failed on {url}:\n{out}")
    return float(m.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=20)
    args = parser.parse_args()
    if not 1 <= args.rounds <= 20 or not 1 <= args.requests <= 100_000:
        raise SystemExit("--rounds 1..20, --requests 1..100000")
    if not shutil.which("ab"):
        raise SystemExit("ab not found: apt-get install apache2-utils")
    routes = {
        "/products/1": args.requests,
        "/test?seconds=0.1": max(200, args.concurrency * 10),
    }
    results: dict[tuple[int, str], list[float]] = {}
    usage: dict[tuple[int, str], list[dict[str, float]]] = {}
    with TemporaryPostgres() as pg:
        url = pg.url().replace("+txpostgres", "")
        for r in range(args.rounds):
            for workers in (1, 2):
                port = free_port()
                proc = start(workers, url, port)
                try:
                    # The supervisor and its workers (with one, twistd is the worker).
                    worker_pids = [proc.pid, *children(proc.pid)]
                    for route, n in routes.items():
                        target = f"http://127.0.0.1:{port}{route}"
                        ab(target, max(200, n // 5), args.concurrency)  # warm-up
                        pg_pids = pg._pids()  # backends opened by the warm-up too
                        m = measured(target, n, args.concurrency, worker_pids, pg_pids)
                        rps = m["rps"]
                        results.setdefault((workers, route), []).append(rps)
                        usage.setdefault((workers, route), []).append(m)
                        label = f"round {r + 1}: {workers} worker(s) {route}"
                        print(f"{label}: {rps:.0f} req/s")
                finally:
                    stop(proc)
    print()
    print(f"| route (c={args.concurrency}) | 1 worker | 2 workers | 2 / 1 |")
    print("|---|---:|---:|---:|")
    for route in routes:
        one = statistics.median(results[(1, route)])
        two = statistics.median(results[(2, route)])
        print(f"| `{route}` | {one:,.0f} | {two:,.0f} | {two / one:.2f}x |")
    print(f"\n(medians of {args.rounds} rounds, req/s; {os.cpu_count()} CPUs)")
    print()
    print("Where the CPU went during the measured runs (cores busy, medians):")
    print()
    print(
        "| route | workers | machine | supervisor + workers | PostgreSQL | ab "
        "| everything else |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for route in routes:
        for workers in (1, 2):
            runs = usage[(workers, route)]

            def med(key: str, runs: list[dict[str, float]] = runs) -> float:
                return statistics.median(r[key] for r in runs)

            rest = med("machine") - med("workers") - med("postgres") - med("ab")
            print(
                f"| `{route}` | {workers} | {med('machine'):.2f} | "
                f"{med('workers'):.2f} | {med('postgres'):.2f} | {med('ab'):.2f} "
                f"| {max(rest, 0):.2f} |"
            )


if __name__ == "__main__":
    main()
