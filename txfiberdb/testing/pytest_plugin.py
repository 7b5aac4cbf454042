"""
pytest plugin (entry point ``pytest11``), built on pytest-twisted.

- ``@pytest.mark.fiber`` on a test (or ``pytestmark = pytest.mark.fiber`` in a
  module) runs it in a fiber: it may wait on Deferreds and use txfiberdb's
  SQLAlchemy engine as ordinary synchronous code.
- Fixtures: ``postgres_dsn`` (libpq DSN of the test server, session scope),
  ``postgres_url`` (the same as a ``postgresql+txpostgres`` URL),
  ``fresh_database_dsn`` (a new empty database for one test, dropped after).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "fiber: run the test in a txfiberdb fiber (needs pytest-twisted)"
    )


@pytest.hookimpl(trylast=True)
def pytest_sessionstart(session: pytest.Session) -> None:
    # pytest-twisted runs the reactor in a greenlet of its own: that is the hub.
    try:
        import pytest_twisted
    except ImportError:
        return
    gr = pytest_twisted._instances.gr_twisted
    if gr is not None:
        from txfiberdb.fiber import set_hub

        set_hub(gr)


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> None:
    if pyfuncitem.get_closest_marker("fiber") is None:
        return
    if getattr(pyfuncitem.obj, "_txfiberdb_wrapped", False):
        return
    try:
        import pytest_twisted  # noqa: F401
    except ImportError:  # pragma: no cover
        raise pytest.UsageError(
            "@pytest.mark.fiber needs pytest-twisted: pip install pytest-twisted"
        ) from None
    from txfiberdb.fiber import fibered

    wrapped: Any = fibered(pyfuncitem.obj)
    wrapped._txfiberdb_wrapped = True
    pyfuncitem.obj = wrapped


@pytest.fixture(scope="session")
def postgres_dsn() -> str:
    """libpq DSN of the test server (``$TXFIBERDB_TEST_DSN`` or a throwaway one)."""
    from txfiberdb.testing import test_server

    return test_server()


@pytest.fixture(scope="session")
def postgres_url(postgres_dsn: str) -> str:
    """The test server as a ``postgresql+txpostgres://`` SQLAlchemy URL."""
    from txfiberdb.testing import dsn_to_url

    return dsn_to_url(postgres_dsn)


@pytest.fixture
def fresh_database_dsn(postgres_dsn: str) -> Iterator[str]:
    """A new, empty database for this test; dropped afterwards."""
    from txfiberdb.testing import create_database, drop_database

    dsn = create_database()
    yield dsn
    drop_database(dsn)
