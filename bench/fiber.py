"""
Bridge round trip: what one wait on a Deferred costs, per style, in one run.

A *round trip* is: a waiter waits on a Deferred (or an asyncio Future), the
event loop fires it on its next turn, the waiter resumes with the value.
Every style does exactly that ``--n`` times in a row; the Twisted styles all
fire with ``reactor.callLater(0, d.callback, i)`` on the default reactor, the
asyncio styles with ``loop.call_soon(fut.set_result, i)``.  Rounds of the
styles are interleaved so that drift of the machine hits them all alike; the
table gives the median over ``--rounds`` rounds, and its ratio to the bare
Deferred callback.

Run:  python bench/fiber.py [--rounds 5] [--n 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import platform
import statistics
import time
from collections.abc import Callable
from importlib.metadata import version
from typing import Any

from sqlalchemy.util.concurrency import await_, greenlet_spawn
from twisted.internet import defer
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred

from txfiberdb.fiber import await_deferred, run_in_fiber

reactor: Any = _reactor  # the default reactor (epoll on Linux)
callLater = reactor.callLater


# --- Twisted styles: each returns a Deferred that fires with the sum of the
# values received (a check that every round trip delivered its value). ---


def bare_callback(n: int) -> Deferred[int]:
    """Baseline: plain callback chaining, no coroutine or greenlet at all."""
    done: Deferred[int] = Deferred()
    total = 0

    def step(i: int) -> None:
        d: Deferred[int] = Deferred()
        d.addCallback(on_result, i)
        callLater(0, d.callback, i)

    def on_result(value: int, i: int) -> None:
        nonlocal total
        total += value
        if i + 1 < n:
            step(i + 1)
        else:
            done.callback(total)

    step(0)
    return done


def txfiberdb_fiber(n: int) -> Deferred[int]:
    """txfiberdb: synchronous code in a fiber parks on each Deferred."""

    def body() -> int:
        total = 0
        for i in range(n):
            d: Deferred[int] = Deferred()
            callLater(0, d.callback, i)
            total += await_deferred(d)
        return total

    return run_in_fiber(body)


@defer.inlineCallbacks
def inline_callbacks(n: int) -> Any:
    """Twisted's generator coroutines: ``yield d`` in a loop."""
    total = 0
    for i in range(n):
        d: Deferred[int] = Deferred()
        callLater(0, d.callback, i)
        total += yield d
    return total


async def _native(n: int) -> int:
    total = 0
    for i in range(n):
        d: Deferred[int] = Deferred()
        callLater(0, d.callback, i)
        total += await d
    return total


def async_def(n: int) -> Deferred[int]:
    """Native coroutine awaiting Deferreds, driven by ``ensureDeferred``."""
    return defer.ensureDeferred(_native(n))


# --- asyncio styles: coroutine functions run to completion on one private
# event loop (see _run_asyncio). ---


async def sqlalchemy_greenlet(n: int) -> int:
    """SQLAlchemy's own greenlet bridge (what its asyncio engines use)."""
    loop = asyncio.get_running_loop()

    def body() -> int:
        total = 0
        for i in range(n):
            fut = loop.create_future()
            loop.call_soon(fut.set_result, i)
            total += await_(fut)
        return total

    return await greenlet_spawn(body)


async def asyncio_await(n: int) -> int:
    """Reference: a plain asyncio coroutine, ``await fut`` in a loop."""
    loop = asyncio.get_running_loop()
    total = 0
    for i in range(n):
        fut = loop.create_future()
        loop.call_soon(fut.set_result, i)
        total += await fut
    return total


async def asyncio_callback(n: int) -> int:
    """Reference: asyncio's own bare callback (``add_done_callback``)."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    total = 0

    def step(i: int) -> None:
        fut = loop.create_future()
        fut.add_done_callback(lambda f: on_result(f.result(), i))
        loop.call_soon(fut.set_result, i)

    def on_result(value: int, i: int) -> None:
        nonlocal total
        total += value
        if i + 1 < n:
            step(i + 1)
        else:
            done.set_result(total)

    step(0)
    return await done


# (label, loop, function); the first row is the baseline of the ratios.
STYLES: list[tuple[str, str, Callable[[int], Any]]] = [
    ("bare Deferred callback (baseline)", "twisted", bare_callback),
    ("txfiberdb `run_in_fiber` + `await_deferred`", "twisted", txfiberdb_fiber),
    ("`@inlineCallbacks` + `yield d`", "twisted", inline_callbacks),
    ("`async def` + `await d` via `ensureDeferred`", "twisted", async_def),
    ("SQLAlchemy `greenlet_spawn` + `await_`", "asyncio", sqlalchemy_greenlet),
    ("asyncio `async def` + `await fut`", "asyncio", asyncio_await),
    ("asyncio bare callback (`add_done_callback`)", "asyncio", asyncio_callback),
]


async def _measure_all(
    rounds: int, n: int, aio: asyncio.AbstractEventLoop
) -> dict[str, list[float]]:
    """Run every style ``rounds`` times (plus a warm-up), interleaved."""
    expected = n * (n - 1) // 2
    times: dict[str, list[float]] = {label: [] for label, _, _ in STYLES}
    for r in range(rounds + 1):
        for label, kind, fn in STYLES:
            gc.collect()
            gc.disable()  # as timeit does: no collection inside a timed round
            try:
                start = time.perf_counter()
                if kind == "twisted":
                    total = await fn(n)
                else:
                    # The asyncio loop runs nested inside this reactor call;
                    # the reactor simply waits until it is done.
                    total = aio.run_until_complete(fn(n))
                elapsed = time.perf_counter() - start
            finally:
                gc.enable()
            assert total == expected, (label, total, expected)
            if r:  # round 0 is the warm-up
                times[label].append(elapsed)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds")
    parser.add_argument("--n", type=int, default=20_000, help="round trips/round")
    args = parser.parse_args()

    aio = asyncio.new_event_loop()
    outcome: list[Any] = []

    def start() -> None:
        d: Deferred[Any] = defer.ensureDeferred(_measure_all(args.rounds, args.n, aio))
        d.addBoth(outcome.append)
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(start)
    reactor.run()
    aio.close()
    result = outcome[0]
    if not isinstance(result, dict):
        result.raiseException()

    medians = {
        label: statistics.median(ts) * 1e6 / args.n for label, ts in result.items()
    }
    base = medians[STYLES[0][0]]
    print(
        f"Python {platform.python_version()}, Twisted {version('twisted')} "
        f"({type(reactor).__name__}), SQLAlchemy {version('sqlalchemy')}, "
        f"greenlet {version('greenlet')}; {args.rounds} rounds x {args.n} "
        "round trips, median\n"
    )
    print("| style | loop | µs / round trip | ratio to bare callback |")
    print("|---|---|---:|---:|")
    for label, kind, _ in STYLES:
        us = medians[label]
        print(f"| {label} | {kind} | {us:.2f} | {us / base:.2f} |")


if __name__ == "__main__":
    main()
