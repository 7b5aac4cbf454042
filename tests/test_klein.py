"""
Tests for txfiberdb.klein: a tiny Klein app served on a real port, hit with
treq, against a real PostgreSQL.

Also home of the HTTP helpers (:class:`HTTPServer`, :class:`HTTPClient`,
:class:`RawRequest`) that tests.test_demo uses.
"""

import json
import time

import treq
from klein import Klein
from sqlalchemy import Column, Integer, MetaData, String, Table, select, text
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.logger import formatEvent, globalLogPublisher
from twisted.protocols.policies import WrappingFactory
from twisted.web.client import HTTPConnectionPool
from twisted.web.server import Site

from txfiberdb import await_deferred, pool_stats, shield, sleep
from txfiberdb.klein import (
    BadRequest,
    Conflict,
    FiberRoutes,
    HTTPError,
    NotFound,
    PayloadTooLarge,
    read_json,
)
from txfiberdb.service import EngineService

from .support import DatabaseTestCase

_real_monotonic = time.monotonic

# -- helpers (used by tests.test_demo too) ----------------------------------


class Reply:
    def __init__(self, code, headers, body):
        self.code = code
        self.headers = headers
        self.body = body

    def header(self, name):
        if isinstance(name, str):
            name = name.encode("ascii")
        values = self.headers.getRawHeaders(name)
        return values[0] if values else None

    @property
    def json(self):
        return json.loads(self.body.decode("utf-8"))

    def __repr__(self):
        return f"<Reply {self.code} {self.body[:200]!r}>"


def wait_until(predicate, timeout=30.0, interval=0.01, what="condition"):
    """Poll ``predicate`` (in a fiber) until it is true; fail after ``timeout``."""
    waited = 0.0
    while not predicate():
        if waited >= timeout:
            raise AssertionError(f"{what} not reached within {timeout} s")
        sleep(interval)
        waited += interval


class HTTPServer:
    """A Site on a free loopback port, its connections tracked for clean-up."""

    def __init__(self, testcase, site):
        self.wrapper = WrappingFactory(site)
        self.port = reactor.listenTCP(0, self.wrapper, interface="127.0.0.1")
        self.base = f"http://127.0.0.1:{self.port.getHost().port}"
        testcase.addCleanup(self.close)

    def close(self):
        if self.port is not None:
            await_deferred(self.port.stopListening())
            self.port = None
        for proto in list(self.wrapper.protocols):
            proto.transport.abortConnection()
        wait_until(lambda: not self.wrapper.protocols, what="server connections closed")


class HTTPClient:
    """treq with a persistent pool closed at clean-up; calls wait in the fiber."""

    def __init__(self, testcase, base):
        self.base = base
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = 200
        testcase.addCleanup(lambda: await_deferred(self.pool.closeCachedConnections()))

    def start(self, method, path, body=None, raw=None, headers=None):
        """Send a request; return a Deferred firing with a Reply."""
        data = raw
        hdrs = dict(headers or {})
        if body is not None:
            data = json.dumps(body).encode()
            hdrs.setdefault(b"content-type", [b"application/json"])
        d = treq.request(
            method, self.base + path, data=data, headers=hdrs, pool=self.pool
        )

        def got(response):
            return treq.content(response).addCallback(
                lambda content: Reply(response.code, response.headers, content)
            )

        return d.addCallback(got)

    def request(self, method, path, body=None, raw=None, headers=None):
        return await_deferred(self.start(method, path, body, raw, headers))

    def get(self, path, **kw):
        return self.request("GET", path, **kw)

    def post(self, path, body=None, **kw):
        return self.request("POST", path, body, **kw)


class RawRequest(Protocol):
    """A bare HTTP/1.1 client: sends a request, collects bytes, can hang up."""

    def __init__(self, request_bytes):
        self.request_bytes = request_bytes
        self.received = b""
        self.closed = Deferred()

    def connectionMade(self):
        self.transport.write(self.request_bytes)

    def dataReceived(self, data):
        self.received += data

    def connectionLost(self, reason):
        self.closed.callback(None)

    @classmethod
    def send(cls, base, method, path, body=b""):
        host, port = base.rsplit("/", 1)[-1].split(":")
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        proto = cls(head + body)
        endpoint = TCP4ClientEndpoint(reactor, host, int(port))
        return await_deferred(connectProtocol(endpoint, proto))

    def hang_up(self):
        self.transport.loseConnection()
        await_deferred(self.closed)


def running_queries(admin, needle):
    """Active queries containing ``needle`` on the test server (other than ours)."""
    return admin(
        "SELECT pid, query FROM pg_stat_activity WHERE state = 'active' "
        "AND query LIKE %s AND pid <> pg_backend_pid()",
        (f"%{needle}%",),
    )


# -- the tiny app -------------------------------------------------------------

metadata = MetaData()
notes = Table(
    "notes",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("body", String(20), unique=True),
)


class Secret(Exception):
    pass


def make_app(service, observed):
    app = Klein()
    routes = FiberRoutes(service, app, on_response=lambda *a: observed.append(a))

    @routes.route("/dict")
    def a_dict(request, session):
        return {"answer": session.execute(text("SELECT 42")).scalar(), "list": [1]}

    @routes.route("/list")
    def a_list(request, session):
        return [1, "two"]

    @routes.route("/text", session=False)
    def a_text(request):
        return "héllo"

    @routes.route("/bytes", session=False)
    def some_bytes(request):
        request.setHeader(b"content-type", b"application/octet-stream")
        return b"\x00\x01"

    @app.route("/handler/<int:n>")
    @routes.handler()
    def old_style(request, session, n):
        return {"n": session.execute(text("SELECT :n"), {"n": n}).scalar()}

    @routes.route("/notes", methods=["POST"])
    def add_note(request, session):
        body = read_json(request, max_bytes=1024)
        if not isinstance(body, dict) or not isinstance(body.get("body"), str):
            raise BadRequest("body must be an object with a string 'body'")
        session.execute(notes.insert().values(body=body["body"]))
        if body.get("then") == "fail":
            raise Conflict("changed my mind", details={"why": "test"})
        if body.get("then") == "crash":
            raise Secret("password=hunter2")
        request.setResponseCode(201)
        return {"created": body["body"]}

    @routes.route("/notes/<int:note_id>", methods=["DELETE"])
    def delete_note(request, session, note_id):
        result = session.execute(notes.delete().where(notes.c.id == note_id))
        if not result.rowcount:
            raise NotFound(f"no note {note_id}")
        request.setResponseCode(204)

    @routes.route("/notes/<int:note_id>", methods=["GET"])
    def get_note(request, session, note_id):
        row = session.execute(select(notes).where(notes.c.id == note_id)).one()
        return {"id": row.id, "body": row.body}

    @routes.route("/teapot")
    def teapot(request, session):
        raise HTTPError("short and stout", code=418)

    @routes.route("/werkzeug")
    def werkzeug_error(request, session):
        from werkzeug.exceptions import Forbidden

        raise Forbidden("not you")

    @routes.route("/data-error")
    def data_error(request, session):
        session.execute(text("SELECT 'nope'::integer"))

    @routes.route("/timeout")
    def statement_timeout(request, session):
        session.execute(text("SET LOCAL statement_timeout = 50"))
        session.execute(text("SELECT pg_sleep(5)"))

    @routes.route("/sleep")
    def sleep_route(request, session):
        seconds = float(request.args.get(b"seconds", [b"0.1"])[0])
        session.execute(text("SELECT pg_sleep(:s) -- klein-sleep"), {"s": seconds})
        return {"slept": seconds}

    @routes.route("/shielded", methods=["POST"], shield=True)
    def shielded(request, session):
        body = read_json(request)
        session.execute(text("SELECT pg_sleep(0.5) -- klein-shielded"))
        session.execute(notes.insert().values(body=body["body"]))
        return {"created": body["body"]}

    @routes.route("/unserializable")
    def unserializable(request, session):
        return {"value": object()}

    @routes.route("/pid")
    def backend_pid(request, session):
        return {"pid": session.execute(text("SELECT pg_backend_pid()")).scalar()}

    @routes.route("/limited", concurrency=1, concurrency_timeout=0.5)
    def limited(request, session):
        seconds = float(request.args.get(b"seconds", [b"0"])[0])
        session.execute(text("SELECT pg_sleep(:s) -- klein-limited"), {"s": seconds})
        return {"slept": seconds}

    return app


class KleinTestCase(DatabaseTestCase):
    pool = {"pool_size": 3, "max_overflow": 0, "pool_timeout": 5}

    def setUp(self):
        self.service = EngineService(self.url, grace_period=5, **self.pool)
        self.service.startService()
        self.addCleanup(lambda: await_deferred(self.service.stopService()))
        self.observed = []
        engine = self.service.engine
        metadata.create_all(engine)
        with engine.begin() as conn:
            conn.execute(notes.delete())
        self.server = HTTPServer(
            self, Site(make_app(self.service, self.observed).resource())
        )
        self.http = HTTPClient(self, self.server.base)

    def note_bodies(self):
        with self.service.engine.connect() as conn:
            return sorted(conn.execute(select(notes.c.body)).scalars())

    def wait_idle(self):
        wait_until(lambda: self.service.inflight == 0, what="no work in flight")


class ResponseTests(KleinTestCase):
    def test_dict_is_json(self):
        r = self.http.get("/dict")
        self.assertEqual(r.code, 200)
        self.assertEqual(r.header("content-type"), b"application/json")
        self.assertEqual(r.json, {"answer": 42, "list": [1]})
        self.assertEqual(self.observed[-1][:2], ("a_dict", 200))

    def test_list_text_bytes(self):
        self.assertEqual(self.http.get("/list").json, [1, "two"])
        self.assertEqual(self.http.get("/text").body, "héllo".encode())
        r = self.http.get("/bytes")
        self.assertEqual(r.body, b"\x00\x01")
        self.assertEqual(r.header("content-type"), b"application/octet-stream")

    def test_handler_decorator_under_app_route(self):
        self.assertEqual(self.http.get("/handler/7").json, {"n": 7})

    def test_none_is_empty_body(self):
        created = self.http.post("/notes", {"body": "gone soon"})
        self.assertEqual(created.code, 201)
        with self.service.engine.connect() as conn:
            note_id = conn.execute(select(notes.c.id)).scalar()
        r = self.http.request("DELETE", f"/notes/{note_id}")
        self.assertEqual((r.code, r.body), (204, b""))

    def test_unserializable_result_is_500(self):
        r = self.http.get("/unserializable")
        self.assertEqual(r.code, 500)
        self.assertIn("error_id", r.json)
        self.assertEqual(len(self.flushLoggedErrors(TypeError)), 1)


class SessionTests(KleinTestCase):
    def test_commit_when_route_returns(self):
        r = self.http.post("/notes", {"body": "kept"})
        self.assertEqual((r.code, r.json), (201, {"created": "kept"}))
        self.assertEqual(self.note_bodies(), ["kept"])

    def test_rollback_on_http_error(self):
        r = self.http.post("/notes", {"body": "dropped", "then": "fail"})
        self.assertEqual(r.code, 409)
        self.assertEqual(
            r.json, {"error": "changed my mind", "details": {"why": "test"}}
        )
        self.assertEqual(self.note_bodies(), [])

    def test_rollback_and_500_with_logged_id_on_crash(self):
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        r = self.http.post("/notes", {"body": "dropped", "then": "crash"})
        self.assertEqual(r.code, 500)
        body = r.json
        self.assertEqual(set(body), {"error", "error_id"})
        self.assertNotIn(b"hunter2", r.body)
        self.assertNotIn(b"Secret", r.body)
        self.assertEqual(self.note_bodies(), [])
        logged = [e for e in events if e.get("error_id") == body["error_id"]]
        self.assertEqual(len(logged), 1)
        self.assertIn("hunter2", logged[0]["log_failure"].getTraceback())
        self.assertEqual(len(self.flushLoggedErrors(Secret)), 1)
        self.assertEqual(self.observed[-1][:2], ("add_note", 500))

    def test_integrity_error_is_409(self):
        self.assertEqual(self.http.post("/notes", {"body": "twice"}).code, 201)
        r = self.http.post("/notes", {"body": "twice"})
        self.assertEqual(r.code, 409)
        self.assertEqual(r.json, {"error": "conflicts with existing data"})

    def test_data_error_is_400(self):
        r = self.http.get("/data-error")
        self.assertEqual((r.code, r.json), (400, {"error": "invalid data"}))

    def test_no_result_is_404(self):
        self.assertEqual(self.http.get("/notes/12345").code, 404)
        r = self.http.request("DELETE", "/notes/12345")
        self.assertEqual((r.code, r.json), (404, {"error": "no note 12345"}))

    def test_http_error_and_werkzeug_exceptions(self):
        r = self.http.get("/teapot")
        self.assertEqual((r.code, r.json), (418, {"error": "short and stout"}))
        r = self.http.get("/werkzeug")
        self.assertEqual((r.code, r.json), (403, {"error": "not you"}))

    def test_operational_error_is_503_one_line(self):
        """
        The database giving up is an expected failure: a 503 with
        Retry-After, one warning line, no traceback, no SQL.
        """
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        r = self.http.get("/timeout")
        self.assertEqual(r.code, 503)
        self.assertEqual(r.header("retry-after"), b"1")
        self.assertEqual(r.json, {"error": "database unavailable, try again later"})
        self.assertEqual(self.flushLoggedErrors(), [])
        warned = [e for e in events if e.get("failure_kind") == "database"]
        self.assertEqual(len(warned), 1)
        line = formatEvent(warned[0])
        self.assertIn("statement timeout", line)
        self.assertNotIn("pg_sleep", line)
        self.assertNotIn("log_failure", warned[0])
        # The connection is fine afterwards.
        self.assertEqual(self.http.get("/dict").code, 200)

    def test_repeated_failures_are_summarised(self):
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        for _ in range(5):
            self.assertEqual(self.http.get("/timeout").code, 503)
        warned = [e for e in events if e.get("failure_kind") == "database"]
        self.assertEqual(len(warned), 1)
        # The next line of that kind, after the interval, carries the count.
        self.patch(time, "monotonic", lambda: _real_monotonic() + 60)
        self.assertEqual(self.http.get("/timeout").code, 503)
        warned = [e for e in events if e.get("failure_kind") == "database"]
        self.assertEqual(len(warned), 2)
        self.assertIn("4 more like it in the last 10 s", formatEvent(warned[1]))

    def test_nul_in_input_is_400_not_500(self):
        """
        A value PostgreSQL cannot store reaches the driver as a DataError:
        a 400 for any app, not only apps that validate their input.
        """
        for body in ("a\x00b", "a\ud800b"):
            r = self.http.post("/notes", raw=json.dumps({"body": body}).encode())
            self.assertEqual((r.code, r.json), (400, {"error": "invalid data"}))
        self.assertEqual(self.flushLoggedErrors(), [])
        self.assertEqual(self.note_bodies(), [])

    def test_disconnect_is_503_then_recovers(self):
        """
        Backends killed while their connections are idle in the pool: the
        next requests are served on new connections.
        """
        pids = {self.http.get("/pid").json["pid"] for _ in range(3)}
        for pid in pids:
            self.admin("SELECT pg_terminate_backend(%s)", (pid,))
        sleep(0.2)
        for _ in range(10):
            r = self.http.get("/pid")
            self.assertEqual(r.code, 200)
            self.assertNotIn(r.json["pid"], pids)


class ConcurrencyLimitTests(KleinTestCase):
    def test_route_limit(self):
        """
        concurrency=1: a second request waits for the first (holding no
        connection), and gives up with a 503 after concurrency_timeout.
        """
        slow = self.http.start("GET", "/limited?seconds=2")
        wait_until(lambda: running_queries(self.admin, "klein-limited"))
        r = self.http.get("/limited")
        self.assertEqual(r.code, 503)
        self.assertEqual(r.header("retry-after"), b"1")
        self.assertIn("too many requests for this route", r.json["error"])
        # Other routes are served meanwhile, and the pool was not touched
        # by the waiting request.
        self.assertEqual(self.http.get("/dict").code, 200)
        self.assertEqual(await_deferred(slow).code, 200)
        self.assertEqual(self.http.get("/limited").code, 200)

    def test_waiting_request_gets_its_turn(self):
        first = self.http.start("GET", "/limited?seconds=0.2")
        wait_until(lambda: running_queries(self.admin, "klein-limited"))
        second = self.http.get("/limited")
        self.assertEqual(second.code, 200)
        self.assertEqual(await_deferred(first).code, 200)

    def test_bad_limits_refused(self):
        routes = FiberRoutes(self.service, Klein())
        self.assertRaises(ValueError, routes.handler, concurrency=0)
        self.assertRaises(ValueError, routes.handler, concurrency_timeout=0)


class ReadJSONTests(KleinTestCase):
    def test_malformed(self):
        r = self.http.post("/notes", raw=b'{"body": ')
        self.assertEqual(r.code, 400)
        self.assertTrue(r.json["error"].startswith("malformed JSON body"), r.json)

    def test_empty(self):
        r = self.http.post("/notes", raw=b"")
        self.assertEqual(r.code, 400)
        self.assertIn("empty", r.json["error"])

    def test_not_utf8(self):
        r = self.http.post("/notes", raw=b'{"body": "\xff"}')
        self.assertEqual(
            (r.code, r.json), (400, {"error": "request body is not UTF-8"})
        )

    def test_nan_refused(self):
        r = self.http.post("/notes", raw=b'{"body": NaN}')
        self.assertEqual(r.code, 400)
        self.assertIn("NaN", r.json["error"])

    def test_too_large(self):
        r = self.http.post("/notes", {"body": "x" * 2000})
        self.assertEqual(r.code, 413)
        self.assertIn("1024", r.json["error"])
        self.assertEqual(self.note_bodies(), [])

    def test_wrong_shape(self):
        r = self.http.post("/notes", [1, 2])
        self.assertEqual(r.code, 400)
        self.assertEqual(self.note_bodies(), [])

    def test_read_json_unit(self):
        class FakeRequest:
            def __init__(self, body, length=None):
                import io

                self.content = io.BytesIO(body)
                self.length = length

            def getHeader(self, name):
                return self.length

        self.assertEqual(read_json(FakeRequest(b' {"a": 1} ')), {"a": 1})
        with self.assertRaises(PayloadTooLarge):
            read_json(FakeRequest(b"{}", length=b"99999"), max_bytes=10)
        with self.assertRaises(BadRequest):
            read_json(FakeRequest(b"{}", length=b"abc"))
        with self.assertRaises(BadRequest) as cm:
            read_json(FakeRequest(b"[" * 100000 + b"]" * 100000), max_bytes=10**6)
        self.assertIn("deep", cm.exception.message)


class PoolExhaustedTests(KleinTestCase):
    pool = {"pool_size": 1, "max_overflow": 0, "pool_timeout": 0.2}

    def test_503_with_retry_after(self):
        slow = self.http.start("GET", "/sleep?seconds=3")
        wait_until(lambda: pool_stats(self.service.engine)["checked_out"] == 1)
        r = self.http.get("/dict")
        self.assertEqual(r.code, 503)
        self.assertEqual(r.header("retry-after"), b"1")
        self.assertIn("busy", r.json["error"])
        self.assertEqual(await_deferred(slow).code, 200)
        self.assertEqual(self.http.get("/dict").code, 200)


class CancelTests(KleinTestCase):
    def test_disconnect_cancels_query_and_returns_connection(self):
        client = RawRequest.send(self.server.base, "GET", "/sleep?seconds=60")
        wait_until(
            lambda: running_queries(self.admin, "klein-sleep"),
            what="pg_sleep running on the server",
        )
        self.assertEqual(pool_stats(self.service.engine)["checked_out"], 1)
        client.hang_up()
        wait_until(
            lambda: not running_queries(self.admin, "klein-sleep"),
            what="the query cancelled on the server",
        )
        self.wait_idle()
        self.assertEqual(pool_stats(self.service.engine)["checked_out"], 0)
        self.assertEqual(client.received, b"")
        self.assertEqual(self.observed[-1][:2], ("sleep_route", 499))
        # The connection went back to the pool in a usable state.
        self.assertEqual(self.http.get("/dict").json["answer"], 42)

    def test_shielded_route_finishes_after_disconnect(self):
        client = RawRequest.send(
            self.server.base, "POST", "/shielded", json.dumps({"body": "kept"}).encode()
        )
        wait_until(
            lambda: running_queries(self.admin, "klein-shielded"),
            what="the shielded route running",
        )
        client.hang_up()
        self.wait_idle()
        self.assertEqual(self.note_bodies(), ["kept"])
        self.assertEqual(pool_stats(self.service.engine)["checked_out"], 0)

    def test_stopped_service_answers_503(self):
        await_deferred(self.service.stopService())
        r = self.http.get("/dict")
        self.assertEqual(r.code, 503)
        self.assertEqual(r.header("retry-after"), b"1")
        self.assertIn("shutting down", r.json["error"])
        self.service.startService()

    def test_cancelled_at_shutdown_with_client_waiting_is_503(self):
        self.service.grace_period = 0.1
        slow = self.http.start("GET", "/sleep?seconds=60")
        wait_until(lambda: running_queries(self.admin, "klein-sleep"))
        await_deferred(self.service.stopService())
        r = await_deferred(slow)
        self.assertEqual(r.code, 503)
        self.assertIn("shutting down", r.json["error"])
        self.assertEqual(running_queries(self.admin, "klein-sleep"), [])
        self.service.startService()


class ShieldTests(DatabaseTestCase):
    def test_cancel_inside_shield_is_deferred(self):
        # The building block of shield=True, for completeness.
        service = EngineService(self.url)
        service.startService()
        self.addCleanup(lambda: await_deferred(service.stopService()))
        done = []

        def work():
            with shield():
                sleep(0.2)
                done.append(True)

        d = service.run(work)
        sleep(0.05)
        d.cancel()
        self.assertRaises(CancelledError, await_deferred, d)
        wait_until(lambda: service.inflight == 0)
        self.assertEqual(done, [True])
