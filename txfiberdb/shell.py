# -*- test-case-name: tests.test_shell -*-
"""
An interactive Python console for ``postgresql+txpostgres``, as ``rails
console`` or ``flask shell``::

    python -m txfiberdb.shell postgresql://user@host/db [--import myapp.models]

``engine``, a ``session`` (an ORM Session on it), ``select``, ``text``,
``func`` and ``run_in_fiber``/``sleep`` are preloaded; ``--import MODULE``
adds a module's public names (your models).  The URL may also come from
``$DATABASE_URL``; a ``postgresql://`` URL is used with the txpostgres
driver.

The whole console runs in one fiber, so every statement may use the
database as ordinary synchronous code, and a Session (with its connection
and transaction) lives from one input to the next.  While a statement waits
on PostgreSQL the reactor turns on the main greenlet
(:func:`txfiberdb.run_blocking`'s machinery); while the console waits for
input nothing runs.  Ctrl-C at the prompt clears the input; Ctrl-C while a
statement runs cancels its query (PostgreSQL cancels it, the transaction
is rolled back) when it waits on the database, and the console goes on; a
second Ctrl-C interrupts Python code that never waits.  Ctrl-D or
``exit()`` leaves, after the pool's connections are closed.
"""

from __future__ import annotations

import argparse
import code
import importlib
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any, Optional

from twisted.internet.defer import CancelledError

from txfiberdb.blocking import _block_on, _blocking_greenlet, _Interrupts
from txfiberdb.fiber import _Fiber

__all__ = ["FiberConsole", "interact", "main", "make_namespace", "to_txpostgres_url"]


def to_txpostgres_url(url: str) -> str:
    """
    ``url`` as a ``postgresql+txpostgres`` URL (``postgres://`` and
    ``postgresql://`` URLs get the txpostgres driver; another driver or
    database is refused with :exc:`ValueError`).
    """
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    url = url.strip()
    if url.startswith("postgres://"):
        url = "postgresql://" + url[len("postgres://") :]
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ValueError(
            f"not a database URL: {url!r} (expected "
            "postgresql://user:password@host:port/dbname)"
        ) from None
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+txpostgres")
    if parsed.drivername != "postgresql+txpostgres":
        raise ValueError(
            f"the shell speaks postgresql+txpostgres, not {parsed.drivername} "
            "(use a postgresql:// URL)"
        )
    return parsed.render_as_string(hide_password=False)


def make_namespace(engine: Any, modules: Sequence[str] = ()) -> dict[str, Any]:
    """
    The console's names: ``engine``, ``session``, SQLAlchemy's ``select``,
    ``text``, ``func``, ``update``, ``delete``, ``insert``, txfiberdb's
    ``run_in_fiber`` and ``sleep``, and the public names of ``modules``.
    """
    import sqlalchemy
    from sqlalchemy.orm import Session

    import txfiberdb

    namespace: dict[str, Any] = {
        "__name__": "__console__",
        "__doc__": None,
        "engine": engine,
        "session": Session(engine),
        "sqlalchemy": sqlalchemy,
        "select": sqlalchemy.select,
        "text": sqlalchemy.text,
        "func": sqlalchemy.func,
        "insert": sqlalchemy.insert,
        "update": sqlalchemy.update,
        "delete": sqlalchemy.delete,
        "run_in_fiber": txfiberdb.run_in_fiber,
        "sleep": txfiberdb.sleep,
    }
    for name in modules:
        module = importlib.import_module(name)
        public = getattr(module, "__all__", None)
        if public is None:
            public = [n for n in vars(module) if not n.startswith("_")]
        namespace.update({n: getattr(module, n) for n in public})
    return namespace


class FiberConsole(code.InteractiveConsole):
    """
    :class:`code.InteractiveConsole` meant to run in a fiber: tracebacks
    start at the user's code (not in the console's machinery), and a
    statement whose wait was cancelled by Ctrl-C shows ``KeyboardInterrupt``.
    """

    interrupted = False

    def __init__(self, namespace: dict[str, Any]) -> None:
        super().__init__(namespace)
        self.interrupts = _Interrupts()

    def raw_input(self, prompt: str = "") -> str:
        """
        ``input()``, where Ctrl-C raises at once (clearing the line); a
        Ctrl-C that came while the last statement computed without waiting
        is reported here instead of cancelling the next statement.
        """
        if self.interrupts.pending:
            self.interrupts.pending = False
            self.write("KeyboardInterrupt\n")
        self.interrupts.immediate = True
        try:
            return input(prompt)
        finally:
            self.interrupts.immediate = False

    def runcode(self, code_object: Any) -> None:
        self.interrupted = False
        try:
            exec(code_object, self.locals)
        except SystemExit:
            raise
        except CancelledError:
            if self.interrupted:
                self.write("KeyboardInterrupt (the statement's query was cancelled)\n")
            else:
                self.showtraceback()
        except BaseException:
            self.showtraceback()

    def showtraceback(self) -> None:
        """
        The traceback from the first frame of the code typed in (not the
        console's machinery).  For SQLAlchemy's errors (a failed statement:
        its message holds the database's error and the SQL), only the
        frames outside SQLAlchemy, Twisted and txfiberdb, and no chained driver
        error, as ``rails console`` shows a failed query.
        """
        from sqlalchemy.exc import SQLAlchemyError

        exc_type, exc, tb = sys.exc_info()
        assert exc_type is not None and exc is not None
        sys.last_type, sys.last_value, sys.last_traceback = exc_type, exc, tb
        start = tb
        while start is not None and start.tb_frame.f_code.co_filename != self.filename:
            start = start.tb_next
        if isinstance(exc, SQLAlchemyError):
            frames = [
                frame
                for frame in traceback.extract_tb(start or tb)
                if not _is_library_file(frame.filename)
            ]
            lines = ["Traceback (most recent call last):\n"]
            lines += traceback.format_list(frames)
            lines += traceback.format_exception_only(exc_type, exc)
        else:
            lines = traceback.format_exception(exc_type, exc, start or tb)
        self.write("".join(lines))


def _is_library_file(filename: str) -> bool:
    import sqlalchemy

    import twisted
    import txfiberdb

    return any(
        filename.startswith(os.path.dirname(module.__file__ or "") + os.sep)
        for module in (sqlalchemy, twisted, txfiberdb)
    )


def _cancel_wait(console: FiberConsole) -> Callable[[_Fiber], None]:
    def cancel(fib: _Fiber) -> None:
        waiting = fib.waiting_on
        if waiting is not None:
            console.interrupted = True
            waiting.cancel()

    return cancel


def interact(
    url: str,
    modules: Sequence[str] = (),
    banner: Optional[str] = None,
    prepare: Optional[Callable[[dict[str, Any]], Any]] = None,
    engine_options: Optional[dict[str, Any]] = None,
) -> int:
    """
    Run the console on the database at ``url`` until Ctrl-D or ``exit()``;
    return the exit status.  ``prepare(namespace)`` runs first, in the
    console's fiber (migrations, sample data, more names).

    :raise ValueError: a URL the shell cannot use.
    :raise sqlalchemy.exc.OperationalError: the database cannot be reached.
    """
    from sqlalchemy import create_engine, text

    hub = _blocking_greenlet()
    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    engine = create_engine(to_txpostgres_url(url), **(engine_options or {}))
    namespace = make_namespace(engine, modules)
    console = FiberConsole(namespace)

    def session() -> int:
        try:
            with engine.connect() as conn:
                conn.execute(text("select 1"))
            if prepare is not None:
                prepare(namespace)
            console.interact(
                banner=_banner(engine, namespace, modules, banner),
                exitmsg="",
            )
            return 0
        except SystemExit as e:
            return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        finally:
            namespace["session"].close()
            engine.dispose()

    return _block_on(
        hub,
        session,
        (),
        {},
        on_interrupt=_cancel_wait(console),
        interrupts=console.interrupts,
    )


def _banner(
    engine: Any, namespace: dict[str, Any], modules: Sequence[str], extra: Optional[str]
) -> str:
    names = "engine, session, select, text, func, insert, update, delete"
    lines = [
        f"txfiberdb shell on {engine.url.render_as_string(hide_password=True)}",
        f"Python {sys.version.split()[0]}; preloaded: {names}",
    ]
    if modules:
        lines.append("imported from " + ", ".join(modules))
    if extra:
        lines.append(extra)
    lines.append(
        "Each statement may use the database; Ctrl-C cancels a running query; "
        "Ctrl-D or exit() leaves."
    )
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m txfiberdb.shell [URL] [--import MODULE ...]``."""
    parser = argparse.ArgumentParser(
        prog="python -m txfiberdb.shell",
        description=(
            "An interactive Python console with a postgresql+txpostgres engine "
            "and an ORM session: every statement runs in a fiber."
        ),
    )
    parser.add_argument(
        "url",
        nargs="?",
        default=os.environ.get("DATABASE_URL"),
        help="postgresql://user:password@host:port/dbname (default: $DATABASE_URL)",
    )
    parser.add_argument(
        "-i",
        "--import",
        dest="modules",
        action="append",
        default=[],
        metavar="MODULE",
        help="preload the public names of MODULE (your models); repeatable",
    )
    parser.add_argument("--echo", action="store_true", help="log every SQL statement")
    args = parser.parse_args(argv)
    if not args.url:
        parser.error("no database: give a URL or set DATABASE_URL")
    return run(parser, args.url, args.modules, echo=args.echo)


def run(
    parser: argparse.ArgumentParser,
    url: str,
    modules: Sequence[str],
    echo: bool = False,
    **kwargs: Any,
) -> int:
    """:func:`interact` with errors reported as one line, for command lines."""
    from sqlalchemy.exc import DBAPIError

    try:
        return interact(url, modules, engine_options={"echo": echo}, **kwargs)
    except ValueError as e:
        parser.error(str(e))
    except ImportError as e:
        print(f"{parser.prog}: error: --import: {e}", file=sys.stderr)
    except DBAPIError as e:
        reason = " ".join(str(e.orig if e.orig is not None else e).split())
        print(
            f"{parser.prog}: error: cannot use the database: {reason}",
            file=sys.stderr,
        )
    return 2


if __name__ == "__main__":
    sys.exit(main())
