"""
Tests for the demo shop (klein_demo): the service started in-process against
the test PostgreSQL and hit with treq over a real port; and ``twistd -n
klein-demo`` as a subprocess with its own throwaway PostgreSQL.
"""

import io
import os
import re
import signal
import socket
import subprocess
import sys
import uuid

from sqlalchemy import func, select
from twisted.internet.defer import CancelledError
from twisted.internet.error import ConnectionRefusedError
from twisted.protocols.policies import WrappingFactory
from twisted.python import usage
from twisted.web.client import FileBodyProducer, ResponseNeverReceived
from twisted.web.iweb import UNKNOWN_LENGTH

import klein_demo
from klein_demo.models import OrderLine, Product
from klein_demo.tap import Options, ShopService, to_url
from txfiberdb import await_deferred, pool_stats, sleep

from .support import DatabaseTestCase
from .test_klein import HTTPClient, RawRequest, running_queries, wait_until

def scrape(text):
    """{(sample name, sorted label items): value} of a Prometheus exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


METRIC_LINE = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*(\{[^}]*\})? -?[0-9.e+-]+(Inf)?$")


class ShopTestCase(DatabaseTestCase):
    """A ShopService per test, on a free port, over the class's database."""

    options = {"pool_size": 20, "max_overflow": 40, "pool_timeout": 30}

    def setUp(self):
        self.app_name = f"shop_{uuid.uuid4().hex[:8]}"
        self.shop = ShopService(
            url=f"{self.url}?application_name={self.app_name}",
            listen="tcp:0:interface=127.0.0.1",
            grace_period=10,
            sample_data=True,
            **self.options,
        )
        self.connections = WrappingFactory(self.shop.site)
        self.shop.site = self.connections
        self.shop.startService()
        self.addCleanup(self.stop_shop)
        port = await_deferred(self.shop.listening)
        self.base = f"http://127.0.0.1:{port.getHost().port}"
        self.http = HTTPClient(self, self.base)

    def stop_shop(self):
        if self.shop.running:
            await_deferred(self.shop.stopService())
        for proto in list(self.connections.protocols):
            proto.transport.abortConnection()
        wait_until(lambda: not self.connections.protocols, what="connections closed")

    def session(self):
        return self.shop.db.sessionmaker()

    def new_product(self, stock=10, price_cents=1000, name=None):
        sku = f"T-{uuid.uuid4().hex[:10]}"
        r = self.http.post(
            "/products",
            {
                "sku": sku,
                "name": name or f"Test {sku}",
                "price_cents": price_cents,
                "stock": stock,
            },
        )
        self.assertEqual(r.code, 201, r)
        return r.json

    def new_customer(self):
        r = self.http.post(
            "/customers",
            {"name": "Test", "email": f"{uuid.uuid4().hex[:10]}@example.com"},
        )
        self.assertEqual(r.code, 201, r)
        return r.json

    def product_count(self):
        with self.session() as s:
            return s.scalar(select(func.count()).select_from(Product))

    def stock(self, product_id):
        with self.session() as s:
            return s.get(Product, product_id).stock

    def assertBadRequest(self, reply, *words, code=400):
        self.assertEqual(reply.code, code, reply)
        self.assertEqual(reply.header("content-type"), b"application/json")
        message = reply.json["error"]
        for word in words:
            self.assertIn(word, message)
        return reply.json


class ProductTests(ShopTestCase):
    def test_list_first_page(self):
        r = self.http.get("/products")
        self.assertEqual(r.code, 200)
        body = r.json
        self.assertEqual((body["limit"], body["offset"]), (20, 0))
        self.assertGreaterEqual(body["total"], 20)
        self.assertEqual(len(body["items"]), 20)
        ids = [p["id"] for p in body["items"]]
        self.assertEqual(ids, sorted(ids))
        first = body["items"][0]
        self.assertEqual(
            set(first),
            {
                "id",
                "sku",
                "name",
                "description",
                "price_cents",
                "price",
                "stock",
                "created_at",
                "updated_at",
            },
        )
        self.assertEqual(first["price"], f"{first['price_cents'] / 100:.2f}")

    def test_pagination(self):
        everything = self.http.get("/products?limit=100").json["items"]
        page = self.http.get("/products?limit=5&offset=5").json
        self.assertEqual(
            [p["id"] for p in page["items"]], [p["id"] for p in everything[5:10]]
        )
        beyond = self.http.get("/products?offset=100000").json
        self.assertEqual(beyond["items"], [])

    def test_filters_and_sort(self):
        cups = self.http.get("/products?q=CUP&limit=100").json["items"]
        self.assertTrue(cups)
        self.assertTrue(all("cup" in p["name"].lower() for p in cups))
        priced = self.http.get(
            "/products?min_price_cents=1000&max_price_cents=3000&limit=100"
        ).json["items"]
        self.assertTrue(priced)
        self.assertTrue(all(1000 <= p["price_cents"] <= 3000 for p in priced))
        by_price = self.http.get("/products?sort=-price&limit=100").json["items"]
        prices = [p["price_cents"] for p in by_price]
        self.assertEqual(prices, sorted(prices, reverse=True))
        empty = self.new_product(stock=0)
        out = self.http.get("/products?in_stock=false&limit=100").json["items"]
        self.assertIn(empty["id"], [p["id"] for p in out])
        self.assertTrue(all(p["stock"] == 0 for p in out))

    def test_filter_wildcards_are_literal(self):
        odd = self.new_product(name="100% arabica_blend")
        found = self.http.get("/products?q=%25&limit=100").json["items"]
        self.assertEqual([p["id"] for p in found], [odd["id"]])
        found = self.http.get("/products?q=a_b&limit=100").json["items"]
        self.assertEqual([p["id"] for p in found], [odd["id"]])

    def test_bad_query_parameters(self):
        for query, words in [
            ("limit=0", ["limit", "between 1 and 100"]),
            ("limit=101", ["limit"]),
            ("limit=ten", ["limit", "integer"]),
            ("offset=-1", ["offset"]),
            ("min_price_cents=x", ["min_price_cents"]),
            ("min_price_cents=500&max_price_cents=100", ["min_price_cents"]),
            ("in_stock=maybe", ["in_stock", "true or false"]),
            ("sort=color", ["sort", "one of"]),
            ("q=" + "x" * 101, ["q", "100"]),
            ("limit=1&limit=2", ["limit", "2 times"]),
        ]:
            self.assertBadRequest(self.http.get(f"/products?{query}"), *words)

    def test_get(self):
        made = self.new_product(stock=3, price_cents=1999)
        r = self.http.get(f"/products/{made['id']}")
        self.assertEqual(r.code, 200)
        self.assertEqual(r.json, made)
        self.assertEqual(r.json["price"], "19.99")

    def test_get_missing(self):
        self.assertEqual(
            self.http.get("/products/999999").json, {"error": "no product 999999"}
        )
        self.assertEqual(self.http.get("/products/999999").code, 404)
        self.assertEqual(self.http.get("/products/99999999999999").code, 404)
        r = self.http.get("/products/abc")
        self.assertEqual((r.code, r.json), (404, {"error": "no such route"}))

    def test_create(self):
        before = self.product_count()
        r = self.http.post(
            "/products",
            {
                "sku": "NEW-1",
                "name": "  New thing  ",
                "price_cents": 1234,
                "stock": 7,
                "description": "shiny",
            },
        )
        self.assertEqual(r.code, 201)
        body = r.json
        self.assertEqual(r.header("location"), f"/products/{body['id']}".encode())
        self.assertEqual(
            {
                k: body[k]
                for k in ("sku", "name", "price_cents", "price", "stock", "description")
            },
            {
                "sku": "NEW-1",
                "name": "New thing",
                "price_cents": 1234,
                "price": "12.34",
                "stock": 7,
                "description": "shiny",
            },
        )
        self.assertEqual(self.product_count(), before + 1)
        self.assertEqual(self.http.get(f"/products/{body['id']}").json, body)

    def test_create_defaults(self):
        r = self.http.post(
            "/products", {"sku": "NEW-2", "name": "Bare", "price_cents": 0}
        )
        self.assertEqual(r.code, 201)
        self.assertEqual((r.json["stock"], r.json["description"]), (0, ""))

    def test_create_invalid_changes_nothing(self):
        before = self.product_count()
        good = {"sku": "BAD-1", "name": "x", "price_cents": 100}
        cases = [
            ({}, ["sku is required", "name is required", "price_cents is required"]),
            (
                {**good, "price_cents": "100"},
                ["price_cents must be an integer, not a string"],
            ),
            ({**good, "price_cents": 1.5}, ["price_cents must be an integer"]),
            (
                {**good, "price_cents": True},
                ["price_cents must be an integer, not a boolean"],
            ),
            ({**good, "price_cents": -1}, ["price_cents must be an integer between 0"]),
            (
                {**good, "price_cents": 10**12},
                ["price_cents must be an integer between 0"],
            ),
            ({**good, "stock": -5}, ["stock"]),
            ({**good, "name": "   "}, ["name must not be empty"]),
            ({**good, "name": "n" * 201}, ["name must be at most 200 characters"]),
            ({**good, "sku": "no spaces"}, ["sku must be letters"]),
            ({**good, "name": None}, ["name must be a string, not null"]),
            ({**good, "colour": "red"}, ["colour is not a known field"]),
        ]
        for body, words in cases:
            reply = self.http.post("/products", body)
            err = self.assertBadRequest(reply, "invalid input", *words)
            self.assertIsInstance(err["details"], dict)
        self.assertBadRequest(
            self.http.post("/products", [good]), "must be a JSON object"
        )
        self.assertBadRequest(
            self.http.post("/products", raw=b"{nope"), "malformed JSON"
        )
        self.assertBadRequest(
            self.http.post("/products", raw=b""), "empty request body"
        )
        self.assertEqual(self.product_count(), before)

    def test_oversized_body_is_413(self):
        before = self.product_count()
        big = {
            "sku": "BIG",
            "name": "big",
            "price_cents": 1,
            "description": "x" * 200_000,
        }
        r = self.http.post("/products", big)
        self.assertBadRequest(r, "over the limit", code=413)
        self.assertEqual(self.product_count(), before)

    def test_oversized_chunked_body_is_413(self):
        # No Content-Length: the body is cut at the limit while it arrives.
        body = b'{"description": "' + b"x" * 100_000 + b'"}'
        producer = FileBodyProducer(io.BytesIO(body))
        producer.length = UNKNOWN_LENGTH  # sent chunked
        r = self.http.request("POST", "/products", raw=producer)
        self.assertBadRequest(r, "over the limit", code=413)

    def test_duplicate_sku_is_409(self):
        made = self.new_product()
        r = self.http.post(
            "/products", {"sku": made["sku"], "name": "x", "price_cents": 1}
        )
        self.assertBadRequest(r, made["sku"], "exists", code=409)

    def test_put_replaces(self):
        made = self.new_product(stock=1)
        r = self.http.request(
            "PUT",
            f"/products/{made['id']}",
            body={"sku": made["sku"], "name": "Renamed", "price_cents": 5, "stock": 50},
        )
        self.assertEqual(r.code, 200)
        self.assertEqual(
            (r.json["name"], r.json["price_cents"], r.json["stock"]), ("Renamed", 5, 50)
        )
        r = self.http.request("PUT", f"/products/{made['id']}", body={"name": "x"})
        self.assertBadRequest(r, "sku is required")

    def test_patch_updates_some_fields(self):
        made = self.new_product(stock=1, price_cents=100)
        r = self.http.request("PATCH", f"/products/{made['id']}", body={"stock": 9})
        self.assertEqual(r.code, 200)
        self.assertEqual((r.json["stock"], r.json["price_cents"]), (9, 100))
        self.assertEqual(self.stock(made["id"]), 9)
        self.assertBadRequest(
            self.http.request("PATCH", f"/products/{made['id']}", body={}),
            "nothing to update",
        )
        self.assertBadRequest(
            self.http.request(
                "PATCH", f"/products/{made['id']}", body={"stock": "many"}
            ),
            "stock must be an integer",
        )
        self.assertEqual(self.stock(made["id"]), 9)
        other = self.new_product()
        r = self.http.request(
            "PATCH", f"/products/{made['id']}", body={"sku": other["sku"]}
        )
        self.assertEqual(r.code, 409)
        r = self.http.request("PATCH", "/products/999999", body={"stock": 1})
        self.assertEqual(r.code, 404)

    def test_delete(self):
        made = self.new_product()
        r = self.http.request("DELETE", f"/products/{made['id']}")
        self.assertEqual((r.code, r.body), (204, b""))
        self.assertEqual(self.http.get(f"/products/{made['id']}").code, 404)
        self.assertEqual(
            self.http.request("DELETE", f"/products/{made['id']}").code, 404
        )

    def test_delete_product_in_orders_is_409(self):
        made = self.new_product()
        customer = self.new_customer()
        order = self.http.post(
            "/orders",
            {
                "customer_id": customer["id"],
                "lines": [{"product_id": made["id"], "quantity": 1}],
            },
        )
        self.assertEqual(order.code, 201)
        r = self.http.request("DELETE", f"/products/{made['id']}")
        self.assertBadRequest(r, "is in orders", code=409)
        self.assertEqual(self.http.get(f"/products/{made['id']}").code, 200)


class CustomerTests(ShopTestCase):
    def test_create_get_list(self):
        r = self.http.post(
            "/customers",
            {"name": "Kay", "email": f"Kay.{uuid.uuid4().hex[:6]}@Example.com"},
        )
        self.assertEqual(r.code, 201)
        made = r.json
        self.assertEqual(made["email"], made["email"].lower())
        self.assertEqual(r.header("location"), f"/customers/{made['id']}".encode())
        got = self.http.get(f"/customers/{made['id']}").json
        self.assertEqual(got["order_count"], 0)
        self.assertEqual(got["email"], made["email"])
        listing = self.http.get("/customers?limit=100").json
        self.assertIn(made["id"], [c["id"] for c in listing["items"]])
        self.assertEqual(listing["total"], len(listing["items"]))

    def test_invalid_and_duplicate(self):
        self.assertBadRequest(
            self.http.post("/customers", {"name": "x", "email": "not-an-email"}),
            "email must be an email address",
        )
        self.assertBadRequest(
            self.http.post("/customers", {"name": "x"}), "email is required"
        )
        made = self.new_customer()
        r = self.http.post("/customers", {"name": "y", "email": made["email"].upper()})
        self.assertBadRequest(r, "exists", code=409)

    def test_missing(self):
        self.assertEqual(self.http.get("/customers/999999").code, 404)
        self.assertEqual(self.http.get("/customers/999999/orders").code, 404)


class OrderTests(ShopTestCase):
    def order(self, customer_id, *lines):
        return self.http.post(
            "/orders",
            {
                "customer_id": customer_id,
                "lines": [{"product_id": p, "quantity": q} for p, q in lines],
            },
        )

    def test_place_order(self):
        a = self.new_product(stock=5, price_cents=250)
        b = self.new_product(stock=2, price_cents=1000)
        customer = self.new_customer()
        r = self.order(customer["id"], (a["id"], 2), (b["id"], 1), (a["id"], 1))
        self.assertEqual(r.code, 201, r)
        order = r.json
        self.assertEqual(r.header("location"), f"/orders/{order['id']}".encode())
        self.assertEqual(order["total_cents"], 3 * 250 + 1000)
        self.assertEqual(order["total"], "17.50")
        self.assertEqual(
            sorted((line["product_id"], line["quantity"]) for line in order["lines"]),
            sorted([(a["id"], 3), (b["id"], 1)]),
        )
        self.assertEqual((self.stock(a["id"]), self.stock(b["id"])), (2, 1))
        # GET /orders/<id> (lazy loading) and the customer's orders (eager).
        self.assertEqual(self.http.get(f"/orders/{order['id']}").json, order)
        mine = self.http.get(f"/customers/{customer['id']}/orders").json
        self.assertEqual((mine["total"], mine["items"]), (1, [order]))
        self.assertEqual(
            self.http.get(f"/customers/{customer['id']}").json["order_count"], 1
        )

    def test_customer_orders_newest_first_paginated(self):
        p = self.new_product(stock=100)
        customer = self.new_customer()
        ids = [self.order(customer["id"], (p["id"], 1)).json["id"] for _ in range(3)]
        page = self.http.get(f"/customers/{customer['id']}/orders?limit=2").json
        self.assertEqual([o["id"] for o in page["items"]], ids[::-1][:2])
        self.assertEqual(page["total"], 3)
        page = self.http.get(
            f"/customers/{customer['id']}/orders?limit=2&offset=2"
        ).json
        self.assertEqual([o["id"] for o in page["items"]], [ids[0]])

    def test_insufficient_stock_is_409_and_changes_nothing(self):
        a = self.new_product(stock=5)
        b = self.new_product(stock=1)
        customer = self.new_customer()
        r = self.order(customer["id"], (a["id"], 2), (b["id"], 2))
        err = self.assertBadRequest(
            r, "insufficient stock", f"product {b['id']}", code=409
        )
        self.assertEqual(
            err["details"]["insufficient_stock"],
            [{"product_id": b["id"], "requested": 2, "available": 1}],
        )
        self.assertEqual((self.stock(a["id"]), self.stock(b["id"])), (5, 1))
        self.assertEqual(
            self.http.get(f"/customers/{customer['id']}").json["order_count"], 0
        )

    def test_invalid_orders(self):
        p = self.new_product()
        customer = self.new_customer()
        cid, pid = customer["id"], p["id"]
        cases = [
            ({"customer_id": cid}, ["lines is required"]),
            ({"customer_id": cid, "lines": []}, ["lines must not be empty"]),
            ({"customer_id": cid, "lines": "x"}, ["lines must be an array"]),
            ({"customer_id": cid, "lines": [5]}, ["lines[0]", "must be a JSON object"]),
            (
                {"customer_id": cid, "lines": [{"product_id": pid, "quantity": 0}]},
                ["lines[0]", "quantity must be an integer between 1 and 1000"],
            ),
            (
                {"customer_id": cid, "lines": [{"product_id": pid}]},
                ["quantity is required"],
            ),
            (
                {
                    "customer_id": cid,
                    "lines": [{"product_id": pid, "quantity": 600}] * 2,
                },
                ["at most 1000"],
            ),
            (
                {"customer_id": "1", "lines": [{"product_id": pid, "quantity": 1}]},
                ["customer_id must be an integer"],
            ),
            (
                {"customer_id": 0, "lines": [{"product_id": pid, "quantity": 1}]},
                ["customer_id must be an integer between 1"],
            ),
            (
                {"customer_id": 999999, "lines": [{"product_id": pid, "quantity": 1}]},
                ["no customer 999999"],
            ),
            (
                {"customer_id": cid, "lines": [{"product_id": 999999, "quantity": 1}]},
                ["no product 999999"],
            ),
            (
                {
                    "customer_id": cid,
                    "lines": [{"product_id": pid, "quantity": 1}] * 51,
                },
                ["at most 50"],
            ),
        ]
        for body, words in cases:
            self.assertBadRequest(self.http.post("/orders", body), *words)
        self.assertEqual(self.stock(pid), 10)
        self.assertEqual(self.http.get(f"/customers/{cid}").json["order_count"], 0)

    def test_no_oversell_under_50_concurrent_orders(self):
        p = self.new_product(stock=10, price_cents=500)
        customers = [self.new_customer()["id"] for _ in range(5)]
        pending = [
            self.http.start(
                "POST",
                "/orders",
                {
                    "customer_id": customers[i % 5],
                    "lines": [{"product_id": p["id"], "quantity": 1}],
                },
            )
            for i in range(50)
        ]
        replies = [await_deferred(d) for d in pending]
        codes = sorted(r.code for r in replies)
        self.assertEqual(
            codes,
            [201] * 10 + [409] * 40,
            [r for r in replies if r.code not in (201, 409)],
        )
        for r in replies:
            if r.code == 409:
                self.assertIn("insufficient stock", r.json["error"])
        self.assertEqual(self.stock(p["id"]), 0)
        with self.session() as s:
            sold = s.scalar(
                select(func.sum(OrderLine.quantity)).where(
                    OrderLine.product_id == p["id"]
                )
            )
        self.assertEqual(sold, 10)

    def test_mixed_quantities_never_oversell(self):
        p = self.new_product(stock=25)
        customer = self.new_customer()["id"]
        pending = [
            self.http.start(
                "POST",
                "/orders",
                {
                    "customer_id": customer,
                    "lines": [{"product_id": p["id"], "quantity": 1 + i % 4}],
                },
            )
            for i in range(40)
        ]
        replies = [await_deferred(d) for d in pending]
        self.assertEqual({r.code for r in replies} - {201, 409}, set())
        sold = sum(r.json["lines"][0]["quantity"] for r in replies if r.code == 201)
        self.assertLessEqual(sold, 25)
        self.assertEqual(self.stock(p["id"]), 25 - sold)
        # Every refused order really asked for more than was left.
        self.assertTrue(
            all(
                r.json["details"]["insufficient_stock"][0]["requested"]
                > r.json["details"]["insufficient_stock"][0]["available"]
                for r in replies
                if r.code == 409
            )
        )

    def test_missing_order(self):
        self.assertEqual(
            self.http.get("/orders/999999").json, {"error": "no order 999999"}
        )


class OperationsTests(ShopTestCase):
    def test_test_route(self):
        r = self.http.get("/test")
        self.assertEqual((r.code, r.json), (200, {"slept": 0.1}))
        self.assertEqual(self.http.get("/test?seconds=0").json, {"slept": 0.0})
        self.assertEqual(self.http.get("/test?seconds=0.25").json, {"slept": 0.25})
        for bad in ("11", "-1", "abc", "nan", "inf"):
            self.assertBadRequest(self.http.get(f"/test?seconds={bad}"), "seconds")

    def test_test_route_runs_20_requests_in_parallel(self):
        # All 20 queries are on the server at the same time.
        pending = [self.http.start("GET", "/test?seconds=10") for _ in range(20)]
        seen = []

        def twenty_running():
            seen.append(len(running_queries(self.admin, "pg_sleep(")))
            return seen[-1] >= 20

        wait_until(twenty_running, what="20 pg_sleep running at once")
        self.assertEqual(self.shop.db.inflight, 20)
        for d in pending:
            d.cancel()
        for d in pending:
            # treq reports a cancelled request as ResponseNeverReceived.
            self.assertRaises(
                (CancelledError, ResponseNeverReceived), await_deferred, d
            )
        wait_until(
            lambda: not running_queries(self.admin, "pg_sleep("),
            what="the queries cancelled",
        )

    def test_index(self):
        # API clients: the route list at /routes, or at / when asking for
        # JSON; a browser gets the live page there (tests.test_live).
        for path, headers in [
            ("/routes", {}),
            ("/", {b"accept": [b"application/json"]}),
        ]:
            r = self.http.get(path, headers=headers)
            self.assertEqual(r.header("content-type"), b"application/json")
            routes = r.json["routes"]
            self.assertIn("POST /orders", routes)
            self.assertIn("GET /customers/<int:customer_id>/orders", routes)
            self.assertIn("GET /events", routes)
        self.assertEqual(self.http.get("/").header("content-type")[:9], b"text/html")

    def test_unknown_route_and_method_are_json(self):
        r = self.http.get("/nope")
        self.assertEqual((r.code, r.json), (404, {"error": "no such route"}))
        r = self.http.request("DELETE", "/customers")
        self.assertEqual((r.code, r.json), (405, {"error": "method not allowed"}))
        self.assertIn(b"POST", r.header("allow"))

    def test_health(self):
        r = self.http.get("/health")
        self.assertEqual(r.code, 200)
        body = r.json
        self.assertEqual(body["status"], "ok")
        self.assertEqual(
            set(body["pool"]),
            {"pool_size", "open", "checked_out", "idle", "overflow", "waiting"},
        )

    def test_metrics(self):
        self.http.get("/products/1")
        self.http.get("/products/999999")
        r = self.http.get("/metrics")
        self.assertEqual(r.code, 200)
        self.assertEqual(
            r.header("content-type"), b"text/plain; version=0.0.4; charset=utf-8"
        )
        text = r.body.decode()
        for line in text.splitlines():
            if not line.startswith("#"):
                self.assertRegex(line, METRIC_LINE)
        got = scrape(text)
        requests = "klein_demo_http_requests_total"
        duration = "klein_demo_http_request_duration_seconds"
        route = (("route", "get_product"),)
        self.assertEqual(got[(requests, (("code", "200"),) + route)], 1)
        self.assertEqual(got[(requests, (("code", "404"),) + route)], 1)
        self.assertEqual(got[(f"{duration}_count", route)], 2)
        self.assertEqual(got[(f"{duration}_bucket", (("le", "+Inf"),) + route)], 2)
        for name in (
            "txfiberdb_pool_checked_out",
            "txfiberdb_pool_open_connections",
            "txfiberdb_pool_waiting",
            "txfiberdb_fibers_live",
            "txfiberdb_fibers_started_total",
            "klein_demo_units_of_work_inflight",
        ):
            self.assertIn((name, ()), got)

    def test_client_disconnect_cancels_the_query(self):
        client = RawRequest.send(self.base, "GET", "/test?seconds=10")
        wait_until(
            lambda: running_queries(self.admin, "pg_sleep("),
            what="pg_sleep running on the server",
        )
        client.hang_up()
        wait_until(
            lambda: not running_queries(self.admin, "pg_sleep("),
            what="the query cancelled on the server",
        )
        wait_until(lambda: self.shop.db.inflight == 0)
        self.assertEqual(pool_stats(self.shop.db.engine)["checked_out"], 0)
        metrics = self.http.get("/metrics").body.decode()
        key = ("klein_demo_http_requests_total", (("code", "499"), ("route", "test")))
        self.assertEqual(scrape(metrics)[key], 1)
        # The connection that was cancelled serves again.
        self.assertEqual(self.http.get("/test?seconds=0").code, 200)

    def test_graceful_shutdown(self):
        slow = self.http.start("GET", "/test?seconds=0.5")
        wait_until(lambda: running_queries(self.admin, "pg_sleep("))
        stopping = self.shop.stopService()
        # Not listening any more; the request in flight finishes.
        self.assertRaises(ConnectionRefusedError, self.http.get, "/health")
        r = await_deferred(slow)
        self.assertEqual((r.code, r.json), (200, {"slept": 0.5}))
        await_deferred(stopping)
        self.assertFalse(self.shop.db.accepting)
        wait_until(
            lambda: (
                not self.admin(
                    "SELECT 1 FROM pg_stat_activity WHERE application_name = %s",
                    (self.app_name,),
                )
            ),
            what="the pool's connections closed",
        )


class ExhaustedPoolTests(ShopTestCase):
    options = {
        "pool_size": 2,
        "max_overflow": 0,
        "pool_timeout": 0.2,
        "slow_route_concurrency": 2,
    }

    def test_health_answers_while_the_pool_is_exhausted(self):
        holders = [
            RawRequest.send(self.base, "GET", "/test?seconds=10") for _ in range(2)
        ]
        wait_until(lambda: pool_stats(self.shop.db.engine)["checked_out"] == 2)
        r = self.http.get("/health")
        self.assertEqual(r.code, 200)
        self.assertEqual(r.json["pool"]["checked_out"], 2)
        busy = self.http.get("/products/1")
        self.assertEqual(busy.code, 503)
        self.assertEqual(busy.header("retry-after"), b"1")
        for h in holders:
            h.hang_up()
        wait_until(lambda: pool_stats(self.shop.db.engine)["checked_out"] == 0)
        self.assertEqual(self.http.get("/products/1").code, 200)


class OptionsTests(DatabaseTestCase):
    def test_defaults(self):
        options = Options()
        options.parseOptions([])
        self.assertEqual(options["listen"], "tcp:8080:interface=127.0.0.1")
        self.assertIsNone(options["url"])
        self.assertEqual((options["pool-size"], options["max-overflow"]), (20, 10))

    def test_all_options(self):
        options = Options()
        options.parseOptions(
            [
                "--listen",
                "tcp:0",
                "--dsn",
                "postgresql://u:p@db:5433/shop",
                "--pool-size",
                "5",
                "--max-overflow",
                "2",
                "--pool-timeout",
                "3",
                "--grace-period",
                "1",
                "--echo",
                "--sample-data",
            ]
        )
        self.assertEqual(options["url"], "postgresql+txpostgres://u:p@db:5433/shop")
        self.assertEqual(options["pool-size"], 5)
        self.assertTrue(options["echo"])

    def test_bad_options(self):
        for argv in (
            ["--listen", "nonsense:1"],
            ["--pool-size", "0"],
            ["--max-overflow", "-2"],
            ["--pool-timeout", "0"],
            ["--dsn", "mysql://x/y"],
        ):
            self.assertRaises(usage.UsageError, Options().parseOptions, argv)

    def test_dsn_forms(self):
        self.assertEqual(to_url("postgres://a@h/d"), "postgresql+txpostgres://a@h/d")
        self.assertEqual(
            to_url("postgresql+psycopg2://a:b@h:1/d"),
            "postgresql+txpostgres://a:b@h:1/d",
        )
        self.assertEqual(
            to_url("host=h port=5 user=u dbname=d"), "postgresql+txpostgres://u@h:5/d"
        )

    def test_unreachable_database_fails_start(self):
        """An expected failure: one line naming the server, no traceback."""
        from sqlalchemy.exc import OperationalError
        from twisted.logger import formatEvent, globalLogPublisher

        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        port = _free_port()  # nothing listens there
        shop = ShopService(
            url=f"postgresql+txpostgres://postgres:hunter2@127.0.0.1:{port}/none",
            listen="tcp:0:interface=127.0.0.1",
        )
        shop.startService()
        self.addCleanup(lambda: await_deferred(shop.stopService()))
        self.assertRaises(OperationalError, await_deferred, shop.listening)
        self.assertIsNone(shop.port)
        self.assertEqual(self.flushLoggedErrors(), [])
        lines = [formatEvent(e) for e in events]
        (line,) = [x for x in lines if "could not start" in x]
        self.assertIn(f'"127.0.0.1", port {port}', line)
        self.assertIn("refused", line)
        self.assertFalse([x for x in lines if "hunter2" in x], lines)

    def test_stop_while_starting_does_not_wait(self):
        """
        Stopped while start-up waits for a server that never answers: the
        start-up is given up at once, not after the grace period.
        """
        from twisted.internet import protocol, reactor

        silent = protocol.ServerFactory.forProtocol(protocol.Protocol)
        listening = reactor.listenTCP(0, silent, interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        port = listening.getHost().port
        shop = ShopService(
            url=f"postgresql+txpostgres://x@127.0.0.1:{port}/x?connect_timeout=60",
            listen="tcp:0:interface=127.0.0.1",
            grace_period=60,
        )
        shop.startService()
        outcome = []
        shop.listening.addBoth(outcome.append)
        sleep(0.3)
        stopping = shop.stopService()
        await_deferred(stopping.addTimeout(10, reactor))
        self.assertTrue(outcome[0].check(CancelledError))
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_given_dsn_gets_schema_but_no_sample_data(self):
        shop = ShopService(url=self.url, listen="tcp:0:interface=127.0.0.1")
        shop.startService()
        port = await_deferred(shop.listening)
        self.addCleanup(lambda: await_deferred(shop.stopService()))
        http = HTTPClient(self, f"http://127.0.0.1:{port.getHost().port}")
        r = http.get("/products")
        self.assertEqual((r.code, r.json["total"]), (200, 0))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _processes_mentioning(text):
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append((int(pid), cmdline))
    return found


class TwistdTests(DatabaseTestCase):
    def test_twistd_klein_demo(self):
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        port = _free_port()
        workdir = self.mktemp()
        os.makedirs(workdir)
        log_path = os.path.join(workdir, "twistd.log")
        root = os.path.dirname(os.path.dirname(os.path.abspath(klein_demo.__file__)))
        env = dict(
            os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", "")
        )
        with open(log_path, "wb") as log_file:
            proc = subprocess.Popen(
                [
                    twistd,
                    "-n",
                    "--pidfile=",
                    "klein-demo",
                    "--listen",
                    f"tcp:{port}:interface=127.0.0.1",
                ],
                cwd=workdir,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=env,
            )

        def cleanup():
            if proc.poll() is None:
                proc.kill()
                proc.wait()

        self.addCleanup(cleanup)

        def log_text():
            with open(log_path, encoding="utf-8", errors="replace") as f:
                return f.read()

        http = HTTPClient(self, f"http://127.0.0.1:{port}")

        def healthy():
            if proc.poll() is not None:
                raise AssertionError(
                    f"twistd exited ({proc.returncode}):\n{log_text()}"
                )
            try:
                return http.get("/health").code == 200
            except ConnectionRefusedError:
                return False

        wait_until(healthy, timeout=120, interval=0.1, what="twistd klein-demo serving")
        self.assertEqual(http.get("/health").json["status"], "ok")
        self.assertEqual(http.get("/test").json, {"slept": 0.1})
        self.assertEqual(http.get("/products/1").code, 200)
        match = re.search(r"throwaway PostgreSQL running in (\S+)", log_text())
        self.assertIsNotNone(match, log_text())
        pgdir = match.group(1)
        self.assertTrue(_processes_mentioning(pgdir))

        # A request in flight when SIGTERM arrives is answered.
        slow = http.start("GET", "/test?seconds=1")

        def in_flight():
            text = http.get("/metrics").body.decode()
            return "klein_demo_units_of_work_inflight 1" in text

        wait_until(in_flight, what="the slow request in flight")
        proc.send_signal(signal.SIGTERM)
        r = await_deferred(slow)
        self.assertEqual((r.code, r.json), (200, {"slept": 1.0}))
        wait_until(lambda: proc.poll() is not None, timeout=60, what="twistd exited")
        output = log_text()
        # twistd re-raises the signal that stopped it, to exit as killed by it.
        self.assertIn(proc.returncode, (0, -signal.SIGTERM), output)
        self.assertIn("throwaway PostgreSQL stopped and removed", output)
        self.assertNotIn("Traceback", output)
        self.assertEqual(_processes_mentioning(pgdir), [])
        self.assertFalse(os.path.exists(pgdir))
