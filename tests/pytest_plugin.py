"""
The pytest plugin: marked tests run in a fiber whose hub is pytest-twisted's
reactor greenlet.
"""

import greenlet
import pytest
import pytest_twisted
from twisted.internet import reactor, task

from txfiberdb import await_deferred, in_fiber, run_in_fiber
from txfiberdb.fiber import NotInFiberError


@pytest.mark.fiber
def test_marked_test_runs_in_fiber():
    assert in_fiber()
    value = await_deferred(task.deferLater(reactor, 0.01, lambda: "resumed"))
    assert value == "resumed"


@pytest.mark.fiber
def test_hub_is_pytest_twisted_reactor_greenlet():
    await_deferred(task.deferLater(reactor, 0, lambda: None))
    hub = greenlet.getcurrent().parent
    assert hub is pytest_twisted._instances.gr_twisted
    assert hub.parent is not None  # not the main greenlet


def test_unmarked_test_is_not_in_fiber():
    assert not in_fiber()
    with pytest.raises(NotInFiberError):
        await_deferred(task.deferLater(reactor, 0, lambda: None))


@pytest_twisted.inlineCallbacks
def test_run_in_fiber_from_inline_callbacks():
    def body():
        return await_deferred(task.deferLater(reactor, 0.01, lambda: 7)) * 6

    result = yield run_in_fiber(body)
    assert result == 42


def test_postgres_dsn_fixture(postgres_dsn, postgres_url):
    import psycopg2

    conn = psycopg2.connect(postgres_dsn)
    try:
        with conn.cursor() as cur:
            cur.execute("select 1")
            assert cur.fetchone() == (1,)
    finally:
        conn.close()
    assert postgres_url.startswith("postgresql+txpostgres://")
