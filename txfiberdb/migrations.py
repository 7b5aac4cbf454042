# -*- test-case-name: tests.test_migrations -*-
"""
Alembic migrations for ``postgresql+txpostgres``.

Alembic's stock ``env.py`` runs the online migrations with plain synchronous
SQLAlchemy, which ``postgresql+txpostgres`` allows only inside a fiber.  One
line changes::

    run_online(run_migrations_online)      # instead of run_migrations_online()

:func:`run_online` calls the function directly when it already runs in a
fiber (a twistd service migrating at start-up, a ``FiberTestCase``, a
``@pytest.mark.fiber`` test) and through :func:`txfiberdb.run_blocking`
otherwise (the ``alembic`` command line, a script): the same ``env.py``
serves both.  Offline mode (``alembic upgrade --sql``) needs no database
and no change.

A ready-made environment with that ``env.py``::

    python -m txfiberdb.migrations init migrations

(Alembic's ``alembic init --template NAME`` only looks in Alembic's own
template directory; this command runs Alembic's ``init`` with txfiberdb's
template.)  ``doc/howto/migrations.md`` has the recipe.

This module is named ``migrations``, not ``alembic``, so that it can never
shadow the ``alembic`` package.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, Optional, TypeVar

from txfiberdb.blocking import run_blocking
from txfiberdb.fiber import in_fiber

__all__ = ["TEMPLATE_DIRECTORY", "init", "main", "run_online"]

_T = TypeVar("_T")

#: The directory holding txfiberdb's Alembic template(s) (``txfiberdb``).
TEMPLATE_DIRECTORY = os.path.join(os.path.dirname(__file__), "alembic_templates")


def run_online(f: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
    """
    Run ``f`` (``env.py``'s ``run_migrations_online``) where
    ``postgresql+txpostgres`` works: directly when already in a fiber,
    otherwise in a fiber through :func:`txfiberdb.run_blocking`.
    """
    if in_fiber():
        return f(*args, **kwargs)
    return run_blocking(f, *args, **kwargs)


def _config_class() -> Any:
    from alembic.config import Config

    class TemplateConfig(Config):
        """Alembic's Config, finding templates in txfiberdb's directory."""

        def get_template_directory(self) -> str:
            return TEMPLATE_DIRECTORY

    return TemplateConfig


def init(
    directory: str,
    config_file: str = "alembic.ini",
    template: str = "txfiberdb",
) -> None:
    """
    Create an Alembic environment in ``directory`` (and ``config_file``,
    unless it exists) from txfiberdb's template: ``alembic init`` with an
    ``env.py`` that runs its online migrations in a fiber.
    """
    from alembic import command

    config = _config_class()(config_file)
    command.init(config, directory, template=template)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m txfiberdb.migrations init DIRECTORY [-c alembic.ini]``."""
    import argparse

    from alembic.util import CommandError

    parser = argparse.ArgumentParser(
        prog="python -m txfiberdb.migrations",
        description=(
            "Create an Alembic environment for postgresql+txpostgres "
            "(Alembic's generic template with its online migrations run in a "
            "fiber). Then use the ordinary alembic command."
        ),
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_init = sub.add_parser("init", help="create a migration environment")
    p_init.add_argument("directory", help="where the environment goes")
    p_init.add_argument(
        "-c",
        "--config",
        default="alembic.ini",
        help="the alembic.ini to write (default: ./alembic.ini)",
    )
    args = parser.parse_args(argv)
    try:
        init(args.directory, config_file=args.config)
    except CommandError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
