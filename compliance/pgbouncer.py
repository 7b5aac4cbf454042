"""
SQLAlchemy's compliance suite through a real PgBouncer in transaction mode:
both drivers (postgresql+txpostgres and the psycopg2 reference) reach the
throwaway PostgreSQL through one :class:`txfiberdb.testing.TemporaryPgBouncer`.

    python compliance/pgbouncer.py [extra pytest args]

It prepares the server as pg_server.py does, starts PgBouncer in front of
it, points ``COMPLIANCE_URL_*`` at PgBouncer and runs ``run.sh``; the exit
status is run.sh's.  The result and the tests that need session state are
listed in doc/howto/deployment.md.
"""

from __future__ import annotations

import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from pg_server import DRIVERS, prepare  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402

from txfiberdb.testing import TemporaryPgBouncer, TemporaryPostgres  # noqa: E402


def main(argv: list[str]) -> int:
    with TemporaryPostgres() as pg:
        env = dict(os.environ)
        env.update(prepare(pg.dsn()))
        with TemporaryPgBouncer(pg.host, pg.port, default_pool_size=10) as bouncer:
            for driver in DRIVERS:
                key = f"COMPLIANCE_URL_{driver.upper()}"
                url = make_url(env[key]).set(host=bouncer.host, port=bouncer.port)
                env[key] = url.render_as_string(hide_password=False)
            print(
                f"compliance through PgBouncer {bouncer.host}:{bouncer.port} "
                f"(transaction mode) in front of PostgreSQL {pg.port}",
                flush=True,
            )
            return subprocess.call(
                ["bash", os.path.join(HERE, "run.sh"), *argv], env=env
            )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
