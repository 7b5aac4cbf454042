# -*- test-case-name: tests.test_demo -*-
"""
The shop's models: plain SQLAlchemy 2.0 declarative classes.  Nothing here
knows about fibers or Twisted.
"""

from __future__ import annotations

import datetime

from sqlalchemy import (
    CheckConstraint,
    DateTime,
    ForeignKey,
    Integer,
    String,
    Text,
    func,
    select,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

__all__ = [
    "Base",
    "Customer",
    "Order",
    "OrderLine",
    "Product",
    "create_schema",
    "load_sample_data",
]


class Base(DeclarativeBase):
    pass


class Product(Base):
    __tablename__ = "products"
    __table_args__ = (
        CheckConstraint("price_cents >= 0", name="price_not_negative"),
        CheckConstraint("stock >= 0", name="stock_not_negative"),
    )

    # eager_defaults: server-side defaults (timestamps) come back with the
    # INSERT/UPDATE (RETURNING) instead of a later SELECT.
    __mapper_args__ = {"eager_defaults": True}

    id: Mapped[int] = mapped_column(primary_key=True)
    sku: Mapped[str] = mapped_column(String(32), unique=True)
    name: Mapped[str] = mapped_column(String(200), index=True)
    description: Mapped[str] = mapped_column(Text, default="")
    price_cents: Mapped[int] = mapped_column(Integer)
    stock: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime.datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )
    updated_at: Mapped[datetime.datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), onupdate=func.now()
    )

    def __repr__(self) -> str:
        return f"<Product {self.id} {self.sku!r} stock={self.stock}>"


class Customer(Base):
    __tablename__ = "customers"
    __mapper_args__ = {"eager_defaults": True}

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    email: Mapped[str] = mapped_column(String(254), unique=True)
    created_at: Mapped[datetime.datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )

    orders: Mapped[list[Order]] = relationship(
        back_populates="customer", order_by="Order.id"
    )


class Order(Base):
    __tablename__ = "orders"
    __mapper_args__ = {"eager_defaults": True}

    id: Mapped[int] = mapped_column(primary_key=True)
    customer_id: Mapped[int] = mapped_column(
        ForeignKey("customers.id", ondelete="RESTRICT"), index=True
    )
    status: Mapped[str] = mapped_column(String(20), default="placed")
    total_cents: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime.datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )

    customer: Mapped[Customer] = relationship(back_populates="orders")
    lines: Mapped[list[OrderLine]] = relationship(
        back_populates="order", order_by="OrderLine.id", cascade="all, delete-orphan"
    )


class OrderLine(Base):
    __tablename__ = "order_lines"
    __table_args__ = (CheckConstraint("quantity > 0", name="quantity_positive"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    order_id: Mapped[int] = mapped_column(
        ForeignKey("orders.id", ondelete="CASCADE"), index=True
    )
    product_id: Mapped[int] = mapped_column(
        ForeignKey("products.id", ondelete="RESTRICT"), index=True
    )
    quantity: Mapped[int] = mapped_column(Integer)
    unit_price_cents: Mapped[int] = mapped_column(Integer)

    order: Mapped[Order] = relationship(back_populates="lines")
    product: Mapped[Product] = relationship()


def create_schema(engine: object) -> None:
    """Create the tables that do not exist yet (blocking-looking: in a fiber)."""
    Base.metadata.create_all(engine)  # type: ignore[arg-type]


SAMPLE_PRODUCTS = [
    # sku, name, price in cents, stock
    ("CUP-ESP", "Espresso cup", 650, 120),
    ("CUP-LAT", "Latte mug", 1290, 80),
    ("BEAN-ETH", "Ethiopia Yirgacheffe beans, 250 g", 1450, 40),
    ("BEAN-COL", "Colombia Huila beans, 250 g", 1190, 55),
    ("BEAN-DEC", "Decaf Swiss Water beans, 250 g", 1250, 25),
    ("GRIND-HND", "Hand grinder", 8900, 12),
    ("GRIND-ELC", "Electric burr grinder", 23900, 6),
    ("KETTLE-GN", "Gooseneck kettle", 5400, 18),
    ("DRIP-V60", "Pour-over dripper", 2450, 30),
    ("FILTER-100", "Paper filters, 100 pcs", 690, 200),
    ("PRESS-FR", "French press, 1 l", 3990, 15),
    ("SCALE-01", "Coffee scale with timer", 4490, 20),
    ("TAMP-58", "Tamper, 58 mm", 2990, 9),
    ("MOKA-6", "Moka pot, 6 cups", 3490, 14),
    ("TEA-GRN", "Sencha green tea, 100 g", 890, 60),
    ("TEA-BLK", "Assam black tea, 100 g", 790, 70),
    ("TIN-500", "Airtight storage tin", 1990, 35),
    ("THERMO-05", "Travel thermos, 0.5 l", 2790, 22),
    ("BRUSH-01", "Grinder cleaning brush", 490, 90),
    ("GIFT-CARD", "Gift card", 2500, 1000),
]

SAMPLE_CUSTOMERS = [
    ("Ada Lovelace", "ada@example.com"),
    ("Alan Turing", "alan@example.com"),
    ("Grace Hopper", "grace@example.com"),
    ("Edsger Dijkstra", "edsger@example.com"),
    ("Barbara Liskov", "barbara@example.com"),
]


def load_sample_data(session: Session) -> bool:
    """
    Add sample products, customers and two orders, unless there are products
    already.  Returns whether it added anything.  The caller commits.
    """
    if session.scalar(select(func.count()).select_from(Product)):
        return False
    products = [
        Product(sku=sku, name=name, description="", price_cents=price, stock=stock)
        for sku, name, price, stock in SAMPLE_PRODUCTS
    ]
    customers = [Customer(name=name, email=email) for name, email in SAMPLE_CUSTOMERS]
    session.add_all(products)
    session.add_all(customers)
    session.flush()
    for customer, picks in (
        (customers[0], [(products[0], 2), (products[2], 1)]),
        (customers[1], [(products[5], 1)]),
    ):
        order = Order(customer=customer, total_cents=0)
        for product, quantity in picks:
            product.stock -= quantity
            order.lines.append(
                OrderLine(
                    product=product,
                    quantity=quantity,
                    unit_price_cents=product.price_cents,
                )
            )
            order.total_cents += quantity * product.price_cents
        session.add(order)
    session.flush()
    return True
