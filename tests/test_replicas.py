"""
Reads on a real streaming replica (``pg_basebackup -R`` of a throwaway
primary, on a second port): routing, read-your-writes, fail-over to the
primary when the replica stops, recovery when it returns.
"""

from klein import Klein
from twisted.web.server import Site
from sqlalchemy import Column, Integer, String, select, text
from sqlalchemy.orm import DeclarativeBase

from txfiberdb import await_deferred, sleep
from txfiberdb.klein import FiberRoutes
from txfiberdb.service import EngineService
from txfiberdb.testing import FiberTestCase, TemporaryPostgres, TemporaryReplica

from .test_klein import HTTPClient, HTTPServer, wait_until

_pair = []


def primary_and_replica():
    """One primary and its replica for this module (removed at exit)."""
    if not _pair:
        primary = TemporaryPostgres().start()
        _pair.extend([primary, TemporaryReplica(primary).start()])
    return _pair


class Base(DeclarativeBase):
    pass


class Note(Base):
    __tablename__ = "replicated_note"
    id = Column(Integer, primary_key=True)
    body = Column(String(50), nullable=False)


IN_RECOVERY = text("SELECT pg_is_in_recovery()")


class ReplicaTestCase(FiberTestCase):
    def setUp(self):
        self.primary, self.replica = primary_and_replica()
        self.db = EngineService(
            self.primary.url(),
            replicas=[self.replica.url()],
            replica_retry=0.2,
            pool_size=2,
        )
        self.db.startService()
        self.addCleanup(lambda: await_deferred(self.db.stopService()))
        with self.db.engine.begin() as conn:
            Base.metadata.create_all(conn)
        self.caught_up()

    def caught_up(self):
        """Wait (parked) until the replica has replayed the primary's WAL so far."""
        with self.db.engine.connect() as conn:
            lsn = conn.scalar(text("SELECT pg_current_wal_insert_lsn()::text"))
        replica = self.db.router.replicas[0]

        def replayed():
            with replica.connect() as conn:
                return conn.scalar(
                    text("SELECT pg_last_wal_replay_lsn() >= CAST(:lsn AS pg_lsn)"),
                    {"lsn": lsn},
                )

        wait_until(replayed, what="the replica caught up")


class RoutingTests(ReplicaTestCase):
    def test_reads_on_the_replica_writes_on_the_primary(self):
        with self.db.read_sessionmaker() as session:
            self.assertIs(session.scalar(IN_RECOVERY), True)
        with self.db.sessionmaker() as session:
            self.assertIs(session.scalar(IN_RECOVERY), False)
        self.assertGreaterEqual(self.db.router.stats["replica"], 1)

    def test_a_unit_of_work_that_wrote_reads_its_writes(self):
        with self.db.read_sessionmaker() as session:
            self.assertIs(session.scalar(IN_RECOVERY), True)
            session.add(Note(body="mine"))
            session.flush()
            # From the first write on, everything goes to the primary: the
            # row not yet committed is seen.
            self.assertIs(session.scalar(IN_RECOVERY), False)
            self.assertEqual(
                session.scalar(select(Note.body).where(Note.body == "mine")), "mine"
            )
            session.commit()
        self.caught_up()
        with self.db.read_sessionmaker() as session:
            self.assertIs(session.scalar(IN_RECOVERY), True)
            self.assertEqual(
                session.scalar(select(Note.body).where(Note.body == "mine")), "mine"
            )

    def test_locking_reads_go_to_the_primary(self):
        with self.db.read_sessionmaker() as session:
            # A replica cannot lock rows: SELECT ... FOR UPDATE is a write.
            session.execute(select(Note).with_for_update()).all()
            self.assertIs(session.scalar(IN_RECOVERY), False)
        with self.db.read_sessionmaker() as session:
            session.execute(text("SELECT 1 FROM replicated_note FOR SHARE")).all()
            self.assertIs(session.scalar(IN_RECOVERY), False)

    def test_a_read_only_route(self):
        app = Klein()
        routes = FiberRoutes(self.db, app)

        @routes.route("/where", read_only=True)
        def where(request, session):
            return {"replica": session.scalar(IN_RECOVERY)}

        @routes.route("/where-primary")
        def where_primary(request, session):
            return {"replica": session.scalar(IN_RECOVERY)}

        server = HTTPServer(self, Site(app.resource()))
        http = HTTPClient(self, server.base)
        self.assertEqual(http.get("/where").json, {"replica": True})
        self.assertEqual(http.get("/where-primary").json, {"replica": False})


class FailoverTests(ReplicaTestCase):
    def test_reads_fall_back_to_the_primary_and_come_back(self):
        stats = self.db.router.stats
        with self.db.read_sessionmaker() as session:
            self.assertIs(session.scalar(IN_RECOVERY), True)
        # Blocking, in a drill: pg_ctl stop takes a fraction of a second.
        self.replica.stop_server()
        try:
            before = stats["fallback"]
            with self.db.read_sessionmaker() as session:
                self.assertIs(session.scalar(IN_RECOVERY), False)
            self.assertEqual(stats["fallback"], before + 1)
            self.assertEqual(self.db.router.replicas_down(), 1)
        finally:
            self.replica.start_server()

        def on_replica():
            sleep(0.05)
            with self.db.read_sessionmaker() as session:
                return session.scalar(IN_RECOVERY) is True

        wait_until(on_replica, what="reads back on the replica")
        self.assertEqual(self.db.router.replicas_down(), 0)

    def test_plain_engines_without_the_service(self):
        from sqlalchemy import create_engine
        from sqlalchemy.orm import sessionmaker

        from txfiberdb import ReplicaRouter, RoutingSession

        primary = create_engine(self.primary.url(), pool_size=1)
        replica = create_engine(self.replica.url(), pool_size=1)
        self.addCleanup(primary.dispose)
        self.addCleanup(replica.dispose)
        router = ReplicaRouter(primary, [replica])
        Reading = sessionmaker(class_=RoutingSession, router=router, read_only=True)
        Writing = sessionmaker(class_=RoutingSession, router=router)
        with Reading() as session:
            self.assertIs(session.scalar(IN_RECOVERY), True)
        with Writing() as session:
            self.assertIs(session.scalar(IN_RECOVERY), False)
        self.assertEqual(router.stats["replica"], 1)

    def test_busy_replica_pool_falls_back_at_once(self):
        """
        A replica whose pool is exhausted is busy, not down: reads go to the
        primary at once (no wait for pool_timeout) and the replica is not
        set aside.
        """
        from sqlalchemy import create_engine
        from sqlalchemy.orm import sessionmaker

        from txfiberdb import ReplicaRouter, RoutingSession

        primary = create_engine(self.primary.url(), pool_size=1)
        replica = create_engine(
            self.replica.url(), pool_size=1, max_overflow=0, pool_timeout=60
        )
        self.addCleanup(primary.dispose)
        self.addCleanup(replica.dispose)
        router = ReplicaRouter(primary, [replica])
        Reading = sessionmaker(class_=RoutingSession, router=router, read_only=True)
        held = replica.connect()
        try:
            with Reading() as session:
                self.assertIs(session.scalar(IN_RECOVERY), False)
            self.assertEqual(router.stats["fallback"], 1)
            self.assertEqual(router.replicas_down(), 0)
        finally:
            held.close()
        with Reading() as session:
            self.assertIs(session.scalar(IN_RECOVERY), True)

    def test_no_replicas_reads_on_the_primary(self):
        db = EngineService(self.primary.url(), pool_size=1)
        db.startService()
        self.addCleanup(lambda: await_deferred(db.stopService()))
        with db.read_sessionmaker() as session:
            self.assertIs(session.scalar(IN_RECOVERY), False)
        self.assertEqual(db.router.stats["primary"], 1)
