"""
klein_demo: a small shop service built on txfiberdb (a *user* of the
library, not part of it).

Products with stock, customers, orders with order lines, as ordinary
SQLAlchemy ORM models used with the ordinary synchronous API in Klein
routes; each request runs in a fiber with a Session of its own.

Run it with ``twistd -n klein-demo`` (see :mod:`klein_demo.tap`).
"""
