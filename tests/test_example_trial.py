"""
The trial example of doc/howto/testing.md (its code blocks are kept
identical to this file by tests/test_howto_testing.py): an engine shared by the tests
of a module, SQLAlchemy's transaction-per-test recipe in a FiberTestCase, and
a plain trial TestCase that runs its database work with run_in_fiber.
"""

# --- example: trial
from sqlalchemy import create_engine, func, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from twisted.trial.unittest import TestCase

from txfiberdb import run_in_fiber
from txfiberdb.testing import FiberTestCase, create_database, dsn_to_url


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "item"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str]


# One database and one engine for all the tests of this module, made when
# trial imports it (trial has no setUpClass). Idle pooled connections may
# stay between tests: no engine.dispose() needed.
engine = create_engine(dsn_to_url(create_database()), pool_size=5)


class ItemTests(FiberTestCase):
    """setUp, each test and tearDown run in one fiber, as plain code."""

    def setUp(self):
        Base.metadata.create_all(engine)
        self.connection = engine.connect()
        self.transaction = self.connection.begin()
        self.session = Session(
            bind=self.connection, join_transaction_mode="create_savepoint"
        )

    def tearDown(self):
        self.session.close()
        self.transaction.rollback()  # whatever the test wrote is gone
        self.connection.close()

    def test_add(self):
        self.session.add(Item(name="cup"))
        self.session.commit()  # releases a savepoint: the test's transaction goes on
        self.assertEqual(self.session.scalar(select(func.count(Item.id))), 1)

    def test_starts_empty(self):
        self.assertEqual(self.session.scalar(select(func.count(Item.id))), 0)


class PlainTrialTests(TestCase):
    """A plain trial TestCase: database work goes through run_in_fiber."""

    def test_count(self):
        def count():
            Base.metadata.create_all(engine)
            with Session(engine) as session:
                return session.scalar(select(func.count(Item.id)))

        return run_in_fiber(count).addCallback(self.assertEqual, 0)
# --- end example
