"""
Run a command with a PostgreSQL server prepared for SQLAlchemy's compliance
suite.

    python pg_server.py -- COMMAND [ARGS...]

The server is ``$TXFIBERDB_TEST_DSN`` when set, otherwise a throwaway
:class:`txfiberdb.testing.TemporaryPostgres` (``max_prepared_transactions``
50, for the two-phase tests), stopped and removed when COMMAND ends.

On it, one fresh database per driver (``compliance_txpostgres`` and
``compliance_psycopg2``, dropped first if they exist), each holding the
schemas ``test_schema`` and ``test_schema_2`` that the suite expects (SQLAlchemy's
provisioning does not create them; its own CI creates them by hand).

COMMAND gets in its environment:

- ``COMPLIANCE_DSN``: the server's libpq DSN (database ``postgres``);
- ``COMPLIANCE_URL_TXPOSTGRES``, ``COMPLIANCE_URL_PSYCOPG2``: SQLAlchemy
  URLs of the two databases.

The exit status is COMMAND's.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import psycopg2
from psycopg2.extensions import make_dsn

from txfiberdb.testing import TemporaryPostgres, dsn_to_url

DRIVERS = ("txpostgres", "psycopg2")
SCHEMAS = ("test_schema", "test_schema_2")


def _admin(dsn: str, *statements: str) -> None:
    conn = psycopg2.connect(dsn)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            for sql in statements:
                cur.execute(sql)
    finally:
        conn.close()


def prepare(dsn: str) -> dict[str, str]:
    """Create the per-driver databases and their schemas; return the env."""
    env = {"COMPLIANCE_DSN": dsn}
    for driver in DRIVERS:
        name = f"compliance_{driver}"
        _admin(
            dsn,
            f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)',
            f'CREATE DATABASE "{name}" TEMPLATE template0 ENCODING \'UTF8\'',
        )
        db_dsn = make_dsn(dsn, dbname=name)
        _admin(db_dsn, *(f'CREATE SCHEMA "{s}"' for s in SCHEMAS))
        env[f"COMPLIANCE_URL_{driver.upper()}"] = dsn_to_url(db_dsn, driver=driver)
    return env


def main(argv: list[str]) -> int:
    if "--" not in argv:
        print(__doc__, file=sys.stderr)
        return 2
    command = argv[argv.index("--") + 1 :]
    if not command:
        print(__doc__, file=sys.stderr)
        return 2
    server = None
    dsn = os.environ.get("TXFIBERDB_TEST_DSN")
    if not dsn:
        server = TemporaryPostgres().start()
        dsn = server.dsn()
        print(f"pg_server: started a throwaway PostgreSQL: {dsn}", flush=True)
    else:
        print(f"pg_server: using $TXFIBERDB_TEST_DSN: {dsn}", flush=True)

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        env = dict(os.environ)
        env.update(prepare(dsn))
        return subprocess.call(command, env=env)
    except KeyboardInterrupt:
        return 130
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
