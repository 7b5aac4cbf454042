# -*- test-case-name: tests.test_migrations -*-
"""
The shop's schema migrations (Alembic).

- ``twistd -n klein-demo`` brings the schema to the latest revision at start
  (in the service's start-up fiber, through :func:`upgrade`);
  ``--no-migrate`` turns that off.
- From a shell, the ordinary ``alembic`` command with this directory's
  ``alembic.ini``::

      DATABASE_URL=postgresql://user@host/shop \\
          alembic -c klein_demo/migrations/alembic.ini upgrade head

  (``-x url=...`` works too; a ``postgresql://`` URL is used with the
  ``postgresql+txpostgres`` driver.)
- A new revision after a change to :mod:`klein_demo.models`::

      alembic -c klein_demo/migrations/alembic.ini revision --autogenerate -m "..."
"""

from __future__ import annotations

import os
from typing import Any, Optional

__all__ = ["BASELINE", "DIRECTORY", "alembic_config", "current_revision", "upgrade"]

#: The revision that creates the schema ``Base.metadata.create_all`` made
#: before the shop had migrations.
BASELINE = "0001"

#: This directory: Alembic's ``script_location``.
DIRECTORY = os.path.dirname(os.path.abspath(__file__))


def alembic_config(url: Optional[str] = None, connection: Any = None) -> Any:
    """
    An :class:`alembic.config.Config` for the shop's migrations, built in
    code (no ``alembic.ini``, so Alembic leaves the process's logging
    alone): to the database at ``url``, or on ``connection`` (an open
    SQLAlchemy Connection, used as is, in a fiber).
    """
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", DIRECTORY)
    if url is not None:
        config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def upgrade(connection: Any, revision: str = "head") -> None:
    """
    In a fiber: bring the schema on ``connection`` to ``revision`` (the
    caller commits, or uses ``engine.begin()``).

    A shop made before it had migrations (``create_all``, which made what
    revision ``0001`` makes) is stamped ``0001`` first, then upgraded.
    """
    from alembic import command
    from sqlalchemy import inspect

    config = alembic_config(connection=connection)
    if current_revision(connection) is None and inspect(connection).has_table(
        "products"
    ):
        command.stamp(config, BASELINE)
    command.upgrade(config, revision)


def current_revision(connection: Any) -> Optional[str]:
    """The revision the database on ``connection`` is at (None: none yet)."""
    from alembic.migration import MigrationContext

    return MigrationContext.configure(connection).get_current_revision()
