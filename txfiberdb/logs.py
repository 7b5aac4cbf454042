# -*- test-case-name: tests.test_observability -*-
"""
Stdlib ``logging`` into :mod:`twisted.logger`: one log for the whole service.

SQLAlchemy (``echo=True``, the pool's and the dialect's loggers), Alembic and
most libraries log through the standard library; a Twisted service logs
through ``twisted.logger``, which twistd writes to its log file (or a JSON
file, journald ...).  :func:`route_stdlib_logging` sends the first into the
second, each record as an event in the namespace of its logger (for example
``sqlalchemy.engine.Engine``) at the matching level:

>>> handler = route_stdlib_logging(["sqlalchemy.engine"], level=logging.INFO)
>>> engine = create_engine(url, echo=False)  # echo=True adds its own handler
...                                           # doctest: +SKIP
>>> handler.remove()                          # doctest: +SKIP

Pass SQLAlchemy's ``echo`` flag through your own option rather than
``create_engine(echo=True)``, which also attaches a stream handler of
SQLAlchemy's own (the lines would show twice).  SQL parameters are in those
lines only when the engine has ``hide_parameters=False``
(:class:`~txfiberdb.service.EngineService` hides them by default).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Optional

from twisted.logger import Logger, LogLevel

__all__ = ["StdlibToTwisted", "route_stdlib_logging"]

_LEVELS = (
    (logging.CRITICAL, LogLevel.critical),
    (logging.ERROR, LogLevel.error),
    (logging.WARNING, LogLevel.warn),
    (logging.INFO, LogLevel.info),
)


class StdlibToTwisted(logging.Handler):
    """A ``logging.Handler`` that emits each record into twisted.logger."""

    def __init__(self, level: int = logging.NOTSET) -> None:
        super().__init__(level)
        self.setFormatter(logging.Formatter("%(message)s"))
        self._loggers: list[logging.Logger] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level = next(
                (tw for std, tw in _LEVELS if record.levelno >= std), LogLevel.debug
            )
            # ("message" is a key of twisted's legacy events: not that one.)
            Logger(namespace=record.name).emit(
                level, "{log_text}", log_text=self.format(record)
            )
        except Exception:
            self.handleError(record)

    def remove(self) -> None:
        """Detach from the loggers :func:`route_stdlib_logging` attached it to."""
        for logger in self._loggers:
            logger.removeHandler(self)
        self._loggers = []


def route_stdlib_logging(
    names: Iterable[str] = ("sqlalchemy",),
    level: Optional[int] = None,
) -> StdlibToTwisted:
    """
    Send the records of the stdlib loggers ``names`` (and their children)
    to twisted.logger; return the handler (``handler.remove()`` undoes it).

    :param level: set on those loggers when given (``logging.INFO`` shows
        SQLAlchemy's statements, as ``echo=True`` does); otherwise their
        level is left as it is.
    """
    handler = StdlibToTwisted()
    for name in names:
        logger = logging.getLogger(name)
        if level is not None:
            logger.setLevel(level)
        logger.addHandler(handler)
        handler._loggers.append(logger)
    return handler
