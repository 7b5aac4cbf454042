"""
txfiberdb: plain synchronous SQLAlchemy inside Twisted, one greenlet (a
*fiber*) per unit of work, PostgreSQL through txpostgres.  No callbacks, no
threads.
"""

from txfiberdb.blocking import run_blocking
from txfiberdb.fiber import (
    NotInFiberError,
    WaitTimeout,
    await_deferred,
    current_fiber,
    fibered,
    in_fiber,
    on_fiber_exit,
    run_in_fiber,
    shield,
    sleep,
)
from txfiberdb.fiber import stats as fiber_stats
from txfiberdb.notify import (
    ListenerClosed,
    Missed,
    Notification,
    Subscription,
    listen,
    listener_stats,
)
from txfiberdb.orm import fiber_scope, fiber_scoped_session
from txfiberdb.pool import FiberQueuePool, pool_stats
from txfiberdb.replicas import ReplicaRouter, RoutingSession

__version__ = "0.1.0.dev0"

__all__ = [
    "FiberQueuePool",
    "ListenerClosed",
    "Missed",
    "NotInFiberError",
    "Notification",
    "Subscription",
    "ReplicaRouter",
    "RoutingSession",
    "WaitTimeout",
    "await_deferred",
    "current_fiber",
    "fiber_scope",
    "fiber_scoped_session",
    "fiber_stats",
    "fibered",
    "in_fiber",
    "listen",
    "listener_stats",
    "on_fiber_exit",
    "pool_stats",
    "run_blocking",
    "run_in_fiber",
    "shield",
    "sleep",
]
