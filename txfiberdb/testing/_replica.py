# -*- test-case-name: tests.test_replicas -*-
"""
A throwaway streaming replica of a :class:`TemporaryPostgres`: for tests of
read routing, and for the local topology.

``pg_basebackup -R`` copies the primary (over the replication protocol, as a
real standby is made) into a temporary directory and writes the standby
settings; the replica then runs on a port of its own and follows the
primary's WAL (``wal_level=replica``, PostgreSQL's default).
:meth:`~TemporaryPostgres.stop_server` / :meth:`~TemporaryPostgres.start_server`
take it away and bring it back, for fail-over drills.
"""

from __future__ import annotations

import time

from txfiberdb.testing._postgres import PostgresUnavailable, TemporaryPostgres

__all__ = ["TemporaryReplica"]


class TemporaryReplica(TemporaryPostgres):
    """A hot standby of ``primary`` (which must be running)."""

    def __init__(self, primary: TemporaryPostgres) -> None:
        super().__init__(bindir=primary.bindir, settings=dict(primary.settings))
        self.primary = primary

    def _initialise(self) -> None:
        assert self.primary.port is not None, "start the primary first"
        self._run(
            [
                "pg_basebackup",
                "-D",
                self.datadir,
                "-h",
                self.primary.host,
                "-p",
                str(self.primary.port),
                "-U",
                self.primary.user,
                "-R",
                "-X",
                "stream",
                "--no-sync",
            ]
        )

    def wait_for(self, lsn_source: TemporaryPostgres, timeout: float = 30.0) -> None:
        """
        Block until this replica has replayed everything ``lsn_source`` (the
        primary) has written so far.  For test set-up, not for a fiber.
        """
        import psycopg2

        primary = psycopg2.connect(lsn_source.dsn())
        primary.autocommit = True
        replica = psycopg2.connect(self.dsn())
        replica.autocommit = True
        try:
            with primary.cursor() as cur:
                cur.execute("SELECT pg_current_wal_insert_lsn()")
                target = cur.fetchone()[0]
            deadline = time.monotonic() + timeout
            while True:
                with replica.cursor() as cur:
                    cur.execute(
                        "SELECT pg_wal_lsn_diff(pg_last_wal_replay_lsn(), %s) >= 0",
                        (target,),
                    )
                    if cur.fetchone()[0]:
                        return
                if time.monotonic() > deadline:
                    raise PostgresUnavailable(
                        f"the replica did not replay up to {target} in {timeout}s"
                    )
                time.sleep(0.02)
        finally:
            primary.close()
            replica.close()
