"""
The example of doc/howto/testing.md for one pytest session that mixes
pytest-twisted tests, fiber tests and trial TestCases (its code block is
kept identical to this file by tests/test_howto_testing.py).
"""

# --- example: pytest mixed
import pytest
import pytest_twisted
from sqlalchemy import create_engine, text
from twisted.trial.unittest import TestCase

from txfiberdb import run_in_fiber
from txfiberdb.testing import FiberTestCase, dsn_to_url, test_server

engine = create_engine(dsn_to_url(test_server()))


def server_version():
    with engine.connect() as conn:
        return conn.execute(text("SHOW server_version_num")).scalar()


@pytest.mark.fiber
def test_in_a_fiber():
    assert int(server_version()) >= 120000


@pytest_twisted.inlineCallbacks
def test_inline_callbacks():
    version = yield run_in_fiber(server_version)
    assert int(version) >= 120000


@pytest_twisted.ensureDeferred
async def test_coroutine():
    assert int(await run_in_fiber(server_version)) >= 120000


class FiberTests(FiberTestCase):
    def test_in_a_fiber_too(self):
        self.assertGreaterEqual(int(server_version()), 120000)


class DeferredTests(TestCase):
    def test_returns_a_deferred(self):
        return run_in_fiber(server_version).addCallback(self.assertTrue)
# --- end example
