# -*- test-case-name: tests.test_demo -*-
"""
The shop's HTTP API: Klein routes over the models of :mod:`klein_demo.models`.

The GET routes are declared ``read_only``: with ``--replica`` they read on a
streaming replica (on the primary once they write, or when no replica
answers).  Every database route is ordinary synchronous SQLAlchemy code; txfiberdb runs
each request in a fiber with a Session of its own (committed when the route
returns, rolled back when it raises) and turns errors into JSON answers.

Routes (JSON in and out; prices are integer cents, also given as a decimal
string in ``price``/``total``):

======  ===============================  =====================================
GET     /                                the live page (HTML); with
                                         ``Accept: application/json``, the
                                         route list
GET     /routes                          the route list (JSON)
GET     /events                          Server-Sent Events: stock changes
                                         and new orders as they commit
                                         (klein_demo.live)
GET     /stats                           pool, fiber and listener figures
GET     /products                        ``limit``, ``offset``, ``q`` (name
                                         contains), ``min_price_cents``,
                                         ``max_price_cents``, ``in_stock``,
                                         ``sort`` (id, name, price, stock;
                                         ``-`` for descending)
POST    /products                        201, ``Location``
GET     /products/<id>
PUT     /products/<id>                   all fields
PATCH   /products/<id>                   some fields
DELETE  /products/<id>                   204; 409 if it is in orders
GET     /customers                       ``limit``, ``offset``
POST    /customers                       201
GET     /customers/<id>
GET     /customers/<id>/orders           ``limit``, ``offset``; eager loading
POST    /orders                          201; locks and decrements stock in
                                         one transaction; 409 if short
GET     /orders/<id>                     lazy loading
GET     /test                            ``seconds`` (default 0.1, at most
                                         10): ``SELECT pg_sleep(seconds)``;
                                         at most ``slow_route_concurrency``
                                         at once (others wait up to 5 s, then
                                         503), so it cannot starve the shop
GET     /health/live                     liveness: never touches the database
GET     /health/ready                    readiness: 200 when the database
                                         answers (own connection, 1 s bound,
                                         1 s cache), else 503 with the reason
GET     /health                          readiness with pool figures
GET     /metrics                         Prometheus text format (this
                                         worker's, with --workers N)
======  ===============================  =====================================
"""

from __future__ import annotations

import json
import uuid
from decimal import Decimal
from time import monotonic as _now
from typing import Any, Optional
from urllib.parse import urlsplit

from klein import Klein
from sqlalchemy import exists, func, select, text
from sqlalchemy.orm import Session, selectinload
from twisted.logger import Logger
from twisted.web import server
from werkzeug.exceptions import HTTPException
from werkzeug.routing import RequestRedirect

from klein_demo.live import (
    add_live_routes,
    announce_deleted,
    announce_order,
    announce_stock,
    live_page,
    wants_json,
)
from klein_demo.metrics import CONTENT_TYPE, Metrics
from klein_demo.models import Customer, Order, OrderLine, Product
from klein_demo.validation import (
    Field,
    check_id,
    query_bool,
    query_choice,
    query_float,
    query_int,
    query_text,
    validate,
    validate_each,
)
from txfiberdb import pool_stats
from txfiberdb.health import ReadinessProbe
from txfiberdb.klein import (
    BadRequest,
    Conflict,
    FiberRoutes,
    LogSummary,
    NotFound,
    read_json,
)
from txfiberdb.service import EngineService

__all__ = ["BoundedRequest", "ShopSite", "make_app", "make_site"]

log = Logger(namespace="klein_demo")

#: The largest JSON body the API accepts (bytes); larger ones get a 413.
MAX_BODY = 64 * 1024
MAX_PAGE = 100
MAX_ORDER_LINES = 50
MAX_QUANTITY = 1000
MAX_PRICE_CENTS = 100_000_000  # one million in money
MAX_STOCK = 1_000_000
MAX_SLEEP = 10.0

PRODUCT_FIELDS = {
    "sku": Field(
        "str",
        max_length=32,
        pattern=r"[A-Za-z0-9._-]+",
        pattern_help="must be letters, digits, '.', '_' or '-'",
    ),
    "name": Field("str", max_length=200),
    "description": Field(
        "str", required=False, min_length=0, max_length=2000, default=""
    ),
    "price_cents": Field("int", minimum=0, maximum=MAX_PRICE_CENTS),
    "stock": Field("int", required=False, minimum=0, maximum=MAX_STOCK, default=0),
}
CUSTOMER_FIELDS = {
    "name": Field("str", max_length=200),
    "email": Field("email", max_length=254),
}
ORDER_FIELDS = {
    "customer_id": Field("id"),
    "lines": Field("list"),
}
LINE_FIELDS = {
    "product_id": Field("id"),
    "quantity": Field("int", minimum=1, maximum=MAX_QUANTITY),
}
SORTS = {
    "id": Product.id,
    "name": Product.name,
    "price": Product.price_cents,
    "stock": Product.stock,
}


def money(cents: int) -> str:
    return str((Decimal(cents) / 100).quantize(Decimal("0.01")))


def product_json(p: Product) -> dict[str, Any]:
    return {
        "id": p.id,
        "sku": p.sku,
        "name": p.name,
        "description": p.description,
        "price_cents": p.price_cents,
        "price": money(p.price_cents),
        "stock": p.stock,
        "created_at": p.created_at,
        "updated_at": p.updated_at,
    }


def customer_json(c: Customer) -> dict[str, Any]:
    return {"id": c.id, "name": c.name, "email": c.email, "created_at": c.created_at}


def order_json(o: Order) -> dict[str, Any]:
    return {
        "id": o.id,
        "customer_id": o.customer_id,
        "status": o.status,
        "total_cents": o.total_cents,
        "total": money(o.total_cents),
        "created_at": o.created_at,
        "lines": [
            {
                "product_id": line.product_id,
                "sku": line.product.sku,
                "name": line.product.name,
                "quantity": line.quantity,
                "unit_price_cents": line.unit_price_cents,
                "line_total_cents": line.quantity * line.unit_price_cents,
            }
            for line in o.lines
        ],
    }


def page(request: Any) -> tuple[int, int]:
    limit = query_int(request, "limit", 20, 1, MAX_PAGE)
    offset = query_int(request, "offset", 0, 0, 10_000_000)
    assert limit is not None and offset is not None
    return limit, offset


def created(request: Any, location: str) -> None:
    request.setResponseCode(201)
    request.setHeader(b"location", location.encode("ascii"))


def make_app(
    db: EngineService,
    metrics: Optional[Metrics] = None,
    probe: Optional[ReadinessProbe] = None,
    slow_route_concurrency: int = 5,
    heartbeat: float = 15.0,
    max_streams: int = 10_000,
) -> Klein:
    """
    The shop's Klein app, serving from ``db``'s fibers and pool.

    :param probe: the readiness probe of ``/health`` and ``/health/ready``
        (one is made for ``db`` when not given; close it when done).
    :param slow_route_concurrency: how many ``/test`` requests (which hold a
        connection for up to 10 s) may run at once, so that they cannot
        starve the rest of the shop of connections.
    :param heartbeat: seconds between keep-alive comments on ``/events``.
    :param max_streams: ``/events`` streams open at once (more get a 503).
    """
    app = Klein()
    metrics = metrics if metrics is not None else Metrics()
    metrics.bind(db)
    probe = probe if probe is not None else ReadinessProbe(db)
    routes = FiberRoutes(db, app, retry_after=1, on_response=metrics.observe)

    # -- products -----------------------------------------------------------

    @routes.route("/products", methods=["GET"], read_only=True)
    def list_products(request: Any, session: Session) -> Any:
        limit, offset = page(request)
        q = query_text(request, "q")
        lo = query_int(request, "min_price_cents", None, 0, MAX_PRICE_CENTS)
        hi = query_int(request, "max_price_cents", None, 0, MAX_PRICE_CENTS)
        in_stock = query_bool(request, "in_stock")
        sort = query_choice(request, "sort", [*SORTS, *(f"-{s}" for s in SORTS)], "id")
        if lo is not None and hi is not None and lo > hi:
            raise BadRequest("min_price_cents must not be above max_price_cents")
        where = []
        if q:
            where.append(Product.name.icontains(q, autoescape=True))
        if lo is not None:
            where.append(Product.price_cents >= lo)
        if hi is not None:
            where.append(Product.price_cents <= hi)
        if in_stock is not None:
            where.append(Product.stock > 0 if in_stock else Product.stock == 0)
        column = SORTS[sort.lstrip("-")]
        order = column.desc() if sort.startswith("-") else column.asc()
        total = session.scalar(select(func.count()).select_from(Product).where(*where))
        items = session.scalars(
            select(Product)
            .where(*where)
            .order_by(order, Product.id)
            .limit(limit)
            .offset(offset)
        ).all()
        return {
            "items": [product_json(p) for p in items],
            "total": total,
            "limit": limit,
            "offset": offset,
        }

    @routes.route("/products/<int:product_id>", methods=["GET"], read_only=True)
    def get_product(request: Any, session: Session, product_id: int) -> Any:
        return product_json(load_product(session, product_id))

    def load_product(session: Session, product_id: int) -> Product:
        check_id(product_id, "product")
        product = session.get(Product, product_id)
        if product is None:
            raise NotFound(f"no product {product_id}")
        return product

    def check_sku_free(
        session: Session, sku: str, product_id: Optional[int] = None
    ) -> None:
        query = select(Product.id).where(Product.sku == sku)
        if product_id is not None:
            query = query.where(Product.id != product_id)
        if session.scalar(query) is not None:
            raise Conflict(f"a product with sku {sku!r} exists already")

    @routes.route("/products", methods=["POST"])
    def create_product(request: Any, session: Session) -> Any:
        values = validate(read_json(request, MAX_BODY), PRODUCT_FIELDS)
        check_sku_free(session, values["sku"])
        product = Product(**values)
        session.add(product)
        session.flush()
        announce_stock(session, [product])
        created(request, f"/products/{product.id}")
        return product_json(product)

    def update_product(
        request: Any, session: Session, product_id: int, partial: bool
    ) -> Any:
        product = load_product(session, product_id)
        values = validate(read_json(request, MAX_BODY), PRODUCT_FIELDS, partial=partial)
        if "sku" in values and values["sku"] != product.sku:
            check_sku_free(session, values["sku"], product_id)
        for name, value in values.items():
            setattr(product, name, value)
        session.flush()
        announce_stock(session, [product])
        return product_json(product)

    @routes.route("/products/<int:product_id>", methods=["PUT"])
    def replace_product(request: Any, session: Session, product_id: int) -> Any:
        return update_product(request, session, product_id, partial=False)

    @routes.route("/products/<int:product_id>", methods=["PATCH"])
    def patch_product(request: Any, session: Session, product_id: int) -> Any:
        return update_product(request, session, product_id, partial=True)

    @routes.route("/products/<int:product_id>", methods=["DELETE"])
    def delete_product(request: Any, session: Session, product_id: int) -> Any:
        product = load_product(session, product_id)
        if session.scalar(select(exists().where(OrderLine.product_id == product_id))):
            raise Conflict(
                f"product {product_id} is in orders and cannot be deleted; "
                f"set its stock to 0 instead"
            )
        session.delete(product)
        announce_deleted(session, product_id)
        request.setResponseCode(204)
        return None

    # -- customers ----------------------------------------------------------

    @routes.route("/customers", methods=["GET"], read_only=True)
    def list_customers(request: Any, session: Session) -> Any:
        limit, offset = page(request)
        total = session.scalar(select(func.count()).select_from(Customer))
        items = session.scalars(
            select(Customer).order_by(Customer.id).limit(limit).offset(offset)
        ).all()
        return {
            "items": [customer_json(c) for c in items],
            "total": total,
            "limit": limit,
            "offset": offset,
        }

    @routes.route("/customers", methods=["POST"])
    def create_customer(request: Any, session: Session) -> Any:
        values = validate(read_json(request, MAX_BODY), CUSTOMER_FIELDS)
        values["email"] = values["email"].lower()
        if session.scalar(select(Customer.id).where(Customer.email == values["email"])):
            raise Conflict(f"a customer with email {values['email']!r} exists already")
        customer = Customer(**values)
        session.add(customer)
        session.flush()
        created(request, f"/customers/{customer.id}")
        return customer_json(customer)

    def load_customer(session: Session, customer_id: int) -> Customer:
        check_id(customer_id, "customer")
        customer = session.get(Customer, customer_id)
        if customer is None:
            raise NotFound(f"no customer {customer_id}")
        return customer

    @routes.route("/customers/<int:customer_id>", methods=["GET"], read_only=True)
    def get_customer(request: Any, session: Session, customer_id: int) -> Any:
        customer = load_customer(session, customer_id)
        body = customer_json(customer)
        body["order_count"] = session.scalar(
            select(func.count())
            .select_from(Order)
            .where(Order.customer_id == customer_id)
        )
        return body

    @routes.route(
        "/customers/<int:customer_id>/orders", methods=["GET"], read_only=True
    )
    def customer_orders(request: Any, session: Session, customer_id: int) -> Any:
        limit, offset = page(request)
        load_customer(session, customer_id)
        total = session.scalar(
            select(func.count())
            .select_from(Order)
            .where(Order.customer_id == customer_id)
        )
        # Eager loading: the orders, then all their lines with their products
        # in one more query (selectinload + joinedload): three queries in all,
        # however many orders.
        orders = session.scalars(
            select(Order)
            .where(Order.customer_id == customer_id)
            .options(selectinload(Order.lines).joinedload(OrderLine.product))
            .order_by(Order.id.desc())
            .limit(limit)
            .offset(offset)
        ).all()
        return {
            "items": [order_json(o) for o in orders],
            "total": total,
            "limit": limit,
            "offset": offset,
        }

    # -- orders -------------------------------------------------------------

    # shield=True: once an order is being placed it is completed even if the
    # client goes away (the client finds it in GET /customers/<id>/orders),
    # instead of being cancelled half-way like the other routes.
    @routes.route("/orders", methods=["POST"], shield=True)
    def place_order(request: Any, session: Session) -> Any:
        body = validate(read_json(request, MAX_BODY), ORDER_FIELDS)
        raw_lines = body["lines"]
        if not raw_lines:
            raise BadRequest(
                "invalid input: lines must not be empty",
                details={"lines": "must not be empty"},
            )
        if len(raw_lines) > MAX_ORDER_LINES:
            raise BadRequest(
                f"invalid input: lines must have at most {MAX_ORDER_LINES} entries",
                details={"lines": f"must have at most {MAX_ORDER_LINES} entries"},
            )
        wanted: dict[int, int] = {}
        for line in validate_each(raw_lines, LINE_FIELDS, "lines"):
            wanted[line["product_id"]] = (
                wanted.get(line["product_id"], 0) + line["quantity"]
            )
        if any(q > MAX_QUANTITY for q in wanted.values()):
            raise BadRequest(
                f"invalid input: at most {MAX_QUANTITY} of a product per order"
            )
        customer = session.get(Customer, body["customer_id"])
        if customer is None:
            raise BadRequest(
                f"invalid input: no customer {body['customer_id']}",
                details={"customer_id": "does not exist"},
            )
        # Lock the rows in id order (two orders for the same products never
        # deadlock), then check and decrement: SELECT ... FOR UPDATE makes a
        # concurrent order for the same products wait for this transaction.
        products = {
            p.id: p
            for p in session.scalars(
                select(Product)
                .where(Product.id.in_(sorted(wanted)))
                .order_by(Product.id)
                .with_for_update()
            )
        }
        missing = sorted(set(wanted) - set(products))
        if missing:
            raise BadRequest(
                f"invalid input: no product {', '.join(map(str, missing))}",
                details={"missing_products": missing},
            )
        short = [
            {"product_id": pid, "requested": qty, "available": products[pid].stock}
            for pid, qty in sorted(wanted.items())
            if products[pid].stock < qty
        ]
        if short:
            raise Conflict(
                "insufficient stock for "
                + ", ".join(
                    f"product {s['product_id']} ({s['requested']} requested, "
                    f"{s['available']} available)"
                    for s in short
                ),
                details={"insufficient_stock": short},
            )
        order = Order(customer=customer, status="placed", total_cents=0)
        for pid, qty in wanted.items():
            product = products[pid]
            product.stock -= qty
            order.lines.append(
                OrderLine(
                    product=product, quantity=qty, unit_price_cents=product.price_cents
                )
            )
            order.total_cents += qty * product.price_cents
        session.add(order)
        session.flush()
        # Announced at COMMIT, in commit order; a rollback announces nothing.
        announce_stock(session, list(products.values()))
        announce_order(session, order)
        created(request, f"/orders/{order.id}")
        return order_json(order)

    @routes.route("/orders/<int:order_id>", methods=["GET"], read_only=True)
    def get_order(request: Any, session: Session, order_id: int) -> Any:
        check_id(order_id, "order")
        order = session.get(Order, order_id)
        if order is None:
            raise NotFound(f"no order {order_id}")
        # Lazy loading: order.lines, then each line's product, are loaded on
        # first access, each a query that parks this fiber.
        return order_json(order)

    # -- the rest -----------------------------------------------------------

    @routes.route("/test", methods=["GET"], concurrency=slow_route_concurrency)
    def test(request: Any, session: Session) -> Any:
        seconds = query_float(request, "seconds", 0.1, 0.0, MAX_SLEEP)
        session.execute(text("SELECT pg_sleep(:seconds)"), {"seconds": seconds})
        return {"slept": seconds}

    def pool_json() -> dict[str, Any]:
        stats = pool_stats(db.engine) if db.engine is not None else {}
        return {
            "pool_size": stats.get("size"),
            **{
                k: stats.get(k)
                for k in ("open", "checked_out", "idle", "overflow", "waiting")
            },
        }

    def json_response(request: Any, code: int, body: dict[str, Any]) -> bytes:
        request.setResponseCode(code)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return json.dumps(body).encode()

    def readiness(request: Any, name: str, extra: bool) -> Any:
        # Runs on the reactor, not in a fiber, and takes no pool slot: the
        # probe has its own connection, a bounded check and a short cache.
        started = _now()
        if not db.accepting:
            metrics.observe(name, 503, _now() - started)
            return json_response(request, 503, {"status": "stopping"})

        def answer(result: Any) -> bytes:
            body = result.to_json()
            if extra:
                body = {
                    "status": "ok" if result.ready else "unavailable",
                    "database": body,
                    "inflight": db.inflight,
                    "pool": pool_json(),
                }
            code = 200 if result.ready else 503
            if not result.ready:
                request.setHeader(b"retry-after", b"1")
            metrics.observe(name, code, _now() - started)
            return json_response(request, code, body)

        return probe.check().addCallback(answer)

    @app.route("/health/live", methods=["GET"])
    def health_live(request: Any) -> Any:
        # Liveness: the process serves HTTP.  Never touches the database,
        # so an outage does not get the process restarted.
        metrics.observe("health_live", 200, 0.0)
        return json_response(request, 200, {"status": "live"})

    @app.route("/health/ready", methods=["GET"])
    def health_ready(request: Any) -> Any:
        return readiness(request, "health_ready", extra=False)

    @app.route("/health", methods=["GET"])
    def health(request: Any) -> Any:
        # Readiness with the pool's figures, for a person or a load balancer.
        return readiness(request, "health", extra=True)

    @app.route("/metrics", methods=["GET"])
    def metrics_route(request: Any) -> Any:
        started = _now()
        request.setHeader(b"content-type", CONTENT_TYPE)
        body = metrics.render()
        metrics.observe("metrics", 200, _now() - started)
        return body

    add_live_routes(app, routes, db, heartbeat=heartbeat, max_streams=max_streams)

    @app.route("/", methods=["GET"])
    def index(request: Any) -> Any:
        # A person gets the live page; an API client asking for JSON the
        # route list (also at /routes).
        if not wants_json(request):
            return live_page(request)
        return route_list(request)

    @app.route("/routes", methods=["GET"])
    def route_list(request: Any) -> Any:
        request.setHeader(b"content-type", b"application/json")
        rules = sorted(
            (rule.rule, sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}))
            for rule in app.url_map.iter_rules()
        )
        return json.dumps(
            {
                "service": "klein-demo",
                "routes": [f"{' '.join(m)} {r}" for r, m in rules],
            },
            indent=1,
        ).encode()

    @app.handle_errors(HTTPException)
    def http_error(request: Any, failure: Any) -> Any:
        # Klein's own answers (no such route, method not allowed, a redirect
        # to the canonical URL) as JSON.
        error = failure.value
        request.setResponseCode(error.code or 500)
        request.setHeader(b"content-type", b"application/json")
        valid = getattr(error, "valid_methods", None)
        if valid:
            request.setHeader(b"allow", ", ".join(valid).encode())
        if isinstance(error, RequestRedirect):
            # werkzeug builds new_url from the request's Host header: send
            # only its path (a relative Location) and never echo the Host.
            target = urlsplit(error.new_url)
            location = target.path + (f"?{target.query}" if target.query else "")
            request.setHeader(b"location", location.encode("ascii", "replace"))
            return json.dumps({"error": "moved", "location": location}).encode()
        message = {404: "no such route", 405: "method not allowed"}.get(
            error.code, error.description
        )
        return json.dumps({"error": message}).encode()

    @app.handle_errors(Exception)
    def unexpected(request: Any, failure: Any) -> Any:
        error_id = uuid.uuid4().hex[:16]
        log.failure(
            "error {error_id} in {uri}",
            failure,
            error_id=error_id,
            uri=request.uri.decode("ascii", "replace"),
        )
        request.setResponseCode(500)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(
            {"error": "internal server error", "error_id": error_id}
        ).encode()

    app.metrics = metrics  # type: ignore[attr-defined]
    app.probe = probe  # type: ignore[attr-defined]
    return app


class BoundedRequest(server.Request):
    """
    A Request that keeps at most ``max_body + 1`` bytes of a body (the rest is
    read and dropped), so that an oversized upload costs no memory or disk;
    :func:`txfiberdb.klein.read_json` then answers 413.
    """

    max_body = MAX_BODY

    def gotLength(self, length: Optional[int]) -> None:
        self._kept = 0
        if length is not None:
            length = min(length, self.max_body + 1)
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        room = self.max_body + 1 - self._kept
        if room > 0:
            chunk = data[:room]
            self._kept += len(chunk)
            super().handleContentChunk(chunk)


class ShopSite(server.Site):
    """
    A Site whose access log summarises 503 answers: during an outage every
    request gets one, and a line each would flood the log.  The first 503 of
    a route is logged as usual, the next ones within ``summary.interval``
    seconds are counted into the next line logged for it.
    """

    summary = LogSummary(10.0)

    def log(self, request: Any) -> None:
        if request.code != 503:
            super().log(request)
            return
        repeats = self.summary.admit(request.path)
        if repeats is None:
            return
        log_file = self._logFile
        if log_file is not None:
            line = self._logFormatter(self._logDateTime, request)  # type: ignore[call-arg]
            log_file.write(line + self.summary.suffix(repeats) + "\n")


def make_site(app: Klein, max_body: int = MAX_BODY) -> server.Site:
    """A twisted.web Site for ``app`` whose requests keep bounded bodies."""
    request_factory = type("Request", (BoundedRequest,), {"max_body": max_body})
    site = ShopSite(app.resource(), requestFactory=request_factory)
    site.summary = LogSummary(10.0)
    site.displayTracebacks = False
    return site
