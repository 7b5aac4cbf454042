"""
The dialect under pytest-twisted, through the plugin's fiber marker and
fixtures: what a user's pytest suite looks like.
"""

import pytest
from sqlalchemy import create_engine, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from twisted.internet import task

from txfiberdb import pool_stats, run_in_fiber


class Base(DeclarativeBase):
    pass


class Note(Base):
    __tablename__ = "note"
    id: Mapped[int] = mapped_column(primary_key=True)
    body: Mapped[str]


@pytest.fixture
def engine(fresh_database_dsn):
    from txfiberdb.testing import dsn_to_url

    engine = create_engine(dsn_to_url(fresh_database_dsn), pool_size=3)
    yield engine
    engine.dispose()


@pytest.mark.fiber
def test_orm_in_a_fiber(engine):
    Base.metadata.create_all(engine)
    with Session(engine) as s:
        s.add_all([Note(body="one"), Note(body="two")])
        s.commit()
    with Session(engine) as s:
        assert s.scalars(select(Note.body).order_by(Note.id)).all() == ["one", "two"]
    assert pool_stats(engine)["checked_out"] == 0


@pytest.mark.fiber
def test_concurrent_fibers_share_the_reactor(engine):
    from twisted.internet import reactor
    from twisted.internet.defer import gatherResults

    from txfiberdb import await_deferred

    ticks = []
    loop = task.LoopingCall(lambda: ticks.append(1))
    loop.start(0.01)
    try:

        def sleeper():
            with engine.connect() as c:
                return c.execute(text("SELECT pg_sleep(0.2), 1")).all()

        results = await_deferred(gatherResults([run_in_fiber(sleeper) for _ in range(3)]))
    finally:
        loop.stop()
    assert results == [[("", 1)]] * 3
    # Three 0.2 s queries in parallel on three connections; the reactor
    # meanwhile kept ticking.
    assert len(ticks) > 5
    assert reactor.running


def test_engine_outside_fiber_fails_clearly(engine):
    from txfiberdb import NotInFiberError

    with pytest.raises(NotInFiberError):
        engine.connect()
