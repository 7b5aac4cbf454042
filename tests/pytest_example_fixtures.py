"""
The pytest example of doc/howto/testing.md (its code blocks are kept
identical to this file by tests/test_howto_testing.py): SQLAlchemy's "join a Session
into an external transaction" recipe as pytest fixtures, with fiber fixtures
at session, module and function scope.
"""

# --- example: pytest fixtures
import pytest
from sqlalchemy import create_engine, func, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from txfiberdb.testing import create_database, drop_database, dsn_to_url, fiber_fixture


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "item"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str]


@pytest.fixture(scope="session")
def database_url():
    """A database of its own for this test session (plain set-up code)."""
    dsn = create_database()
    yield dsn_to_url(dsn)
    drop_database(dsn)


@fiber_fixture(scope="session")
def engine(database_url):
    """One engine, and the schema, for the whole session."""
    engine = create_engine(database_url, pool_size=5)
    Base.metadata.create_all(engine)
    yield engine
    engine.dispose()


@fiber_fixture
def connection(engine):
    """A connection and a transaction per test, rolled back after it."""
    with engine.connect() as connection:
        transaction = connection.begin()
        yield connection
        transaction.rollback()


@fiber_fixture
def session(connection):
    """A Session joined to the test's transaction: its commits are savepoints."""
    with Session(bind=connection, join_transaction_mode="create_savepoint") as session:
        yield session


@pytest.mark.fiber
def test_session_commits_inside_the_test_transaction(session, connection):
    session.add(Item(name="spoon"))
    session.commit()  # releases a savepoint; the test's transaction goes on
    assert session.scalar(select(func.count(Item.id))) == 1
    assert connection.scalar(select(func.count(Item.id))) == 1  # the same one


@pytest.mark.fiber
def test_each_test_starts_empty(session):
    assert session.scalar(select(func.count(Item.id))) == 0


# --- end example


def backend_pid(conn):
    return conn.execute(text("SELECT pg_backend_pid()")).scalar()


def transaction_id(conn):
    return conn.execute(text("SELECT txid_current()")).scalar()


@fiber_fixture
def seen_by_fixture(connection):
    """The backend and transaction the connection fixture's fiber sees."""
    return backend_pid(connection), transaction_id(connection)


@pytest.mark.fiber
def test_fixture_and_test_share_one_connection(session, connection, seen_by_fixture):
    assert (backend_pid(connection), transaction_id(connection)) == seen_by_fixture
    assert (
        backend_pid(session.connection()),
        transaction_id(session.connection()),
    ) == seen_by_fixture
    assert session.connection().connection.dbapi_connection is (
        connection.connection.dbapi_connection
    )


# Module scope: one connection and transaction for the tests of a class,
# each test in a savepoint of its own.


@fiber_fixture(scope="module")
def module_connection(engine):
    with engine.connect() as connection:
        transaction = connection.begin()
        yield connection
        transaction.rollback()


@fiber_fixture
def nested_session(module_connection):
    savepoint = module_connection.begin_nested()
    with Session(bind=module_connection, join_transaction_mode="create_savepoint") as s:
        yield s
    savepoint.rollback()


class TestModuleScope:
    pids: list = []

    @pytest.mark.fiber
    def test_first(self, nested_session, module_connection):
        self.pids.append(backend_pid(module_connection))
        nested_session.add(Item(name="fork"))
        nested_session.commit()
        assert nested_session.scalar(select(func.count(Item.id))) == 1

    @pytest.mark.fiber
    def test_second_sees_the_same_backend_and_no_rows(self, nested_session, module_connection):
        self.pids.append(backend_pid(module_connection))
        assert len(set(self.pids)) == 1, self.pids
        assert nested_session.scalar(select(func.count(Item.id))) == 0

    def test_unmarked_test_gets_fiber_fixture_values(self, module_connection):
        # The fixture ran in its fiber; the value is an ordinary object.
        assert module_connection.in_transaction()


@fiber_fixture(scope="class")
def class_pid(engine):
    with engine.connect() as c:
        yield backend_pid(c)


class TestMethodFixtures:
    @fiber_fixture
    def doubled(self, class_pid):
        return class_pid * 2

    def test_method_fiber_fixture(self, doubled, class_pid):
        assert doubled == 2 * class_pid


@pytest.mark.fiber
def test_rollback_left_nothing(engine):
    """On a connection of its own, nothing written by the tests above stays."""
    with engine.connect() as c:
        assert c.scalar(select(func.count(Item.id))) == 0
