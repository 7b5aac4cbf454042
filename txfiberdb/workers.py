# -*- test-case-name: tests.test_workers -*-
"""
Several worker processes of one twistd plugin on one listening socket.

One Twisted process uses one core.  ``twistd -n myplugin --workers 4`` runs a
*supervisor* that binds the address once and starts four ordinary
``twistd -n myplugin`` processes that serve it.  The supervisor serves
nothing itself: it starts the workers, replaces one that dies (after a delay
that doubles while they keep dying quickly; when the first ones cannot start
at all it gives up and exits 1), and on SIGTERM passes the signal on and
waits until every worker has drained its requests and exited.  A worker
whose supervisor vanishes (SIGKILL) notices the end of a pipe and shuts down
as on SIGTERM: nothing is left running.

How the workers share the address:

- ``tcp:``/``tcp6:``: the supervisor binds a socket with ``SO_REUSEPORT``
  and never listens on it (it holds the port, learns the number ``tcp:0``
  got, reports "address in use" once); each worker binds its own socket in
  the same ``SO_REUSEPORT`` group, listens, and hands it to Twisted with
  ``adoptStreamPort``.  The kernel spreads new connections evenly over the
  workers' sockets.  One listening socket inherited by all the workers was
  tried first and measured: every worker wakes for each connection and the
  first to run takes it (Twisted's port accepts bursts), so one worker got
  85% of the requests in bench/workers.py.
- ``unix:`` and ``systemd:``: one listening socket, bound by the supervisor
  (or passed by systemd) and inherited by the workers as a file descriptor
  (``adoptStreamPort`` again).

Not a load balancer in front (HAProxy, nginx): that is one more process per
request hop and one more thing to run; it remains the way to spread work
over several *machines*.

A plugin gets ``--workers`` with two changes::

    from txfiberdb.workers import WorkerOptions, listen, serve_workers

    class Options(WorkerOptions, usage.Options):        # adds --workers
        optParameters = [["listen", "l", "tcp:8080", "Where to listen."]]

    def makeService(options):
        return serve_workers(options, make_one_process_service)

and the one-process service listens with :func:`listen` instead of
``serverFromString(reactor, description).listen(factory)``.  In a worker
:func:`listen` adopts the inherited socket; anywhere else it does exactly
what ``serverFromString`` does.

Each worker is a separate process with its own pool: N workers open at most
N x (pool_size + max_overflow) connections to PostgreSQL (or to PgBouncer).
:func:`connection_budget` says so in one line, and compares it with the
server's ``max_connections`` when it can ask.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from collections.abc import Callable
from typing import Any, Optional

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import Factory, ProcessProtocol
from twisted.logger import Logger
from twisted.python import usage

from txfiberdb._errors import first_line

__all__ = [
    "MAX_WORKERS",
    "WorkerOptions",
    "WorkerSupervisor",
    "check_connection_budget",
    "check_shareable",
    "connection_budget",
    "listen",
    "serve_workers",
    "worker_index",
]

log = Logger(namespace="txfiberdb.workers")

#: More workers than this is a typo, not a deployment (one per core is usual).
MAX_WORKERS = 256

# The environment a worker finds (set by the supervisor, read by listen()).
_ENV_INDEX = "TXFIBERDB_WORKER"
_ENV_FD = "TXFIBERDB_WORKER_FD"
_ENV_FAMILY = "TXFIBERDB_WORKER_FAMILY"
_ENV_STATUS_FD = "TXFIBERDB_WORKER_STATUS_FD"
_ENV_ADDRESS = "TXFIBERDB_WORKER_REUSEPORT"
_LISTEN_FD = 3
_STATUS_FD = 4
_FAMILIES = {
    "inet": socket.AF_INET,
    "inet6": socket.AF_INET6,
    "unix": socket.AF_UNIX,
}
_REACTOR_NAMES = {
    "twisted.internet.epollreactor": "epoll",
    "twisted.internet.pollreactor": "poll",
    "twisted.internet.selectreactor": "select",
    "twisted.internet.asyncioreactor": "asyncio",
    "twisted.internet.kqreactor": "kqueue",
}


def _workers_count(value: str) -> int:
    """``--workers``: a whole number from 1 to :data:`MAX_WORKERS`."""
    try:
        n = int(value.strip())
    except ValueError:
        raise ValueError(
            f"--workers must be a whole number of processes (1 to "
            f"{MAX_WORKERS}), not {value!r}"
        ) from None
    if not 1 <= n <= MAX_WORKERS:
        raise ValueError(f"--workers must be from 1 to {MAX_WORKERS}, not {n}")
    return n


_workers_count.coerceDoc = f"1 to {MAX_WORKERS}."  # type: ignore[attr-defined]


class WorkerOptions(usage.Options):
    """
    A mixin for a twistd plugin's ``Options``: adds ``--workers N`` and
    remembers the plugin's own arguments, so that :func:`serve_workers` can
    start each worker with the same command line.
    """

    optParameters = [
        [
            "workers",
            None,
            1,
            "Worker processes sharing the listening socket (one per core is "
            "usual); each has its own connection pool.",
            _workers_count,
        ],
    ]

    def parseOptions(self, options: Optional[list[str]] = None) -> None:
        if options is None:
            options = sys.argv[1:]
        self.arguments = list(options)
        try:
            super().parseOptions(options)  # type: ignore[no-untyped-call]
        except usage.UsageError as e:
            # usage.Options words a failed coercion as "Parameter type
            # enforcement failed: <message>": keep only our message.
            text = str(e)
            if "--workers" in text and ": " in text:
                raise usage.UsageError(text.split(": ", 1)[1]) from None
            raise


def worker_index() -> Optional[int]:
    """This worker's number (1 to N) when run by a supervisor, else None."""
    value = os.environ.get(_ENV_INDEX)
    return int(value) if value and value.isdigit() else None


class _ParentWatch:
    """
    Reads the pipe the supervisor holds open on the worker's stdin: at its
    end (the supervisor died without stopping the worker, SIGKILL say) the
    worker shuts down as on SIGTERM, so that no orphan keeps serving.
    """

    def __init__(self, reactor: Any, fd: int) -> None:
        self.reactor = reactor
        self.fd = fd

    def fileno(self) -> int:
        return self.fd

    def logPrefix(self) -> str:
        return "supervisor-pipe"

    def doRead(self) -> Any:
        try:
            data = os.read(self.fd, 1024)
        except BlockingIOError:
            return None
        except OSError:
            data = b""
        if not data:
            from twisted.internet.main import CONNECTION_DONE

            return CONNECTION_DONE
        return None

    def connectionLost(self, reason: Any) -> None:
        # The pipe's end (read as end of file, or the poller's hang-up) is a
        # ConnectionDone; this worker's own shutdown disconnects every
        # reader with ConnectionLost: only the first means the supervisor
        # is gone.
        from twisted.internet.error import ConnectionDone

        if not reason.check(ConnectionDone):
            return
        log.warn("worker {n}: the supervisor is gone; shutting down", n=worker_index())
        if self.reactor.running:
            self.reactor.stop()


def _stop_once_on_signals(reactor: Any) -> None:
    """
    In a worker, the first SIGTERM or SIGINT stops the reactor (as Twisted's
    own handlers do) and later ones are ignored: a worker may get the
    supervisor's SIGTERM and one from its service manager (systemd's
    ``KillMode=control-group``), and Twisted's handler, called twice, logs a
    ``ReactorNotRunning`` traceback.
    """
    import signal as _signal

    if not hasattr(reactor, "sigTerm"):
        return
    seen: list[int] = []

    def handler(number: int, frame: Any) -> None:
        if seen:
            return
        seen.append(number)
        if number == _signal.SIGINT:
            reactor.sigInt(number, frame)
        else:
            reactor.sigTerm(number, frame)

    _signal.signal(_signal.SIGTERM, handler)
    _signal.signal(_signal.SIGINT, handler)


def _reuseport_socket(family: int, host: str, port: int) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def listen(reactor: Any, description: str, factory: Factory) -> Deferred[Any]:
    """
    Listen with ``factory``: in a worker started by :class:`WorkerSupervisor`
    on the socket it inherited (``description`` was already used by the
    supervisor), anywhere else on ``serverFromString(reactor, description)``.
    Returns a Deferred of the :class:`~twisted.internet.interfaces.IListeningPort`.
    """
    fd_text = os.environ.pop(_ENV_FD, "")
    address = os.environ.pop(_ENV_ADDRESS, "")
    if not fd_text and not address:
        return serverFromString(reactor, description).listen(factory)  # type: ignore[no-any-return]
    family = _FAMILIES[os.environ.get(_ENV_FAMILY, "inet")]
    if address:
        # TCP: a socket of our own in the supervisor's SO_REUSEPORT group.
        host, port_text, backlog = address.rsplit(" ", 2)
        sock = _reuseport_socket(family, host, int(port_text))
        sock.listen(int(backlog))
        sock.setblocking(False)
        port = reactor.adoptStreamPort(sock.fileno(), family, factory)
        sock.close()  # adoptStreamPort keeps a duplicate
        if fd_text:
            os.close(int(fd_text))
    else:
        port = reactor.adoptStreamPort(int(fd_text), family, factory)
        os.close(int(fd_text))  # adoptStreamPort keeps a duplicate
    watch = _ParentWatch(reactor, 0)
    reactor.addReader(watch)
    _stop_once_on_signals(reactor)
    status = os.environ.pop(_ENV_STATUS_FD, "")
    if status.isdigit():
        try:
            os.write(int(status), b"ready\n")
            os.close(int(status))
        except OSError:
            pass
    return succeed(port)


class _Worker(ProcessProtocol):
    """One worker process, seen from the supervisor."""

    transport: Any

    def __init__(self, supervisor: WorkerSupervisor, index: int) -> None:
        self.supervisor = supervisor
        self.index = index
        self.ready = False
        self.started_at = supervisor.reactor.seconds()
        self.ended: Deferred[None] = Deferred()
        self.pid: Optional[int] = None

    def connectionMade(self) -> None:
        self.pid = self.transport.pid

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD == _STATUS_FD and b"ready" in data and not self.ready:
            self.ready = True
            self.supervisor._worker_ready(self)

    def processEnded(self, reason: Any) -> None:
        self.supervisor._worker_ended(self, reason.value)
        self.ended.callback(None)


def _describe_exit(value: BaseException) -> str:
    if isinstance(value, ProcessDone):
        return "exited with status 0"
    if isinstance(value, ProcessTerminated):
        if value.signal is not None:
            try:
                name = signal.Signals(value.signal).name
            except ValueError:
                name = str(value.signal)
            return f"was killed by {name}"
        return f"exited with status {value.exitCode}"
    return str(value)


class WorkerSupervisor(MultiService):
    """
    Binds ``listen`` once and keeps ``workers`` processes running
    ``command`` (an argument list for ``sys.executable``; ``{worker}`` in it
    is replaced by the worker's number) that serve it.

    Child services (added with ``setServiceParent``) start before the
    workers and stop after them: a resource the workers share (a throwaway
    database, say) belongs there; :attr:`environ` is passed to every worker.

    :param kill_after: seconds a worker may take to exit after SIGTERM (its
        own grace period, plus a margin) before it gets SIGKILL.
    :param stable_after: a worker that exits sooner than this after its
        start is restarted after a delay that doubles each time, up to
        ``max_restart_delay``; one that ran longer is restarted at once.
    :param exit_on_failure: when the first workers cannot start at all
        (they exit before serving, and none ever served), stop and exit
        with status 1 instead of retrying: that is a configuration error.
    """

    def __init__(
        self,
        command: list[str],
        listen: str,
        workers: int,
        *,
        environ: Optional[dict[str, str]] = None,
        kill_after: float = 45.0,
        stable_after: float = 10.0,
        min_restart_delay: float = 0.5,
        max_restart_delay: float = 30.0,
        reactor: Any = None,
        exit_on_failure: bool = True,
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.command = list(command)
        self.listen = listen
        self.workers = _workers_count(str(workers))
        self.environ = dict(environ or {})
        self.kill_after = kill_after
        self.stable_after = stable_after
        self.min_restart_delay = min_restart_delay
        self.max_restart_delay = max_restart_delay
        self.exit_on_failure = exit_on_failure
        self._reactor = reactor
        self.port: Any = None
        self._reuseport: Optional[socket.socket] = None
        self._reuseport_family = "inet"
        self._backlog = 50
        self.running_workers: dict[int, _Worker] = {}
        self.restarts = 0
        #: The delay before each restart so far (seconds), oldest first.
        self.restart_delays: list[float] = []
        self._delays: dict[int, float] = {}
        self._timers: dict[int, Any] = {}
        self._ever_ready = False
        self._stopping = False
        self.ready: Deferred[None] = Deferred()

    @classmethod
    def from_options(cls, options: WorkerOptions, **kwargs: Any) -> WorkerSupervisor:
        """
        A supervisor that runs the same twistd plugin with the same
        arguments (and ``--workers 1``) in each worker: ``options`` are the
        plugin's parsed :class:`WorkerOptions` under twistd.
        """
        parent = getattr(options, "parent", None)
        plugin = getattr(parent, "subCommand", None)
        if parent is None or plugin is None:
            raise ValueError(
                "WorkerSupervisor.from_options needs the options of a plugin "
                "run by twistd; build a WorkerSupervisor(command, ...) instead"
            )
        twistd = ["--nodaemon", "--pidfile="]
        from twisted.internet import reactor

        name = _REACTOR_NAMES.get(type(reactor).__module__)
        if name:
            twistd.append(f"--reactor={name}")
        logfile = parent.get("logfile")
        if parent.get("syslog"):
            twistd.append("--syslog")
        elif not parent.get("nodaemon") or (logfile and logfile != "-"):
            # Each worker its own file: twistd rotates its log file, and
            # several processes rotating one file lose lines.
            twistd.append(f"--logfile={logfile or 'twistd.log'}.worker{{worker}}")
        command = [
            "-c",
            # A process group of its own: a Ctrl-C meant for the terminal's
            # foreground group reaches the supervisor only, which stops the
            # workers itself.
            "import os, sys; os.setpgid(0, 0); "
            "from twisted.scripts.twistd import run; "
            "sys.argv[0] = 'twistd'; run()",
            *twistd,
            plugin,
            *options.arguments,
            "--workers",
            "1",
        ]
        return cls(command, options["listen"], options["workers"], **kwargs)

    @property
    def reactor(self) -> Any:
        if self._reactor is None:
            from twisted.internet import reactor

            self._reactor = reactor
        return self._reactor

    def privilegedStartService(self) -> None:
        # Bound before twistd drops privileges: a port below 1024 works.
        self._bind_or_give_up()
        super().privilegedStartService()  # type: ignore[no-untyped-call]

    _failed = False

    def _bind_or_give_up(self) -> None:
        if self._failed:
            return
        try:
            self._bind()
        except Exception as e:
            # Expected (a port in use, a path too long, no permission): one
            # line, exit status 1.
            from twisted.internet.error import CannotListenError

            why = e.socketError if isinstance(e, CannotListenError) else e
            log.error(
                "supervisor: cannot listen on {listen}: {why}",
                listen=self.listen,
                why=getattr(why, "strerror", None) or str(why),
            )
            self._failed = True
            self._give_up()

    def _bind(self) -> None:
        if self.port is not None or self._reuseport is not None:
            return
        from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint

        check_shareable(self.listen)
        endpoint = serverFromString(self.reactor, self.listen)
        if isinstance(endpoint, (TCP4ServerEndpoint, TCP6ServerEndpoint)):
            six = isinstance(endpoint, TCP6ServerEndpoint)
            host = endpoint._interface or ("::" if six else "0.0.0.0")
            family = socket.AF_INET6 if six else socket.AF_INET
            try:
                sock = _reuseport_socket(family, host, endpoint._port)
            except OSError as e:
                raise OSError(
                    e.errno, f"--listen {self.listen!r}: cannot bind: {e.strerror}"
                ) from None
            # Bound, never listening: it holds the port (and tells the
            # workers which one tcp:0 got) but takes no connections.
            self._reuseport = sock
            self._reuseport_family = "inet6" if six else "inet"
            self._backlog = endpoint._backlog
            return
        factory = Factory()
        factory.noisy = False
        d = serverFromString(self.reactor, self.listen).listen(factory)
        result: list[Any] = []
        d.addBoth(result.append)
        if not result:
            raise ValueError(
                f"--listen {self.listen!r}: this endpoint does not listen at "
                f"once; workers need a tcp:, tcp6:, unix: or systemd: socket"
            )
        port = result[0]
        if not hasattr(port, "fileno") or not hasattr(port, "stopReading"):
            if hasattr(result[0], "raiseException"):
                result[0].raiseException()
            raise ValueError(
                f"--listen {self.listen!r}: not a socket a worker can inherit; "
                f"use a tcp:, tcp6:, unix: or systemd: endpoint"
            )
        # The supervisor never accepts: the workers do.
        port.stopReading()
        self.port = port

    @property
    def address(self) -> str:
        """Where the workers listen (for logs)."""
        if self._reuseport is not None:
            host, port = self._reuseport.getsockname()[:2]
            return f"{host}:{port} (TCP, SO_REUSEPORT)"
        return str(self.port.getHost())

    @property
    def tcp_port(self) -> Optional[int]:
        """The TCP port the workers listen on (None for a unix socket)."""
        if self._reuseport is not None:
            return int(self._reuseport.getsockname()[1])
        host = self.port.getHost() if self.port is not None else None
        return getattr(host, "port", None)

    @property
    def family(self) -> str:
        from twisted.internet.address import IPv4Address, IPv6Address

        if self._reuseport is not None:
            return self._reuseport_family
        host = self.port.getHost()
        if isinstance(host, IPv4Address):
            return "inet"
        if isinstance(host, IPv6Address):
            return "inet6"
        return "unix"

    def startService(self) -> None:
        self._bind_or_give_up()
        if self._failed:
            Service.startService(self)
            return
        super().startService()  # type: ignore[no-untyped-call]  # shared first
        log.info(
            "supervisor: {n} worker(s) sharing {host} (--listen {listen})",
            n=self.workers,
            host=self.address,
            listen=self.listen,
        )
        for i in range(1, self.workers + 1):
            self._spawn(i)

    def _spawn(self, index: int) -> None:
        self._timers.pop(index, None)
        if self._stopping:
            return
        env = dict(os.environ)
        env.update(self.environ)
        env.update(
            {
                _ENV_INDEX: str(index),
                _ENV_FAMILY: self.family,
                _ENV_STATUS_FD: str(_STATUS_FD),
                "PYTHONPATH": os.pathsep.join(p or os.getcwd() for p in sys.path),
            }
        )
        child_fds: dict[int, Any] = {0: "w", 1: 1, 2: 2, _STATUS_FD: "r"}
        if self._reuseport is not None:
            host, port = self._reuseport.getsockname()[:2]
            env[_ENV_ADDRESS] = f"{host} {port} {self._backlog}"
        else:
            env[_ENV_FD] = str(_LISTEN_FD)
            child_fds[_LISTEN_FD] = self.port.fileno()
        worker = _Worker(self, index)
        self.reactor.spawnProcess(
            worker,
            sys.executable,
            [
                sys.executable,
                *(a.replace("{worker}", str(index)) for a in self.command),
            ],
            env=env,
            childFDs=child_fds,
        )
        self.running_workers[index] = worker
        log.info("worker {i} started (pid {pid})", i=index, pid=worker.pid)

    def _worker_ready(self, worker: _Worker) -> None:
        self._ever_ready = True
        if (
            not self.ready.called
            and len([w for w in self.running_workers.values() if w.ready])
            == self.workers
        ):
            log.info("supervisor: all {n} workers serving", n=self.workers)
            self.ready.callback(None)

    def _worker_ended(self, worker: _Worker, value: BaseException) -> None:
        if self.running_workers.get(worker.index) is worker:
            del self.running_workers[worker.index]
        how = _describe_exit(value)
        if self._stopping:
            log.info(
                "worker {i} (pid {pid}) {how}", i=worker.index, pid=worker.pid, how=how
            )
            return
        if not worker.ready and not self._ever_ready and self.exit_on_failure:
            log.error(
                "worker {i} (pid {pid}) {how} before serving (see its log "
                "above); giving up: stopping",
                i=worker.index,
                pid=worker.pid,
                how=how,
            )
            self._give_up()
            return
        lived = self.reactor.seconds() - worker.started_at
        if lived >= self.stable_after:
            delay = 0.0
            self._delays.pop(worker.index, None)
        else:
            delay = self._delays.get(worker.index, self.min_restart_delay / 2) * 2
            delay = min(max(delay, self.min_restart_delay), self.max_restart_delay)
            self._delays[worker.index] = delay
        self.restarts += 1
        self.restart_delays.append(delay)
        log.warn(
            "worker {i} (pid {pid}) {how}; starting another in {delay}s",
            i=worker.index,
            pid=worker.pid,
            how=how,
            delay=round(delay, 2),
        )
        self._timers[worker.index] = self.reactor.callLater(
            delay, self._spawn, worker.index
        )

    def _give_up(self) -> None:
        if not self.ready.called:
            self.ready.errback(RuntimeError("the workers could not start"))
            self.ready.addErrback(lambda _: None)
        self.reactor.addSystemEventTrigger("after", "shutdown", os._exit, 1)
        if self.reactor.running:
            self.reactor.stop()
        else:
            self.reactor.callWhenRunning(self.reactor.stop)

    def stopService(self) -> Deferred[Any]:
        """
        SIGTERM to every worker, then wait until all have exited (SIGKILL
        after ``kill_after``); then the child services stop.
        """
        self._stopping = True
        for timer in self._timers.values():
            if timer.active():
                timer.cancel()
        self._timers.clear()
        workers = list(self.running_workers.values())
        if workers:
            log.info(
                "supervisor: stopping {n} worker(s); they drain their requests",
                n=len(workers),
            )
        killers = []
        for w in workers:
            try:
                w.transport.signalProcess("TERM")
            except Exception:
                pass
            killers.append(self.reactor.callLater(self.kill_after, self._kill, w))

        def all_ended(_: Any) -> Any:
            for k in killers:
                if k.active():
                    k.cancel()
            port, self.port = self.port, None
            if port is not None:
                port.stopListening()
            sock, self._reuseport = self._reuseport, None
            if sock is not None:
                sock.close()
            return MultiService.stopService(self)

        d = DeferredList([w.ended for w in workers])
        d.addCallback(all_ended)
        return d

    def _kill(self, worker: _Worker) -> None:
        log.error(
            "worker {i} (pid {pid}) still running {s}s after SIGTERM: SIGKILL",
            i=worker.index,
            pid=worker.pid,
            s=self.kill_after,
        )
        try:
            worker.transport.signalProcess("KILL")
        except Exception:
            pass


def check_shareable(description: str) -> None:
    """
    Raise ValueError (saying what to use instead) unless ``description`` is
    an endpoint the workers can share: ``tcp:``, ``tcp6:``, ``unix:`` or
    ``systemd:``.  Others are refused, not passed on half-done: workers
    adopting an ``ssl:`` socket would serve it without TLS.
    """
    from twisted.internet.endpoints import (
        AdoptedStreamServerEndpoint,
        TCP4ServerEndpoint,
        TCP6ServerEndpoint,
        UNIXServerEndpoint,
    )

    # Parsing only: the placeholder reactor is stored, not used.
    endpoint = serverFromString(object(), description)
    kinds = (
        TCP4ServerEndpoint,
        TCP6ServerEndpoint,
        UNIXServerEndpoint,
        AdoptedStreamServerEndpoint,
    )
    if not isinstance(endpoint, kinds):
        raise ValueError(
            f"{description!r} cannot be shared by worker processes: use a tcp:, "
            f"tcp6:, unix: or systemd: endpoint (for TLS, terminate it in front "
            f"of the workers, or run one process)"
        )


def serve_workers(
    options: WorkerOptions,
    make_service: Callable[[Any], Service],
    **supervisor_kwargs: Any,
) -> Service:
    """
    ``make_service(options)`` when one process is asked for (or in a
    worker), else a :class:`WorkerSupervisor` running ``--workers`` copies of
    this twistd plugin.
    """
    if options["workers"] <= 1 or worker_index() is not None:
        return make_service(options)
    return WorkerSupervisor.from_options(options, **supervisor_kwargs)


def connection_budget(
    workers: int,
    pool_size: int,
    max_overflow: int,
    max_connections: Optional[int] = None,
    reserved: int = 0,
) -> tuple[Optional[int], str]:
    """
    The most connections ``workers`` processes with these pool settings
    open, and a line saying so (and whether the server's
    ``max_connections`` less its reserved slots allows it).  ``max_overflow
    = -1`` (no limit) has no bound: the total is None.
    """
    if max_overflow < 0:
        return None, (
            f"{workers} worker(s) x pool_size {pool_size} with no max_overflow "
            f"limit: connections to the database are unbounded"
        )
    per = pool_size + max_overflow
    total = workers * per
    line = (
        f"{workers} worker(s) x (pool_size {pool_size} + max_overflow "
        f"{max_overflow}) = at most {total} database connections"
    )
    if max_connections is not None:
        room = max_connections - reserved
        if total > room:
            line += (
                f": MORE than the server allows ({max_connections} "
                f"max_connections, {reserved} reserved): lower --pool-size / "
                f"--max-overflow / --workers, raise max_connections, or put "
                f"PgBouncer in front"
            )
        else:
            line += f" (the server allows {room})"
    return total, line


def check_connection_budget(
    url: str, workers: int, pool_size: int, max_overflow: int
) -> Deferred[Optional[int]]:
    """
    Log :func:`connection_budget` against the server's ``max_connections``
    (asked over one short-lived connection, in a fiber); a warning when the
    workers could open more than it allows.  Fires with the total (None when
    unbounded); never fails: a server that cannot be asked is logged in one
    line and the bound is stated alone.  Behind PgBouncer the server's
    figure says nothing about PgBouncer's ``max_client_conn``: compare
    those yourself.
    """
    from txfiberdb.fiber import run_in_fiber

    def ask() -> tuple[int, int]:
        from sqlalchemy import create_engine, text
        from sqlalchemy.pool import NullPool

        engine = create_engine(url, poolclass=NullPool)
        try:
            with engine.connect() as conn:
                return (
                    int(conn.scalar(text("SHOW max_connections"))),
                    int(conn.scalar(text("SHOW superuser_reserved_connections"))),
                )
        finally:
            engine.dispose()

    def report(result: Any) -> Optional[int]:
        if isinstance(result, tuple):
            total, line = connection_budget(
                workers, pool_size, max_overflow, result[0], result[1]
            )
            if total is not None and total > result[0] - result[1]:
                log.warn("{line}", line=line)
            else:
                log.info("{line}", line=line)
            return total
        total, line = connection_budget(workers, pool_size, max_overflow)
        log.info(
            "{line} (the server's max_connections could not be read: {why})",
            line=line,
            why=first_line(result.value),
        )
        return total

    return run_in_fiber(ask).addBoth(report)
