"""
Alembic environment of the shop: Alembic's generic ``env.py`` with the
online migrations run by :func:`txfiberdb.migrations.run_online` (in a
fiber), the database URL taken from ``-x url=``, ``$DATABASE_URL`` or
``sqlalchemy.url``, and the connection given by the caller used when there
is one (``klein_demo.migrations.upgrade``, Alembic's "sharing a connection"
recipe).
"""

import os
from logging.config import fileConfig

from alembic import context
from alembic.util import CommandError
from sqlalchemy import engine_from_config, pool
from sqlalchemy.engine import make_url

from klein_demo.models import Base
from txfiberdb.migrations import run_online

config = context.config

if config.config_file_name is not None:
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = Base.metadata


def database_url() -> str:
    """The URL to migrate, as a ``postgresql+txpostgres`` URL."""
    url = (
        context.get_x_argument(as_dictionary=True).get("url")
        or os.environ.get("DATABASE_URL")
        or config.get_main_option("sqlalchemy.url")
    )
    if not url:
        raise CommandError(
            "no database to migrate: pass -x url=postgresql://user@host/db "
            "or set DATABASE_URL"
        )
    if url.startswith("postgres://"):
        url = "postgresql://" + url[len("postgres://") :]
    parsed = make_url(url)
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+txpostgres")
    return parsed.render_as_string(hide_password=False)


def run_migrations_offline() -> None:
    """Write the SQL of the migrations (``--sql``): no database needed."""
    context.configure(
        url=database_url(),
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


def do_run_migrations(connection) -> None:
    context.configure(connection=connection, target_metadata=target_metadata)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """In a fiber: migrate on the caller's connection, or on a new one."""
    connection = config.attributes.get("connection")
    if connection is not None:
        do_run_migrations(connection)
        return
    section = config.get_section(config.config_ini_section, {})
    section["sqlalchemy.url"] = database_url()
    engine = engine_from_config(section, prefix="sqlalchemy.", poolclass=pool.NullPool)
    with engine.connect() as connection:
        do_run_migrations(connection)


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_online(run_migrations_online)
