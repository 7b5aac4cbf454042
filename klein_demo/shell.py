# -*- test-case-name: tests.test_shell -*-
"""
The shop's console: ``txfiberdb.shell`` with the shop's models imported::

    python -m klein_demo.shell [--dsn URL]

With ``--dsn`` (or ``$DATABASE_URL``) it opens that database as it is.
Without, it starts a throwaway PostgreSQL (removed on exit), brings the
schema to the latest migration and loads the sample data, as ``twistd -n
klein-demo`` does.  Then, for instance::

    >>> session.scalars(select(Product).where(Product.stock < 10)).all()
    >>> session.get(Customer, 1).orders[0].lines
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any, Optional

from txfiberdb import shell

__all__ = ["main"]

MODULES = ["klein_demo.models"]


def _prepare_throwaway(namespace: dict[str, Any]) -> None:
    """In the console's fiber: the schema and the sample data."""
    from klein_demo import migrations
    from klein_demo.models import load_sample_data

    engine = namespace["engine"]
    with engine.begin() as connection:
        migrations.upgrade(connection)
    from sqlalchemy.orm import Session

    with Session(engine) as session, session.begin():
        load_sample_data(session)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m klein_demo.shell",
        description=(
            "An interactive console on the shop's database, with its models "
            "(Product, Customer, Order, OrderLine) imported."
        ),
    )
    parser.add_argument(
        "--dsn",
        default=os.environ.get("DATABASE_URL"),
        help="postgresql://user@host/db (default: $DATABASE_URL, else a "
        "throwaway PostgreSQL with the sample data)",
    )
    parser.add_argument("--echo", action="store_true", help="log every SQL statement")
    args = parser.parse_args(argv)
    if args.dsn:
        return shell.run(parser, args.dsn, MODULES, echo=args.echo)

    from txfiberdb.testing import TemporaryPostgres

    print("starting a throwaway PostgreSQL (removed on exit) ...", file=sys.stderr)
    with TemporaryPostgres() as postgres:
        return shell.run(
            parser,
            postgres.url(),
            MODULES,
            echo=args.echo,
            prepare=_prepare_throwaway,
            banner="throwaway PostgreSQL with the sample data (removed on exit)",
        )


if __name__ == "__main__":
    sys.exit(main())
