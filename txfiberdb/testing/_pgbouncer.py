# -*- test-case-name: tests.test_pgbouncer -*-
"""
A throwaway PgBouncer in front of a PostgreSQL server: for tests, and for the
local topology (``scripts/topology``).

It runs Debian's (or any) ``pgbouncer`` binary in the foreground, in a
temporary directory, on a free loopback port, with every database of the
server behind it (``* = host=... port=...``), trusting the users named in
``users`` (the server itself trusts loopback: see
:class:`~txfiberdb.testing.TemporaryPostgres`).  PgBouncer refuses to run as
root: as root it runs as ``nobody`` (``$TXFIBERDB_PG_USER`` to choose
another), as the throwaway PostgreSQL does.

>>> with TemporaryPgBouncer("127.0.0.1", 5432) as bouncer:  # doctest: +SKIP
...     engine = create_engine(bouncer.url("shop"))
"""

from __future__ import annotations

import atexit
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from typing import Optional

__all__ = ["PgBouncerUnavailable", "TemporaryPgBouncer", "find_pgbouncer"]


class PgBouncerUnavailable(RuntimeError):
    """No ``pgbouncer`` binary, or it would not start."""


def find_pgbouncer() -> str:
    """
    The ``pgbouncer`` executable: ``$TXFIBERDB_PGBOUNCER``, else ``pgbouncer``
    on ``PATH`` or in ``/usr/sbin``.

    :raise PgBouncerUnavailable: when there is none, saying how to get it.
    """
    candidates = [os.environ.get("TXFIBERDB_PGBOUNCER") or "", "pgbouncer"]
    for name in candidates:
        if not name:
            continue
        found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin")
        if found:
            return found
    raise PgBouncerUnavailable(
        "pgbouncer not found (looked at $TXFIBERDB_PGBOUNCER, PATH and "
        "/usr/sbin): install it ('apt-get install pgbouncer' on Debian)"
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class TemporaryPgBouncer:
    """
    PgBouncer in ``pool_mode`` (transaction by default) in front of the
    server at ``server_host``:``server_port``.

    :param default_pool_size: server connections per (database, user).
    :param max_client_conn: client connections PgBouncer accepts.
    :param settings: more ``[pgbouncer]`` settings (strings).
    """

    host = "127.0.0.1"

    def __init__(
        self,
        server_host: str,
        server_port: int,
        pool_mode: str = "transaction",
        default_pool_size: int = 20,
        max_client_conn: int = 1000,
        users: tuple[str, ...] = ("postgres",),
        settings: Optional[dict[str, str]] = None,
        port: Optional[int] = None,
    ) -> None:
        if pool_mode not in ("session", "transaction", "statement"):
            raise ValueError(
                f"pool_mode must be session, transaction or statement, "
                f"not {pool_mode!r}"
            )
        self.server_host = server_host
        self.server_port = server_port
        self.pool_mode = pool_mode
        self.default_pool_size = default_pool_size
        self.max_client_conn = max_client_conn
        self.users = users
        self.settings = dict(settings or {})
        self.port = port
        self.directory: Optional[str] = None
        self.process: Optional[subprocess.Popen[bytes]] = None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def dsn(self, dbname: str = "postgres", user: str = "postgres") -> str:
        """A libpq connection string for ``dbname`` through PgBouncer."""
        return f"host={self.host} port={self.port} user={user} dbname={dbname}"

    def url(self, dbname: str = "postgres", driver: str = "txpostgres") -> str:
        """A SQLAlchemy URL for ``dbname`` through PgBouncer."""
        return f"postgresql+{driver}://{self.users[0]}@{self.host}:{self.port}/{dbname}"

    def _config(self, port: int) -> str:
        assert self.directory is not None
        d = self.directory
        settings = {
            "listen_addr": self.host,
            "listen_port": str(port),
            "unix_socket_dir": d,
            "auth_type": "trust",
            "auth_file": os.path.join(d, "users.txt"),
            "admin_users": self.users[0],
            "pool_mode": self.pool_mode,
            "default_pool_size": str(self.default_pool_size),
            "max_client_conn": str(self.max_client_conn),
            "logfile": os.path.join(d, "pgbouncer.log"),
            "pidfile": os.path.join(d, "pgbouncer.pid"),
            # Sent by some clients in the start-up packet; PgBouncer refuses
            # unknown ones unless told to ignore them.
            "ignore_startup_parameters": "extra_float_digits,options",
            "server_login_retry": "1",
        }
        settings.update(self.settings)
        lines = [
            "[databases]",
            f"* = host={self.server_host} port={self.server_port}",
            "",
            "[pgbouncer]",
            *(f"{k} = {v}" for k, v in settings.items()),
            "",
        ]
        return "\n".join(lines)

    def start(self) -> TemporaryPgBouncer:
        """Write the configuration and start PgBouncer; return ``self``."""
        if self.running:
            return self
        exe = find_pgbouncer()
        self.directory = tempfile.mkdtemp(prefix="txfiberdb-pgbouncer-")
        run_as = None
        if os.geteuid() == 0:
            run_as = os.environ.get("TXFIBERDB_PG_USER", "nobody")
            try:
                entry = pwd.getpwnam(run_as)
            except KeyError:
                self._remove()
                raise PgBouncerUnavailable(
                    f"running as root, and PgBouncer refuses root; the user "
                    f"{run_as!r} to run it as does not exist (set "
                    f"TXFIBERDB_PG_USER to an unprivileged user)"
                ) from None
            os.chown(self.directory, entry.pw_uid, entry.pw_gid)
        atexit.register(self.stop)
        with open(os.path.join(self.directory, "users.txt"), "w") as f:
            f.writelines(f'"{u}" ""\n' for u in self.users)
        last = ""
        for _attempt in range(5):
            port = self.port or _free_port()
            config = os.path.join(self.directory, "pgbouncer.ini")
            with open(config, "w") as f:
                f.write(self._config(port))
            args = [exe, config]
            if run_as:
                args[1:1] = ["-u", run_as]
            self.process = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                cwd=self.directory,
                # Its own session: a Ctrl-C meant for the caller's terminal
                # does not cut PgBouncer from under the caller's clean-up.
                start_new_session=True,
            )
            if self._wait_listening(port):
                self.port = port
                return self
            last = self.log_tail()
            self._terminate()
            if self.port:
                break
        self.stop()
        raise PgBouncerUnavailable(f"pgbouncer did not start:\n{last}")

    def _wait_listening(self, port: int, timeout: float = 30.0) -> bool:
        # Set-up, before anything is served: a blocking wait is fine here.
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                return False
            try:
                with socket.create_connection((self.host, port), timeout=1):
                    return True
            except OSError:
                time.sleep(0.05)
        return False

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of PgBouncer's log (for error messages)."""
        try:
            with open(os.path.join(self.directory or "", "pgbouncer.log")) as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    def _terminate(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def stop(self) -> None:
        """Stop PgBouncer (clients are cut) and remove its directory.  Idempotent."""
        self._terminate()
        self._remove()
        atexit.unregister(self.stop)

    def _remove(self) -> None:
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None

    def __enter__(self) -> TemporaryPgBouncer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
