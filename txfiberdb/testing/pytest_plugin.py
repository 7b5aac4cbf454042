# -*- test-case-name: tests.test_testing -*-
"""
pytest plugin (entry point ``pytest11``), built on pytest-twisted.

- ``@pytest.mark.fiber`` on a test (or ``pytestmark = pytest.mark.fiber`` in a
  module) runs it in a fiber: it may wait on Deferreds and use txfiberdb's
  SQLAlchemy engine as ordinary synchronous code.
- :func:`fiber_fixture` declares a fixture whose set-up and tear-down run in a
  fiber, as ``@pytest.fixture`` would declare it otherwise.
- Fixtures: ``postgres_dsn`` (libpq DSN of the test server, session scope),
  ``postgres_url`` (the same as a ``postgresql+txpostgres`` URL),
  ``fresh_database_dsn`` (a new empty database for one test, dropped after).

Which fiber runs what: each fixture scope in use (the test, its class, module,
package, the session) has *one* fiber, which runs the set-up and tear-down of
the fiber fixtures of that scope in turn; a marked test runs in its own
scope's fiber, the one of its function-scoped fiber fixtures.  A scope's fiber
ends when pytest leaves that scope, after its fixtures' tear-downs, and the
pool then takes back what is still checked out in it.  So what a fixture
checks out (a connection, a transaction, a Session bound to them) stays
checked out for as long as the fixture lives, and the test sees that very
connection: SQLAlchemy's "join a Session into an external transaction"
recipe works as pytest fixtures at any scope.

pytest-twisted tests (``@pytest_twisted.inlineCallbacks``,
``@pytest_twisted.ensureDeferred``), fiber tests and
:class:`txfiberdb.testing.FiberTestCase` tests share one reactor, run by
pytest-twisted in a greenlet of its own (the fibers' hub).
"""

from __future__ import annotations

import inspect
import sys
import unittest
from collections.abc import Callable, Generator, Iterator
from typing import Any, Optional, TypeVar, overload

import pytest

__all__ = ["fiber_fixture"]

_F = TypeVar("_F", bound=Callable[..., Any])

MARKER_HINT = (
    " (pytest: mark the test @pytest.mark.fiber to run it in a fiber, and "
    "declare the fixtures that use the database with "
    "@txfiberdb.testing.fiber_fixture)"
)
FIXTURE_HINT = (
    " (pytest: declare this fixture with @txfiberdb.testing.fiber_fixture "
    "instead of @pytest.fixture so that it runs in a fiber)"
)


def _blockon(d: Any) -> Any:
    """Wait for ``d`` from pytest's greenlet while pytest-twisted's reactor runs."""
    try:
        import pytest_twisted
    except ImportError:  # pragma: no cover - a dependency of the test extra
        raise pytest.UsageError(
            "txfiberdb's fiber tests and fixtures need pytest-twisted: "
            "pip install pytest-twisted"
        ) from None
    if pytest_twisted._config.external_reactor:
        raise pytest.UsageError(
            "txfiberdb's fiber tests and fixtures need pytest-twisted to run "
            "the reactor in its greenlet; here the reactor was already running "
            "(pytest started from a running reactor), which is not supported"
        )
    return pytest_twisted.blockon(d)


class _ScopeFibers:
    """The fiber of each fixture scope in use: node -> its step fiber."""

    def __init__(self) -> None:
        self._fibers: dict[Any, Any] = {}

    def run(self, node: Any, f: Callable[[], Any]) -> Any:
        """Run ``f`` in ``node``'s fiber (started on first use); its result."""
        steps = self._fibers.get(node)
        if steps is None:
            from txfiberdb.testing import _StepFiber

            steps = self._fibers[node] = _StepFiber(name=f"pytest {node.nodeid}")
        return _blockon(steps.runner(f)())

    def end_left(self, nextitem: Optional[pytest.Item]) -> None:
        """
        End the fibers of the nodes pytest has torn down: all those that
        ``nextitem`` does not descend from, as pytest's own SetupState does.
        """
        keep = set(nextitem.listchain()) if nextitem is not None else set()
        for node in [n for n in self._fibers if n not in keep]:
            _blockon(self._fibers.pop(node).stop())


_scopes = pytest.StashKey[_ScopeFibers]()


def _fibers(config: pytest.Config) -> _ScopeFibers:
    fibers = config.stash.get(_scopes, None)
    if fibers is None:
        fibers = config.stash[_scopes] = _ScopeFibers()
    return fibers


@overload
def fiber_fixture(function: _F) -> _F: ...


@overload
def fiber_fixture(
    function: None = None,
    *,
    scope: Any = "function",
    params: Optional[Any] = None,
    autouse: bool = False,
    ids: Optional[Any] = None,
    name: Optional[str] = None,
) -> Callable[[_F], _F]: ...


def fiber_fixture(
    function: Optional[_F] = None,
    *,
    scope: Any = "function",
    params: Optional[Any] = None,
    autouse: bool = False,
    ids: Optional[Any] = None,
    name: Optional[str] = None,
) -> Any:
    """
    ``@pytest.fixture`` for fixtures that use the database: the fixture's
    set-up (up to its ``yield``) and tear-down (after it) run in the fiber of
    the fixture's scope, which keeps what they check out until the scope
    ends.  Same arguments as ``pytest.fixture``; plain and ``yield``
    fixtures, at any scope, and methods of test classes are supported.

    ::

        @fiber_fixture(scope="module")
        def connection(engine):
            with engine.connect() as conn:
                yield conn
    """

    def decorate(f: _F) -> _F:
        if inspect.iscoroutinefunction(f) or inspect.isasyncgenfunction(f):
            raise TypeError(
                f"fiber_fixture {f.__qualname__} is async: a fiber fixture is "
                "ordinary synchronous code (for async fixtures use "
                "pytest_twisted.async_fixture)"
            )
        signature = inspect.signature(f)
        wants_request = "request" in signature.parameters
        parameters = list(signature.parameters.values())
        if not wants_request:
            parameters.append(
                inspect.Parameter("request", inspect.Parameter.KEYWORD_ONLY)
            )

        def scope_runner(kwargs: dict[str, Any]) -> Callable[[Callable[[], Any]], Any]:
            request = kwargs["request"] if wants_request else kwargs.pop("request")
            fibers = _fibers(request.config)
            node = request.node
            return lambda step: fibers.run(node, step)

        wrapper: Any
        if inspect.isgeneratorfunction(f):

            def wrapper(*args: Any, **kwargs: Any) -> Iterator[Any]:
                run = scope_runner(kwargs)
                gen = f(*args, **kwargs)
                try:
                    value = run(lambda: next(gen))
                except StopIteration:
                    raise ValueError(f"{f.__name__} did not yield a value") from None
                yield value

                def finish() -> None:
                    try:
                        next(gen)
                    except StopIteration:
                        return
                    raise ValueError(
                        f"fiber_fixture {f.__name__} yielded twice: a fixture "
                        "yields its value once"
                    )

                run(finish)

        else:

            def wrapper(*args: Any, **kwargs: Any) -> Any:
                run = scope_runner(kwargs)
                return run(lambda: f(*args, **kwargs))

        # Not functools.wraps: pytest would follow __wrapped__ to ``f`` and
        # lose the ``request`` argument added here.
        for attr in ("__module__", "__name__", "__qualname__", "__doc__"):
            setattr(wrapper, attr, getattr(f, attr))
        wrapper.__signature__ = signature.replace(parameters=parameters)
        wrapper._txfiberdb_fiber_fixture = True
        return pytest.fixture(  # type: ignore[no-any-return]
            wrapper, scope=scope, params=params, autouse=autouse, ids=ids, name=name
        )

    if function is not None:
        return decorate(function)
    return decorate


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


def pytest_collection_modifyitems(
    session: pytest.Session, config: pytest.Config, items: list[pytest.Item]
) -> None:
    """Refuse, at collection, a fiber marker where it cannot work."""
    errors = []
    for item in items:
        if item.get_closest_marker("fiber") is None:
            continue
        obj = getattr(item, "obj", None)
        if _is_fiber_test_case(item):
            continue  # runs in a fiber anyway
        if not isinstance(item, pytest.Function) or _is_unittest_case(item):
            errors.append(
                f"{item.nodeid}: @pytest.mark.fiber applies to pytest test "
                "functions; a unittest/trial TestCase does not run through "
                "it: subclass txfiberdb.testing.FiberTestCase instead"
            )
        elif obj is not None and (
            getattr(obj, "_pytest_twisted_mark", None) is not None
            or inspect.iscoroutinefunction(obj)
        ):
            errors.append(
                f"{item.nodeid}: @pytest.mark.fiber runs a synchronous test in "
                "a fiber; this test is asynchronous (pytest-twisted "
                "inlineCallbacks/ensureDeferred or async def): drop one of "
                "the two"
            )
    if errors:
        raise pytest.UsageError("\n".join(errors))


def _is_unittest_case(item: pytest.Item) -> bool:
    cls = getattr(item, "cls", None)
    return cls is not None and issubclass(cls, unittest.TestCase)


def _is_fiber_test_case(item: pytest.Item) -> bool:
    cls = getattr(item, "cls", None)
    if cls is None or "txfiberdb.testing" not in sys.modules:
        return False
    from txfiberdb.testing import FiberTestCase

    return issubclass(cls, FiberTestCase)


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> Optional[bool]:
    if pyfuncitem.get_closest_marker("fiber") is None:
        return None
    test = pyfuncitem.obj
    names = pyfuncitem._fixtureinfo.argnames
    kwargs = {name: pyfuncitem.funcargs[name] for name in names}
    _fibers(pyfuncitem.config).run(pyfuncitem, lambda: test(**kwargs))
    return True


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, Any, None]:
    case = getattr(item, "_testcase", None)
    if case is not None and "twisted.trial.unittest" in sys.modules:
        from twisted.trial.unittest import TestCase

        from txfiberdb.testing import FiberTestCase, share_pytest_reactor

        if isinstance(case, TestCase) and not isinstance(case, FiberTestCase):
            share_pytest_reactor(case)
    outcome = yield
    if item.get_closest_marker("fiber") is None and not _is_unittest_case(item):
        _add_hint(outcome.excinfo, MARKER_HINT)


@pytest.hookimpl(hookwrapper=True)
def pytest_fixture_setup(fixturedef: Any, request: Any) -> Generator[None, Any, None]:
    outcome = yield
    if not getattr(fixturedef.func, "_txfiberdb_fiber_fixture", False):
        _add_hint(outcome.excinfo, FIXTURE_HINT)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(
    item: pytest.Item, nextitem: Optional[pytest.Item]
) -> Generator[None, Any, None]:
    yield
    _fibers(item.config).end_left(nextitem)


def _add_hint(excinfo: Any, hint: str) -> None:
    """Append ``hint`` to a :exc:`NotInFiberError` raised there (once)."""
    if excinfo is None:
        return
    from txfiberdb.fiber import NotInFiberError

    exc = excinfo[1]
    if isinstance(exc, NotInFiberError) and not getattr(exc, "_txfiberdb_hint", False):
        exc._txfiberdb_hint = True  # type: ignore[attr-defined]
        exc.args = (f"{exc.args[0] if exc.args else ''}{hint}", *exc.args[1:])


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
