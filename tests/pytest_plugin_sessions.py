"""
Whole pytest sessions, run in a subprocess (pytester) against the test
server: what users write the obvious way, and the messages they get when it
cannot work.
"""

import textwrap

import pytest

pytest_plugins = ["pytester"]

HEADER = """
import pytest
import pytest_twisted
from sqlalchemy import create_engine, text
from twisted.internet import reactor, task
from twisted.trial.unittest import TestCase
from txfiberdb import await_deferred, in_fiber, run_in_fiber
from txfiberdb.testing import (
    FiberTestCase, create_database, dsn_to_url, fiber_fixture,
)

engine = create_engine(dsn_to_url(create_database()), pool_size=2)


def one():
    with engine.connect() as c:
        return c.execute(text("SELECT 1")).scalar()
"""


@pytest.fixture
def session(pytester, postgres_dsn, monkeypatch):
    """Run a pytest session of ``source`` (after HEADER); its RunResult."""
    monkeypatch.setenv("TXFIBERDB_TEST_DSN", postgres_dsn)

    def run(source, *args):
        pytester.makepyfile(test_inner=HEADER + textwrap.dedent(source))
        return pytester.runpytest_subprocess(
            "-p", "no:cacheprovider", "-p", "no:randomly", *args, timeout=300
        )

    return run


def test_styles_mix_in_one_session(session):
    """
    pytest-twisted tests, fiber tests, FiberTestCase and plain trial
    TestCases share pytest-twisted's reactor, in any order, with one engine
    shared by all.
    """
    result = session(
        """
        @pytest_twisted.inlineCallbacks
        def test_inline_callbacks():
            assert (yield run_in_fiber(one)) == 1

        @pytest.mark.fiber
        def test_fiber():
            assert one() == 1

        class Fibers(FiberTestCase):
            def setUp(self):
                self.conn = engine.connect()

            def tearDown(self):
                self.conn.close()

            def test_a(self):
                assert self.conn.execute(text("SELECT 2")).scalar() == 2

            def test_b(self):
                assert in_fiber() and one() == 1

        class PlainTrial(TestCase):
            def test_returns_deferred(self):
                return run_in_fiber(one).addCallback(self.assertEqual, 1)

            def test_delayed(self):
                return task.deferLater(reactor, 0.01, lambda: None)

        @pytest.mark.fiber
        def test_fiber_after_trial():
            assert one() == 1

        @pytest_twisted.ensureDeferred
        async def test_ensure_deferred():
            assert await run_in_fiber(one) == 1
        """
    )
    result.assert_outcomes(passed=8)


def test_unmarked_test_is_told_the_marker(session):
    result = session(
        """
        def test_forgot_the_marker():
            one()
        """
    )
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*NotInFiberError*@pytest.mark.fiber*"])


def test_plain_fixture_is_told_fiber_fixture(session):
    """
    The obvious fixture written with @pytest.fixture: the message says what
    to use instead (no bare AssertionError from SQLAlchemy's pool).
    """
    result = session(
        """
        @pytest.fixture
        def connection():
            with engine.connect() as conn:
                yield conn

        @pytest.mark.fiber
        def test_uses_it(connection):
            pass
        """
    )
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*NotInFiberError*fiber_fixture*"])
    assert "AssertionError" not in result.stdout.str()


def test_fiber_fixture_failures_are_reported(session):
    """Errors in a fiber fixture's set-up and tear-down surface as pytest's."""
    result = session(
        """
        @fiber_fixture
        def broken():
            with engine.connect() as c:
                c.execute(text("SELECT * FROM no_such_table"))

        @fiber_fixture(scope="module")
        def bad_teardown():
            yield one()
            raise RuntimeError("teardown failed here")

        def test_broken(broken):
            pass

        def test_bad_teardown(bad_teardown):
            assert bad_teardown == 1
        """
    )
    result.assert_outcomes(passed=1, errors=2)
    result.stdout.fnmatch_lines(
        ["*UndefinedTable*no_such_table*", "*RuntimeError: teardown failed here*"]
    )


def test_fixture_connections_are_given_back(session):
    """
    A fixture that forgets to close what it checked out: the pool takes it
    back when the fixture's scope ends, not before.
    """
    result = session(
        """
        from txfiberdb import pool_stats

        class TestLeaky:
            @fiber_fixture(scope="class")
            def leaky(self):
                return engine.connect()  # never closed

            @pytest.mark.fiber
            def test_one(self, leaky):
                assert leaky.execute(text("SELECT 1")).scalar() == 1
                assert pool_stats(engine)["checked_out"] == 1

            @pytest.mark.fiber
            def test_two(self, leaky):
                assert leaky.execute(text("SELECT 1")).scalar() == 1
                assert pool_stats(engine)["checked_out"] == 1

        def test_after_the_class():
            assert pool_stats(engine)["checked_out"] == 0
        """
    )
    result.assert_outcomes(passed=3)


@pytest.mark.parametrize(
    "decorators",
    [
        "@pytest.mark.fiber\n@pytest_twisted.inlineCallbacks\n",
        "@pytest.mark.fiber\n@pytest_twisted.ensureDeferred\nasync ",
    ],
)
def test_fiber_marker_on_asynchronous_test_refused(session, decorators):
    result = session(
        f"""
{decorators}def test_both():
    pass
"""
    )
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*test_both*@pytest.mark.fiber*drop one of the two*"])


def test_fiber_marker_on_trial_test_case(session):
    """
    Refused on a plain trial TestCase (it would not run in a fiber); a
    FiberTestCase, which runs in one anyway, may carry it (a module's
    ``pytestmark``).
    """
    result = session(
        """
        pytestmark = pytest.mark.fiber

        class Fibers(FiberTestCase):
            def test_it(self):
                assert one() == 1

        @pytest.mark.fiber
        def test_function():
            assert one() == 1
        """
    )
    result.assert_outcomes(passed=2)
    result = session(
        """
        class Plain(TestCase):
            @pytest.mark.fiber
            def test_it(self):
                pass
        """
    )
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*Plain::test_it*FiberTestCase instead*"])


def test_fiber_fixture_async_refused():
    from txfiberdb.testing import fiber_fixture

    async def f():
        pass

    with pytest.raises(TypeError, match="async"):
        fiber_fixture(f)
