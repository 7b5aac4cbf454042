# -*- test-case-name: tests.test_live -*-
"""
The shop goes live: changes are announced with NOTIFY in the transaction
that makes them, and ``GET /events`` streams them to browsers as Server-Sent
Events; ``GET /`` is a page that shows them.

Channels and payloads (JSON, small: PostgreSQL takes at most 8,000 bytes):

- ``stock``: a product's current state, ``{"id", "sku", "name", "stock",
  "price_cents"}``, or ``{"id", "deleted": true}``.  Absolute values, not
  deltas: applying one twice, or after a snapshot that has it already, is
  harmless.
- ``orders``: ``{"id", "total_cents", "lines": [{"product_id", "quantity"}]}``
  (no customer data: anybody who opens the page sees it).

Announcing in the same transaction is what makes it right: PostgreSQL sends
the notifications at COMMIT, in commit order, and never for a transaction
that rolls back (an order refused for lack of stock announces nothing).

``GET /events``:

- one fiber per stream, parked on :func:`txfiberdb.listen` (one LISTEN
  connection for the whole process), holding no pool connection while it
  waits;
- first a ``snapshot`` event (the products with their stock), then
  ``stock`` and ``orders`` events as they are committed, each with an
  ``id:`` (``<epoch>-<seq>``: the listener connection's token and the
  notification's position);
- on reconnection the browser sends ``Last-Event-ID``: if nothing was
  received since (same listener connection, same position) the snapshot is
  skipped, else it is sent again (the events in between are not kept, so a
  snapshot is how the client catches up); a gap in the listener's stream
  (the database connection dropped, or this client fell behind) sends a new
  snapshot too;
- a comment every ``heartbeat`` seconds keeps proxies from closing it;
- a client that leaves cancels its fiber: the subscription closes, nothing
  is left behind; the service stopping ends every stream at once.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Optional

from klein import Klein
from sqlalchemy import select, text
from sqlalchemy.orm import Session
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from klein_demo.models import Order, Product
from klein_demo.page import INDEX_HTML
from txfiberdb import (
    ListenerClosed,
    Missed,
    await_deferred,
    fiber_stats,
    listen,
    listener_stats,
    pool_stats,
)
from txfiberdb.klein import ClientStalled, EventStream, FiberRoutes, RouteBusy
from txfiberdb.service import EngineService, ServiceStopping

__all__ = [
    "ORDERS",
    "STOCK",
    "add_live_routes",
    "announce_deleted",
    "announce_order",
    "announce_stock",
]

log = Logger(namespace="klein_demo.live")

STOCK = "stock"
ORDERS = "orders"
#: Products in a snapshot (the page's table), in id order.
SNAPSHOT_LIMIT = 500


def _notify_all(session: Session, channel: str, payloads: list[str]) -> None:
    """``pg_notify(channel, p)`` for each payload, in one statement."""
    if payloads:
        session.execute(
            text(
                "SELECT pg_notify(:channel, p) "
                "FROM unnest(CAST(:payloads AS text[])) WITH ORDINALITY AS t(p, n) "
                "ORDER BY n"
            ),
            {"channel": channel, "payloads": payloads},
        )


def stock_json(p: Product) -> dict[str, Any]:
    return {
        "id": p.id,
        "sku": p.sku,
        "name": p.name,
        "stock": p.stock,
        "price_cents": p.price_cents,
    }


def announce_stock(session: Session, products: list[Product]) -> None:
    """Announce these products' state at this transaction's COMMIT."""
    session.flush()
    _notify_all(
        session,
        STOCK,
        [json.dumps(stock_json(p)) for p in sorted(products, key=lambda p: p.id)],
    )


def announce_deleted(session: Session, product_id: int) -> None:
    _notify_all(session, STOCK, [json.dumps({"id": product_id, "deleted": True})])


def announce_order(session: Session, order: Order) -> None:
    """Announce a new order (no customer data) at COMMIT."""
    payload = {
        "id": order.id,
        "total_cents": order.total_cents,
        "lines": [
            {"product_id": line.product_id, "quantity": line.quantity}
            for line in order.lines
        ],
    }
    _notify_all(session, ORDERS, [json.dumps(payload)])


class SnapshotCache:
    """
    The last snapshot, shared by the streams that start at the same position
    of the listener's stream (after a restart every browser reconnects at
    once: one query then, not one per browser).  Correct because every
    change of the products is announced: at an unchanged position (no
    notification since), a snapshot read then is still current, or the
    change that makes it stale is still to be delivered to a stream that
    has subscribed already.  Streams that ask while one is being read wait
    for it.
    """

    def __init__(self, load: Callable[[], str]) -> None:
        self.load = load
        self.position: Optional[str] = None
        self.data: Optional[str] = None
        self._loading: Optional[tuple[str, list[Deferred[Optional[str]]]]] = None

    def get(self, position: str) -> str:
        """The snapshot for ``position`` (an event id), read if needed."""
        if self.position == position and self.data is not None:
            return self.data
        loading = self._loading
        if loading is not None and loading[0] == position:
            d: Deferred[Optional[str]] = Deferred()
            loading[1].append(d)
            shared = await_deferred(d)
            if shared is not None:
                return shared
            return self.load()  # the shared read failed: try on our own
        waiters: list[Deferred[Optional[str]]] = []
        self._loading = (position, waiters)
        data: Optional[str] = None
        try:
            data = self.load()
            self.position, self.data = position, data
            return data
        finally:
            if self._loading is not None and self._loading[1] is waiters:
                self._loading = None
            for w in waiters:
                w.callback(data)


def event_id(epoch: str, seq: int) -> str:
    return f"{epoch}-{seq}"


def add_live_routes(
    app: Klein,
    routes: FiberRoutes,
    db: EngineService,
    heartbeat: float = 15.0,
    max_queued: int = 1000,
    max_streams: int = 10_000,
) -> None:
    """
    ``GET /events`` (the stream), ``GET /live`` (the page; ``GET /`` serves
    it too) and ``GET /stats`` (pool, fiber and listener figures as JSON).

    :param max_streams: streams open at once; more get a 503 with
        ``Retry-After`` (each holds a socket and about 25 KiB).
    """
    open_streams = [0]

    def load_snapshot() -> str:
        assert db.sessionmaker is not None
        with db.sessionmaker() as session:
            # Core rows, not ORM objects: a snapshot is read-only JSON.
            rows = session.execute(
                select(
                    Product.id,
                    Product.sku,
                    Product.name,
                    Product.stock,
                    Product.price_cents,
                )
                .order_by(Product.id)
                .limit(SNAPSHOT_LIMIT)
            ).all()
        return json.dumps(
            {"products": [row._asdict() for row in rows], "limit": SNAPSHOT_LIMIT}
        )

    snapshots = SnapshotCache(load_snapshot)

    @routes.route("/events", methods=["GET"], session=False)
    def events(request: Any) -> Any:
        if open_streams[0] >= max_streams:
            raise RouteBusy("too many live streams open, try again later")
        open_streams[0] += 1
        try:
            return stream_events(request)
        except ListenerClosed:
            # Closed while subscribing: the service is stopping.
            raise ServiceStopping("the service is stopping") from None
        finally:
            open_streams[0] -= 1

    def stream_events(request: Any) -> Any:
        # Subscribe first, then read the snapshot: whatever commits after
        # the snapshot's query started is queued for this stream meanwhile.
        # Both before the first byte goes out, so that a database outage is
        # an ordinary 503, not a broken stream.
        with listen(db, STOCK, ORDERS, max_queued=max_queued) as notes:
            listener = notes.listener
            position = event_id(listener.epoch, listener.seq)
            resume = EventStream.last_event_id_of(request) == position
            snapshot = None if resume else snapshots.get(position)
            with EventStream(request, retry=2000, heartbeat=heartbeat) as stream:
                if snapshot is not None:
                    stream.send(snapshot, event="snapshot", id=position)
                    snapshot = None  # not kept for the stream's life
                # Ends when the service stops (the listener closes); the
                # client leaving cancels the fiber here.
                for note in notes:
                    position = event_id(note.epoch, note.seq)
                    if isinstance(note, Missed):
                        # A gap (reconnected, or this client fell behind).
                        try:
                            snapshot = snapshots.get(position)
                        except Exception as e:
                            # The database is away: end the stream; the
                            # browser reconnects and resyncs.
                            log.warn(
                                "event stream ended: no snapshot after a gap ({error})",
                                error=type(e).__name__,
                            )
                            return None
                        stream.send(snapshot, event="snapshot", id=position)
                        snapshot = None
                    else:
                        try:
                            stream.send(note.payload, event=note.channel, id=position)
                        except ClientStalled:
                            return None
                return None

    @routes.route("/stats", methods=["GET"], session=False)
    def stats(request: Any) -> Any:
        request.setHeader(b"cache-control", b"no-store")
        pool = pool_stats(db.engine) if db.engine is not None else {}
        return {
            "pool": {
                k: pool.get(k)
                for k in ("size", "open", "checked_out", "idle", "overflow", "waiting")
            },
            "fibers": dict(fiber_stats()),
            "listener": listener_stats(db),
            "inflight": db.inflight,
        }

    @app.route("/live", methods=["GET"])
    def live(request: Any) -> Any:
        return live_page(request)


def live_page(request: Any) -> bytes:
    """The live page (static HTML; the data comes from /events and /stats)."""
    request.setHeader(b"content-type", b"text/html; charset=utf-8")
    request.setHeader(b"cache-control", b"no-cache")
    request.setHeader(
        b"content-security-policy",
        b"default-src 'none'; script-src 'unsafe-inline'; "
        b"style-src 'unsafe-inline'; connect-src 'self'",
    )
    return INDEX_HTML.encode("utf-8")


def wants_json(request: Any) -> bool:
    """Whether the client asked for JSON rather than a page (``Accept``)."""
    accept = (request.getHeader(b"accept") or b"").decode("latin-1").lower()
    if not accept:
        return False
    html = _quality(accept, ("text/html", "application/xhtml+xml"))
    as_json = _quality(accept, ("application/json",))
    return as_json > 0 and as_json >= html


def _quality(accept: str, types: tuple[str, ...]) -> float:
    best = 0.0
    for item in accept.split(","):
        parts = [p.strip() for p in item.split(";")]
        if parts[0] not in types:
            continue
        q: Optional[float] = 1.0
        for param in parts[1:]:
            if param.startswith("q="):
                try:
                    q = float(param[2:])
                except ValueError:
                    q = 0.0
        best = max(best, q or 0.0)
    return best
