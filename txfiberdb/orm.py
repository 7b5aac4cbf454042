# -*- test-case-name: tests.test_dialect -*-
"""
SQLAlchemy ORM helpers for fibers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy.orm import Session, scoped_session

from txfiberdb.fiber import NotInFiberError, current_fiber, on_fiber_exit

__all__ = ["fiber_scope", "fiber_scoped_session"]

_S = TypeVar("_S", bound=Session)


def fiber_scope() -> Any:
    """
    A ``scopefunc`` for :class:`sqlalchemy.orm.scoped_session`: one scope per
    fiber.  Prefer :func:`fiber_scoped_session`, which also removes each
    fiber's Session when the fiber ends.
    """
    fib = current_fiber()
    if fib is None:
        raise NotInFiberError(
            "a fiber-scoped session was used outside a fiber: run this code "
            "with txfiberdb.run_in_fiber() or @txfiberdb.fibered"
        )
    return fib


def fiber_scoped_session(session_factory: Callable[..., _S]) -> scoped_session[_S]:
    """
    A ``scoped_session`` with one Session per fiber, closed and forgotten
    when its fiber ends (so the registry never keeps dead fibers alive, and
    the Session's connection goes back to the pool).

    >>> Session = fiber_scoped_session(sessionmaker(engine))   # doctest: +SKIP
    >>> Session.add(obj); Session.commit()                     # doctest: +SKIP
    """
    scoped: scoped_session[_S] = scoped_session(
        session_factory,  # type: ignore[arg-type]
        scopefunc=fiber_scope,
    )
    registry: Any = scoped.registry
    create = registry.createfunc

    def create_for_fiber() -> Any:
        session = create()
        on_fiber_exit(scoped.remove)
        return session

    registry.createfunc = create_for_fiber
    return scoped
