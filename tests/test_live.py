"""
Tests for the live shop (klein_demo.live) and txfiberdb.klein.EventStream:
NOTIFY in the order's transaction, ``GET /events`` (Server-Sent Events over
a real socket), ``Last-Event-ID``, heartbeats, clients leaving, the page and
content negotiation; and, in headless Chromium, the page updating live.
"""

import json

from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredQueue
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.trial.unittest import SynchronousTestCase

from klein_demo.live import wants_json
from txfiberdb import await_deferred, listener_stats
from txfiberdb.klein import EventStream

from .support import DatabaseTestCase
from .test_demo import ShopTestCase
from .test_klein import wait_until


class SSEClient(Protocol):
    """
    A raw HTTP/1.0 client for ``/events`` (no chunking to undo): the status,
    the headers, then each event as a dict (``event``, ``id``, ``data``);
    comment lines are counted.
    """

    def __init__(self, path, headers=None):
        self.path = path
        self.headers_out = headers or {}
        self.buffer = b""
        self.status = None
        self.headers = {}
        self.events = DeferredQueue()
        self.comments = 0
        self.done = Deferred()

    def connectionMade(self):
        lines = [f"GET {self.path} HTTP/1.0", "Host: 127.0.0.1"]
        lines += [f"{k}: {v}" for k, v in self.headers_out.items()]
        self.transport.write(("\r\n".join(lines) + "\r\n\r\n").encode())

    def dataReceived(self, data):
        self.buffer += data
        if self.status is None:
            if b"\r\n\r\n" not in self.buffer:
                return
            head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
            first, *rest = head.decode("latin-1").split("\r\n")
            self.status = int(first.split()[1])
            for line in rest:
                k, _, v = line.partition(":")
                self.headers[k.strip().lower()] = v.strip()
        while b"\n\n" in self.buffer:
            block, self.buffer = self.buffer.split(b"\n\n", 1)
            event = {"data": []}
            for line in block.decode("utf-8").split("\n"):
                if line.startswith(":"):
                    self.comments += 1
                    continue
                field, _, value = line.partition(": ")
                if field == "data":
                    event["data"].append(value)
                else:
                    event[field] = value
            if "event" in event or event["data"]:
                event["data"] = "\n".join(event["data"])
                self.events.put(event)

    def connectionLost(self, reason):
        self.done.callback(None)

    def next(self, timeout=30):
        return await_deferred(self.events.get(), timeout=timeout)

    def next_of(self, kind, timeout=30):
        while True:
            event = self.next(timeout)
            if event.get("event") == kind:
                return event


class LiveTestCase(ShopTestCase):
    def open_stream(self, last_event_id=None, path="/events"):
        headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
        port = int(self.base.rsplit(":", 1)[1])
        client = SSEClient(path, headers)
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
        await_deferred(connectProtocol(endpoint, client))

        def close():
            if client.transport.connected:
                client.transport.loseConnection()
            await_deferred(client.done)

        self.addCleanup(close)
        wait_until(lambda: client.status is not None, what="response headers")
        return client

    def order(self, product_id, quantity=1, customer_id=None):
        if customer_id is None:
            customer_id = self.new_customer()["id"]
        return self.http.post(
            "/orders",
            {
                "customer_id": customer_id,
                "lines": [{"product_id": product_id, "quantity": quantity}],
            },
        )


class EventsTests(LiveTestCase):
    def test_snapshot_then_changes(self):
        product = self.new_product(stock=10)
        stream = self.open_stream()
        self.assertEqual(stream.status, 200)
        self.assertEqual(
            stream.headers["content-type"], "text/event-stream; charset=utf-8"
        )
        self.assertIn("no-cache", stream.headers["cache-control"])
        snapshot = stream.next()
        self.assertEqual(snapshot["event"], "snapshot")
        products = {p["id"]: p for p in json.loads(snapshot["data"])["products"]}
        self.assertEqual(products[product["id"]]["stock"], 10)

        r = self.order(product["id"], 3)
        self.assertEqual(r.code, 201, r)
        stock = stream.next_of("stock")
        self.assertEqual(
            json.loads(stock["data"]),
            {
                "id": product["id"],
                "sku": product["sku"],
                "name": product["name"],
                "stock": 7,
                "price_cents": product["price_cents"],
            },
        )
        order = json.loads(stream.next_of("orders")["data"])
        self.assertEqual(order["id"], r.json["id"])
        self.assertEqual(order["lines"], [{"product_id": product["id"], "quantity": 3}])
        self.assertNotIn("customer_id", order)  # nothing personal on the page
        # Ids: the listener's epoch and an increasing position.
        epochs = {e["id"].split("-")[0] for e in (snapshot, stock)}
        self.assertEqual(len(epochs), 1)
        self.assertLess(
            int(snapshot["id"].split("-")[1]), int(stock["id"].split("-")[1])
        )

    def test_rolled_back_order_announces_nothing(self):
        product = self.new_product(stock=2)
        stream = self.open_stream()
        stream.next_of("snapshot")
        refused = self.order(product["id"], 5)  # short: 409, rolled back
        self.assertEqual(refused.code, 409, refused)
        r = self.http.request("PATCH", f"/products/{product['id']}", {"stock": 4})
        self.assertEqual(r.code, 200, r)
        first = stream.next()
        self.assertEqual(first["event"], "stock")
        self.assertEqual(json.loads(first["data"])["stock"], 4)

    def test_product_changes_and_deletes_are_announced(self):
        stream = self.open_stream()
        stream.next_of("snapshot")
        product = self.new_product(stock=5)
        self.assertEqual(
            json.loads(stream.next_of("stock")["data"])["id"], product["id"]
        )
        r = self.http.request("DELETE", f"/products/{product['id']}")
        self.assertEqual(r.code, 204)
        self.assertEqual(
            json.loads(stream.next_of("stock")["data"]),
            {"id": product["id"], "deleted": True},
        )

    def test_last_event_id(self):
        product = self.new_product(stock=50)
        keeper = self.open_stream()  # keeps the listener connection open
        keeper.next_of("snapshot")
        first = self.open_stream()
        first.next_of("snapshot")
        self.order(product["id"])
        last = first.next_of("orders")["id"]
        first.transport.loseConnection()
        await_deferred(first.done)

        # Nothing happened since: no snapshot, straight to the next change.
        again = self.open_stream(last_event_id=last)
        self.order(product["id"])
        event = again.next()
        self.assertEqual(event["event"], "stock")
        self.assertEqual(json.loads(event["data"])["stock"], 48)

        # Something happened while away: a snapshot first, with it in.
        again.transport.loseConnection()
        await_deferred(again.done)
        self.order(product["id"])
        wait_until(lambda: listener_stats(self.shop.db)["received"] >= 6)
        behind = self.open_stream(last_event_id=last)
        snap = behind.next()
        self.assertEqual(snap["event"], "snapshot")
        stocks = {p["id"]: p["stock"] for p in json.loads(snap["data"])["products"]}
        self.assertEqual(stocks[product["id"]], 47)

        # An id we never sent (another process, garbage): a snapshot.
        for bogus in ["nonsense", "x" * 300]:
            other = self.open_stream(last_event_id=bogus)
            self.assertEqual(other.next()["event"], "snapshot")

    def test_streams_starting_together_share_one_snapshot(self):
        from sqlalchemy import event

        reads = []

        def count(conn, cursor, statement, *args):
            if "FROM products ORDER BY products.id" in statement:
                reads.append(statement)

        event.listen(self.shop.db.engine, "before_cursor_execute", count)
        self.addCleanup(
            event.remove, self.shop.db.engine, "before_cursor_execute", count
        )
        keeper = self.open_stream()
        keeper.next_of("snapshot")
        self.assertEqual(len(reads), 1)
        streams = [self.open_stream() for _ in range(10)]
        snapshots = {s.next_of("snapshot")["data"] for s in streams}
        self.assertEqual(len(snapshots), 1)
        self.assertEqual(len(reads), 1)  # nothing changed: the same one
        product = self.new_product(stock=3)
        keeper.next_of("stock")
        late = self.open_stream()
        data = json.loads(late.next_of("snapshot")["data"])
        self.assertIn(product["id"], [p["id"] for p in data["products"]])
        self.assertEqual(len(reads), 2)

    def test_listener_lost_resyncs_with_a_snapshot(self):
        product = self.new_product(stock=9)
        stream = self.open_stream()
        first = stream.next_of("snapshot")
        (pid,) = self.admin(
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s "
            "AND query LIKE 'LISTEN%%'",
            (self.app_name,),
        )[0]
        self.admin("SELECT pg_terminate_backend(%s)", (pid,))
        again = stream.next()
        self.assertEqual(again["event"], "snapshot")
        self.assertNotEqual(again["id"].split("-")[0], first["id"].split("-")[0])
        self.order(product["id"], 2)
        stock = json.loads(stream.next_of("stock")["data"])
        self.assertEqual((stock["id"], stock["stock"]), (product["id"], 7))
        self.assertEqual(listener_stats(self.shop.db)["reconnects"], 1)

    def test_client_leaving_ends_its_fiber(self):
        streams = [self.open_stream() for _ in range(5)]
        for s in streams:
            s.next_of("snapshot")
        self.assertEqual(listener_stats(self.shop.db)["subscribers"], 5)
        self.assertEqual(self.shop.db.inflight, 5)
        for s in streams:
            s.transport.loseConnection()
        wait_until(lambda: self.shop.db.inflight == 0, what="stream fibers ended")
        wait_until(lambda: not listener_stats(self.shop.db)["connected"])
        self.assertEqual(self.http.get("/health").json["pool"]["checked_out"], 0)

    def test_service_stop_ends_streams(self):
        stream = self.open_stream()
        stream.next_of("snapshot")
        await_deferred(self.shop.stopService())
        await_deferred(stream.done)  # the server finished the response

    def test_database_down_is_a_503(self):
        self.shop.db.engine.dispose()
        url = self.shop.db.engine.url
        self.shop.db.engine.url = url.set(port=1)  # nobody listens there
        self.addCleanup(setattr, self.shop.db.engine, "url", url)
        stream = self.open_stream()
        self.assertEqual(stream.status, 503)


class SmallLimitsTests(LiveTestCase):
    """A shop with a short heartbeat and room for three streams."""

    app_options = {"heartbeat": 0.05, "max_streams": 3}

    def setUp(self):
        import klein_demo.tap

        original = klein_demo.tap.make_app

        def make_app(*args, **kwargs):
            kwargs.update(self.app_options)
            return original(*args, **kwargs)

        klein_demo.tap.make_app = make_app
        try:
            super().setUp()
        finally:
            klein_demo.tap.make_app = original

    def test_heartbeat_comments(self):
        stream = self.open_stream()
        stream.next_of("snapshot")
        before = stream.comments
        wait_until(lambda: stream.comments >= before + 2, what="heartbeats")
        # And events still flow between them.
        product = self.new_product()
        self.assertEqual(
            json.loads(stream.next_of("stock")["data"])["id"], product["id"]
        )

    def test_too_many_streams_is_a_503(self):
        streams = [self.open_stream() for _ in range(3)]
        for stream in streams:
            stream.next_of("snapshot")
        refused = self.open_stream()
        self.assertEqual(refused.status, 503)
        self.assertEqual(refused.headers.get("retry-after"), "1")
        streams[0].transport.loseConnection()
        wait_until(lambda: self.shop.db.inflight == 2, what="a stream gone")
        self.assertEqual(self.open_stream().status, 200)


class PageTests(LiveTestCase):
    def test_index_is_the_page(self):
        r = self.http.get("/", headers={b"accept": [b"text/html,*/*;q=0.8"]})
        self.assertEqual(r.code, 200)
        self.assertEqual(r.header("content-type"), b"text/html; charset=utf-8")
        self.assertIn(b'new EventSource("/events")', r.body)
        self.assertIn(b"default-src 'none'", r.header("content-security-policy"))
        self.assertEqual(self.http.get("/").header("content-type")[:9], b"text/html")

    def test_listener_metrics(self):
        stream = self.open_stream()
        stream.next_of("snapshot")
        from .test_demo import scrape

        got = scrape(self.http.get("/metrics").body.decode())
        self.assertEqual(got[("txfiberdb_listener_connected", ())], 1)
        self.assertEqual(got[("txfiberdb_listener_subscribers", ())], 1)
        self.assertIn(("txfiberdb_listener_notifications_total", ()), got)

    def test_stats(self):
        body = self.http.get("/stats").json
        self.assertEqual(set(body), {"pool", "fibers", "listener", "inflight"})
        self.assertIn("parked", body["fibers"])
        self.assertIn("subscribers", body["listener"])


class NegotiationTests(SynchronousTestCase):
    def accept(self, value):
        class Request:
            def getHeader(self, name):
                return value

        return wants_json(Request())

    def test_wants_json(self):
        self.assertTrue(self.accept(b"application/json"))
        self.assertTrue(self.accept(b"application/json, text/plain, */*"))
        self.assertFalse(self.accept(None))
        self.assertFalse(self.accept(b"*/*"))
        self.assertFalse(
            self.accept(b"text/html,application/xhtml+xml,application/xml;q=0.9,*/*")
        )
        self.assertFalse(self.accept(b"text/html, application/json;q=0.5"))
        self.assertFalse(self.accept(b"application/json;q=0"))
        self.assertFalse(self.accept(b"application/json;q=bad"))


class FramingTests(SynchronousTestCase):
    def test_frame(self):
        self.assertEqual(
            EventStream.frame("a\nb\r\nc\rd", event="stock", id="e1-2"),
            b"event: stock\nid: e1-2\ndata: a\ndata: b\ndata: c\ndata: d\n\n",
        )
        self.assertEqual(EventStream.frame(""), b"data: \n\n")
        self.assertEqual(EventStream.frame("é"), "data: é\n\n".encode())

    def test_bad_fields(self):
        self.assertRaises(ValueError, EventStream.frame, "x", event="a\nb")
        self.assertRaises(ValueError, EventStream.frame, "x", id="1\r2")
        self.assertRaises(ValueError, EventStream.frame, "x", id="1\x002")

    def test_last_event_id_of(self):
        class Request:
            def __init__(self, value):
                self.value = value

            def getHeader(self, name):
                assert name == b"last-event-id"
                return self.value

        self.assertEqual(EventStream.last_event_id_of(Request(b"ab-1")), "ab-1")
        self.assertIsNone(EventStream.last_event_id_of(Request(None)))
        self.assertIsNone(EventStream.last_event_id_of(Request(b"")))
        self.assertIsNone(EventStream.last_event_id_of(Request(b"\xff")))
        self.assertIsNone(EventStream.last_event_id_of(Request(b"a\x00")))
        self.assertIsNone(EventStream.last_event_id_of(Request(b"x" * 257)))


class BrowserTests(LiveTestCase):
    """The page in headless Chromium (skipped where it is not installed)."""

    def test_page_updates_live(self):
        from .browser import Browser

        browser = Browser(self)
        product = self.new_product(stock=20, name="Live <b>widget</b>")
        browser.open(self.base + "/")
        row = f"document.querySelector('#product-{product['id']} td.stock')"

        def shown_stock():
            return browser.evaluate(f"{row} && {row}.textContent")

        wait_until(lambda: shown_stock() == "20", timeout=60, what="the page's table")
        self.assertEqual(browser.evaluate("document.body.dataset.state"), "live")
        # Data is text, never markup.
        name = browser.evaluate(
            f"document.querySelector('#product-{product['id']} td.name').textContent"
        )
        self.assertEqual(name, "Live <b>widget</b>")

        r = self.order(product["id"], 3)
        self.assertEqual(r.code, 201, r)
        wait_until(lambda: shown_stock() == "17", timeout=60, what="the new stock")
        orders = browser.evaluate("document.getElementById('orders').textContent")
        self.assertIn(f"order {r.json['id']}:", orders)

        # A product created meanwhile appears without a reload.
        fresh = self.new_product(stock=4)
        fresh_row = f"document.querySelector('#product-{fresh['id']} td.stock')"
        wait_until(
            lambda: browser.evaluate(f"{fresh_row} && {fresh_row}.textContent") == "4",
            timeout=60,
            what="the new product",
        )
        # The stats come from /stats.
        wait_until(
            lambda: (
                "live streams"
                in browser.evaluate("document.getElementById('stats').textContent")
            ),
            timeout=60,
            what="the stats",
        )


class EventStreamBackPressureTests(DatabaseTestCase):
    """A client that stops reading cannot make the server buffer without end."""

    def test_stalled_client_is_dropped(self):
        from klein import Klein
        from twisted.web.server import Site

        from txfiberdb.klein import ClientStalled, FiberRoutes
        from txfiberdb.service import EngineService

        from .test_klein import HTTPServer

        service = EngineService(self.url)
        service.startService()
        self.addCleanup(lambda: await_deferred(service.stopService()))
        app = Klein()
        routes = FiberRoutes(service, app)
        outcome = {}

        @routes.route("/flood", session=False)
        def flood(request):
            chunk = "x" * 65536
            with EventStream(request, heartbeat=None, stall_timeout=0.5) as stream:
                try:
                    while True:
                        stream.send(chunk)
                        outcome["sent"] = stream.sent
                        if stream.paused:
                            outcome["paused"] = True
                except ClientStalled as e:
                    outcome["stalled"] = str(e)
            return None

        server = HTTPServer(self, Site(app.resource()))
        port = int(server.base.rsplit(":", 1)[1])

        class Sleeper(Protocol):
            """Sends its request, then never reads again."""

            def __init__(self):
                self.done = Deferred()

            def connectionMade(self):
                self.transport.write(b"GET /flood HTTP/1.0\r\n\r\n")
                self.transport.pauseProducing()

            def connectionLost(self, reason):
                self.done.callback(None)

        client = Sleeper()
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
        await_deferred(connectProtocol(endpoint, client))
        wait_until(lambda: "stalled" in outcome, timeout=60, what=f"a stall {outcome}")
        client.transport.resumeProducing()  # to see that the server hung up
        await_deferred(client.done, timeout=60)
        self.assertIn("read nothing", outcome["stalled"])
        self.assertTrue(outcome["paused"])
        # What it sent fits the socket buffers: it stopped, it did not queue.
        self.assertLess(outcome["sent"], 1000, outcome)
        wait_until(lambda: service.inflight == 0, what="the handler ended")
