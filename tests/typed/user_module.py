"""
A user's module, typed: ``mypy --strict`` must pass on it (tests.test_typing).
It uses txfiberdb's public API the way an application does.
"""

from __future__ import annotations

from sqlalchemy import create_engine, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from twisted.internet.defer import Deferred

import txfiberdb
from txfiberdb.service import EngineService


class Base(DeclarativeBase):
    pass


class Product(Base):
    __tablename__ = "products"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str]


engine = create_engine("postgresql+txpostgres://app@localhost/shop")


def stock_of(product_id: int, default: int = 0) -> int:
    with Session(engine) as session:
        product = session.get(Product, product_id)
        return default if product is None else product.id


@txfiberdb.fibered
def names(limit: int) -> list[str]:
    with Session(engine) as session:
        return list(session.scalars(select(Product.name).limit(limit)))


def main() -> Deferred[int]:
    d: Deferred[int] = txfiberdb.run_in_fiber(stock_of, 42, default=1)
    also: Deferred[list[str]] = names(10)
    also.addCallback(lambda found: len(found))
    return d


def from_a_script() -> int:
    return txfiberdb.run_blocking(stock_of, 42)


def in_a_service(db: EngineService) -> Deferred[int]:
    return db.run(stock_of, 7, default=0)


class ShopSession(Session):
    pass


Scoped = txfiberdb.fiber_scoped_session(sessionmaker(engine, class_=ShopSession))


def scoped_session_type() -> ShopSession:
    session: ShopSession = Scoped()
    return session


def in_a_fiber() -> int:
    txfiberdb.sleep(0.1)
    value: int = txfiberdb.await_deferred(main(), timeout=5.0)
    with txfiberdb.shield():
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    return value
