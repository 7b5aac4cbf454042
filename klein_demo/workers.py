# -*- test-case-name: tests.test_workers -*-
"""
``twistd -n klein-demo --workers N``: the supervisor side of the demo.

The library's :class:`txfiberdb.workers.WorkerSupervisor` does the work
(one socket, N workers, restarts, drain on SIGTERM); the demo adds what is
its own: with no ``--dsn`` one throwaway PostgreSQL for all the workers
(started before them, handed to them as ``$DATABASE_URL``, removed once
after the last has exited), and the connection bound stated at start.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.logger import Logger

from txfiberdb.workers import WorkerSupervisor, check_connection_budget

__all__ = ["SharedPostgres", "make_supervisor"]

log = Logger(namespace="klein_demo")


class SharedPostgres(Service):
    """
    A throwaway PostgreSQL shared by the workers: a child service of the
    supervisor, so it starts before the workers and stops after them.
    """

    def __init__(self, supervisor: WorkerSupervisor) -> None:
        self.supervisor = supervisor
        self.postgres: Any = None

    def startService(self) -> None:
        from txfiberdb.testing import TemporaryPostgres

        log.info(
            "no --dsn: starting one throwaway PostgreSQL server for all the "
            "workers (this blocks for a second or two)"
        )
        self.postgres = TemporaryPostgres().start()
        url = self.postgres.url()
        self.supervisor.environ["DATABASE_URL"] = url
        log.info(
            "throwaway PostgreSQL running in {dir} at {url}; it is removed "
            "once every worker has exited",
            dir=self.postgres.directory,
            url=url,
        )
        super().startService()

    def stopService(self) -> None:
        super().stopService()
        if self.postgres is not None:
            self.postgres.stop()
            self.postgres = None
            log.info("throwaway PostgreSQL stopped and removed")


def make_supervisor(options: Any) -> WorkerSupervisor:
    """The supervisor for ``options["workers"]`` shop workers."""
    supervisor = WorkerSupervisor.from_options(
        options,
        # A worker's own drain: the grace period, then up to 10 s for the
        # cancelled work, then a margin.
        kill_after=options["grace-period"] + 15.0,
    )
    log.info(
        "each worker: pool_size {size}, max_overflow {overflow}",
        size=options["pool-size"],
        overflow=options["max-overflow"],
    )
    if options["url"] is None:
        SharedPostgres(supervisor).setServiceParent(supervisor)
        # The workers see the server as $DATABASE_URL: ask them for the
        # sample data the embedded default always has.
        supervisor.command.append("--sample-data")
    supervisor.addService(_Budget(supervisor, options))
    return supervisor


class _Budget(Service):
    """States the connection bound (checked against max_connections) at start."""

    def __init__(self, supervisor: WorkerSupervisor, options: Any) -> None:
        self.supervisor = supervisor
        self.options = options

    def startService(self) -> None:
        super().startService()
        url = self.options["url"] or self.supervisor.environ.get("DATABASE_URL")
        check_connection_budget(
            url,
            self.supervisor.workers,
            self.options["pool-size"],
            self.options["max-overflow"],
        )
