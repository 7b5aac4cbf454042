"""
pytest set-up shared by SQLAlchemy's third-party dialect compliance suite
(``sqlalchemy.testing.suite``, ``conftest.py`` here) and Alembic's
(``alembic.testing.suite``, ``alembic/conftest.py``), run against
``postgresql+txpostgres`` and, for comparison, ``postgresql+psycopg2``.
Each ``conftest.py`` star-imports this module (its hooks and SQLAlchemy's
pytest plugin).

How the database work gets a fiber
----------------------------------

``postgresql+txpostgres`` may only be used inside a txfiberdb fiber, with the
Twisted reactor turning.  SQLAlchemy's plugin does database work everywhere:
provisioning at session start, class set-up (``define_tables``,
``insert_data``), fixtures, test bodies, teardown, ``--dropfirst`` and final
cleanup.  Fixtures and tests also hand connections to one another (the
``connection`` fixture checks one out that the test then uses), so giving
each call a fiber of its own would not do: txfiberdb's pool returns what a
fiber still holds when that fiber ends.

So the *whole pytest session* runs in one fiber: :func:`pytest_cmdline_main`
(``tryfirst``) re-enters the hook inside a fiber and, on the main greenlet
(the hub), turns the reactor with ``reactor.iterate()`` until the session is
over (:func:`txfiberdb.run_blocking`).  Every hook, fixture and test then runs in that fiber, exactly in the
order pytest would run them anyway, and each query parks the fiber while the
main greenlet drives the reactor.  With psycopg2 the same fiber simply blocks.

SQLAlchemy's own asyncio bridge (``sqlalchemy.testing.asyncio._async_util``)
is replaced by one that runs its callable in the current fiber:
``_assume_async(post_begin)`` would otherwise start an asyncio loop and a
greenlet that is not a fiber.

pytest-twisted and txfiberdb's own pytest plugin must be off
(``-p no:twisted -p no:txfiberdb``, in ``setup.cfg``'s ``addopts``): both
run the reactor their own way.
"""

from __future__ import annotations

import os
import sys

import pytest
from sqlalchemy.dialects import registry

# Installed txfiberdb registers it through its entry point; be explicit.
registry.register("postgresql.txpostgres", "txfiberdb.dialect", "TxPostgresDialect")

pytest.register_assert_rewrite("sqlalchemy.testing.assertions")

import provision  # noqa: E402,F401  (PostgreSQL provisioning for any driver)
from sqlalchemy.testing.plugin.pytestplugin import *  # noqa: E402,F401,F403
from twisted.internet import reactor  # noqa: E402

import txfiberdb  # noqa: E402
from txfiberdb import fiber  # noqa: E402

def run_blocking(fn, *args, **kwargs):
    """
    Call ``fn(*args, **kwargs)`` in a fiber (txfiberdb's public
    :func:`~txfiberdb.run_blocking`, which turns the reactor on this greenlet
    until it returns); already in the session fiber: just call it.
    """
    if fiber.in_fiber():
        return fn(*args, **kwargs)
    return txfiberdb.run_blocking(fn, *args, **kwargs)


class _FiberAsyncUtil:
    """Stands in for ``sqlalchemy.testing.asyncio._async_util``."""

    def __init__(self, original):
        self._original = original

    def run_in_greenlet(self, fn, *args, **kwargs):
        return run_blocking(fn, *args, **kwargs)

    def run(self, fn, *args, **kwargs):
        # ``async def`` tests (``@async_test``): only for asyncio dialects.
        return self._original.run(fn, *args, **kwargs)

    def close(self):
        self._original.close()


#: Twisted log events at level "warn" and above seen during the session
#: (txfiberdb reports through twisted.logger: connections given back by
#: the pool at fiber exit, unhandled errors in Deferreds, lost connections).
_twisted_problems = []


def _observe_twisted_log(event):
    from twisted.logger import LogLevel, formatEvent

    level = event.get("log_level")
    if "log_failure" in event or (level is not None and level >= LogLevel.warn):
        text = formatEvent(event)
        failure = event.get("log_failure")
        if failure is not None:
            text += "\n" + failure.getTraceback()
        _twisted_problems.append(
            (os.environ.get("PYTEST_CURRENT_TEST", "(outside a test)"), text)
        )


def _install():
    from sqlalchemy.testing import asyncio as sa_testing_asyncio
    from twisted.logger import globalLogPublisher

    globalLogPublisher.addObserver(_observe_twisted_log)

    if not isinstance(sa_testing_asyncio._async_util, _FiberAsyncUtil):
        sa_testing_asyncio._async_util = _FiberAsyncUtil(
            sa_testing_asyncio._async_util
        )
    # The session fiber runs for minutes between waits (collection, CPU-bound
    # tests): the "held the reactor" warning is noise here.
    fiber.set_slow_threshold(None)


_install()


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config):
    if fiber.in_fiber():
        return None  # inside the session fiber: let pytest do its work
    return run_blocking(config.hook.pytest_cmdline_main, config=config)


def pytest_report_header(config):
    return (
        f"txfiberdb compliance: session runs in one fiber; reactor "
        f"{type(reactor).__module__}.{type(reactor).__name__}; python "
        f"{sys.version.split()[0]}"
    )


def pytest_terminal_summary(terminalreporter):
    if not _twisted_problems:
        return
    tr = terminalreporter
    tr.write_sep("=", f"{len(_twisted_problems)} Twisted log warnings/errors")
    for where, text in _twisted_problems[:20]:
        tr.write_line(f"[{where}] {text}")
    if len(_twisted_problems) > 20:
        tr.write_line(f"... and {len(_twisted_problems) - 20} more")
