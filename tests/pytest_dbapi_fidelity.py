"""
Driver fidelity: each test runs twice on the same server, once with psycopg2
(blocking, plain ``psycopg2.connect``, no reactor, no fiber) and once with
``txfiberdb.dbapi`` (in a fiber).  The same assertions hold for both, so the
suite states psycopg2's behaviour and holds the driver to it: a difference
fails one of the two (``[psycopg2]`` or ``[txfiberdb]`` in the test id).

Differences that remain on purpose are listed in doc/howto/driver.md, and
tested here as such (``if db.name == "txfiberdb"``), with their reason.
"""

import datetime
import decimal

import psycopg2
import psycopg2.extensions as ext
import psycopg2.extras
import pytest

from txfiberdb import dbapi
from txfiberdb.testing import create_database, drop_database


@pytest.fixture(scope="module")
def dsn():
    dsn = create_database("txfiberdb_fidelity")
    yield dsn
    # A failed two-phase test may leave a prepared transaction, which would
    # keep the database from being dropped.
    conn = psycopg2.connect(dsn)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(
                "SELECT gid FROM pg_prepared_xacts WHERE database = current_database()"
            )
            for (gid,) in cur.fetchall():
                cur.execute("ROLLBACK PREPARED %s", (gid,))
    finally:
        conn.close()
    drop_database(dsn)


class Driver:
    """One side of the comparison: how to connect, and a blocking admin."""

    def __init__(self, name, dsn):
        self.name = name
        self.dsn = dsn
        self.module = psycopg2 if name == "psycopg2" else dbapi
        self.opened = []

    def connect(self, **kwargs):
        conn = self.module.connect(self.dsn, **kwargs)
        self.opened.append(conn)
        return conn

    def admin(self, sql, params=None):
        """Run ``sql`` on a blocking autocommit psycopg2 connection (set-up and
        checks from outside; never waits for the connection under test)."""
        conn = psycopg2.connect(self.dsn)
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(sql, params)
                return cur.fetchall() if cur.description else None
        finally:
            conn.close()

    def close_all(self):
        for conn in self.opened:
            conn.close()


@pytest.fixture(
    params=[
        pytest.param("psycopg2", id="psycopg2"),
        pytest.param("txfiberdb", id="txfiberdb", marks=pytest.mark.fiber),
    ]
)
def db(request, dsn):
    driver = Driver(request.param, dsn)
    yield driver
    driver.close_all()


def one(conn, sql, params=None):
    """The first column of the first row of ``sql``."""
    cur = conn.cursor()
    cur.execute(sql, params)
    return cur.fetchone()[0]


# -- session characteristics --------------------------------------------------


def test_set_session_default_means_server_default(db):
    conn = db.connect()
    conn.set_session(readonly="default", deferrable="DEFAULT")
    assert (conn.readonly, conn.deferrable) == (None, None)
    assert one(conn, "SHOW transaction_read_only") == "off"
    assert one(conn, "SHOW transaction_deferrable") == "off"
    conn.rollback()
    conn.set_session(readonly=True, isolation_level="serializable")
    conn.set_session(readonly=None)  # None leaves a setting as it is
    assert conn.readonly is True
    assert conn.isolation_level == ext.ISOLATION_LEVEL_SERIALIZABLE
    assert one(conn, "SHOW transaction_read_only") == "on"
    conn.rollback()
    conn.readonly = None  # the property: None is the server's default
    assert conn.readonly is None
    with pytest.raises(ValueError):
        conn.set_session(readonly="yes")
    with pytest.raises(ValueError):
        conn.isolation_level = "read_committed"  # names have spaces
    with pytest.raises(ValueError):
        conn.isolation_level = 5


def test_autocommit_applies_session_characteristics(db):
    db.admin("CREATE TABLE IF NOT EXISTS ro (id int)")
    conn = db.connect()
    conn.autocommit = True
    conn.set_session(readonly=True, isolation_level=ext.ISOLATION_LEVEL_REPEATABLE_READ)
    assert one(conn, "SHOW transaction_read_only") == "on"
    assert one(conn, "SHOW transaction_isolation") == "repeatable read"
    with pytest.raises(psycopg2.errors.ReadOnlySqlTransaction):
        conn.cursor().execute("INSERT INTO ro VALUES (1)")
    conn.deferrable = True
    assert one(conn, "SHOW default_transaction_deferrable") == "on"
    # Leaving autocommit resets the session defaults: BEGIN carries them.
    conn.autocommit = False
    assert one(conn, "SHOW default_transaction_read_only") == "off"
    assert one(conn, "SHOW transaction_read_only") == "on"
    conn.rollback()
    conn.readonly = False
    conn.cursor().execute("INSERT INTO ro VALUES (1)")
    conn.rollback()


def test_status(db):
    conn = db.connect()
    assert conn.status == ext.STATUS_READY
    conn.cursor().execute("SELECT 1")
    assert conn.status == ext.STATUS_BEGIN
    conn.commit()
    assert conn.status == ext.STATUS_READY
    conn.autocommit = True
    conn.cursor().execute("SELECT 1")
    assert conn.status == ext.STATUS_READY
    with conn:
        conn.cursor().execute("SELECT 1")
        assert conn.status == ext.STATUS_BEGIN
    assert conn.status == ext.STATUS_READY


def test_with_block_is_a_transaction_in_autocommit(db):
    db.admin("CREATE TABLE IF NOT EXISTS wb (id int)")
    db.admin("TRUNCATE wb")
    conn = db.connect()
    conn.autocommit = True
    with pytest.raises(ZeroDivisionError):
        with conn:
            cur = conn.cursor()
            cur.execute("INSERT INTO wb VALUES (1)")
            cur.execute("SELECT txid_current()")
            first = cur.fetchone()[0]
            cur.execute("SELECT txid_current()")
            assert cur.fetchone()[0] == first  # one transaction
            1 / 0
    assert db.admin("SELECT count(*) FROM wb") == [(0,)]
    with conn:
        conn.cursor().execute("INSERT INTO wb VALUES (2)")
    assert db.admin("SELECT count(*) FROM wb") == [(1,)]
    assert conn.autocommit is True
    assert conn.closed == 0


def test_with_blocks_do_not_nest(db):
    conn = db.connect()
    with conn:
        with pytest.raises(psycopg2.ProgrammingError, match="re-entered"):
            with conn:
                pass
    with conn:  # the outer block ended: entering again is fine
        pass


def test_set_isolation_level_rolls_back(db):
    db.admin("CREATE TABLE IF NOT EXISTS sil (id int)")
    db.admin("TRUNCATE sil")
    conn = db.connect()
    conn.cursor().execute("INSERT INTO sil VALUES (1)")
    conn.set_isolation_level(ext.ISOLATION_LEVEL_SERIALIZABLE)
    assert conn.status == ext.STATUS_READY
    assert one(conn, "SELECT count(*) FROM sil") == 0
    assert one(conn, "SHOW transaction_isolation") == "serializable"
    conn.set_isolation_level(ext.ISOLATION_LEVEL_AUTOCOMMIT)
    assert conn.autocommit is True
    with pytest.raises(ValueError):
        conn.set_isolation_level(7)


def test_settings_refused_inside_a_transaction(db):
    conn = db.connect()
    conn.cursor().execute("SELECT 1")
    for change in (
        lambda: setattr(conn, "autocommit", True),
        lambda: setattr(conn, "readonly", True),
        lambda: conn.set_session(deferrable=True),
    ):
        with pytest.raises(psycopg2.ProgrammingError, match="inside a transaction"):
            change()


# -- attributes and documented differences ----------------------------------


def test_defaults_and_attributes(db):
    conn = db.connect()
    assert (conn.autocommit, conn.isolation_level) == (False, None)
    assert (conn.readonly, conn.deferrable) == (None, None)
    assert conn.closed == 0
    cur = conn.cursor()
    assert cur.connection is conn
    assert (cur.name, cur.withhold, cur.scrollable) == (None, False, None)
    assert (cur.arraysize, cur.itersize, cur.rowcount) == (1, 2000, -1)
    named = conn.cursor("attrs", withhold=True, scrollable=False)
    assert (named.name, named.withhold, named.scrollable) == ("attrs", True, False)
    conn.close()
    assert cur.closed and named.closed


def test_sql_commit_ends_the_transaction_for_the_driver_only(db):
    """
    A documented difference: COMMIT sent as SQL.  psycopg2 still believes its
    transaction open and sends no BEGIN before the next statements (each then
    runs in a transaction of its own); txfiberdb follows the server and begins
    a new transaction.
    """
    conn = db.connect()
    cur = conn.cursor()
    cur.execute("SELECT 1")
    cur.execute("COMMIT")
    cur.execute("SELECT txid_current()")
    first = cur.fetchone()[0]
    cur.execute("SELECT txid_current()")
    same = cur.fetchone()[0] == first
    assert same is (db.name == "txfiberdb")
    conn.rollback()


# -- execute ------------------------------------------------------------------


@pytest.mark.parametrize("autocommit", [False, True])
@pytest.mark.parametrize("query", ["", "   ", b""])
def test_empty_query(db, autocommit, query):
    conn = db.connect()
    conn.autocommit = autocommit
    with pytest.raises(psycopg2.ProgrammingError, match="can't execute an empty query"):
        conn.cursor().execute(query)


def test_comment_only_query(db):
    """A documented difference: outside autocommit the BEGIN sent in front of
    a comment-only query makes the message non-empty, so the server runs it."""
    conn = db.connect()
    if db.name == "psycopg2":
        with pytest.raises(psycopg2.ProgrammingError, match="empty query"):
            conn.cursor().execute("-- nothing")
    else:
        conn.cursor().execute("-- nothing")
    conn.rollback()
    conn.autocommit = True  # no BEGIN in front: as psycopg2
    with pytest.raises(psycopg2.ProgrammingError, match="empty query"):
        conn.cursor().execute("-- nothing")


# -- closed connections -------------------------------------------------------


def test_closed_connection_refuses_settings(db):
    conn = db.connect()
    conn.close()
    assert conn.closed == 1
    for change in (
        lambda: setattr(conn, "autocommit", True),
        lambda: setattr(conn, "isolation_level", 1),
        lambda: setattr(conn, "readonly", True),
        lambda: setattr(conn, "deferrable", True),
        lambda: conn.set_session(readonly=True),
        lambda: conn.set_isolation_level(1),
        conn.cursor,
        conn.commit,
        conn.rollback,
        lambda: conn.xid(1, "a", "b"),
        lambda: conn.tpc_begin("x"),
    ):
        with pytest.raises(psycopg2.InterfaceError, match="connection already closed"):
            change()
    conn.close()  # twice is fine
    assert conn.closed == 1


def test_broken_connection_closed_is_2_then_1(db):
    conn = db.connect()
    pid = conn.get_backend_pid()
    db.admin("SELECT pg_terminate_backend(%s)", (pid,))
    # psycopg2 learns of it at the next query (OperationalError); txfiberdb
    # may have seen the socket close while idle (then InterfaceError).
    with pytest.raises((psycopg2.OperationalError, psycopg2.InterfaceError)):
        conn.cursor().execute("SELECT 1")
    assert conn.closed == 2
    conn.close()
    assert conn.closed == 1


# -- client-side cursors ------------------------------------------------------


def test_client_cursor_scroll(db):
    cur = db.connect().cursor()
    cur.execute("SELECT generate_series(1, 5)")
    cur.scroll(2)
    assert cur.fetchone() == (3,)
    cur.scroll(0, mode="absolute")
    assert cur.fetchone() == (1,)
    cur.scroll(-1)
    assert cur.fetchone() == (1,)
    with pytest.raises(psycopg2.ProgrammingError, match="out of bounds"):
        cur.scroll(10)
    with pytest.raises(psycopg2.ProgrammingError, match="scroll mode"):
        cur.scroll(1, mode="sideways")


def test_unnamed_cursor_refuses_withhold_and_scrollable(db):
    conn = db.connect()
    with pytest.raises(psycopg2.ProgrammingError, match="withhold"):
        conn.cursor(withhold=True)
    with pytest.raises(psycopg2.ProgrammingError, match="scrollable"):
        conn.cursor(scrollable=True)
    assert conn.cursor(withhold=False).withhold is False


def test_tzinfo_factory(db):
    cur = db.connect().cursor()
    assert cur.tzinfo_factory is datetime.timezone
    seen = []

    def factory(offset):
        seen.append(offset)
        return datetime.timezone(offset, "from factory")

    cur.tzinfo_factory = factory
    cur.execute("SET LOCAL timezone TO 'Europe/Paris'")
    cur.execute("SELECT '2024-01-02 03:04:05+00'::timestamptz")
    value = cur.fetchone()[0]
    assert value.tzinfo.tzname(value) == "from factory"
    assert seen == [datetime.timedelta(hours=1)]


def test_cast(db):
    cur = db.connect().cursor()
    assert cur.cast(1700, "1.50") == decimal.Decimal("1.50")


# -- named cursors ------------------------------------------------------------


def test_named_cursor_reads_a_cursor_declared_in_sql(db):
    conn = db.connect()
    conn.cursor().execute("DECLARE elsewhere CURSOR FOR SELECT generate_series(1, 5) AS n")
    cur = conn.cursor("elsewhere")
    assert cur.fetchone() == (1,)
    assert cur.description[0].name == "n"
    assert cur.fetchmany(2) == [(2,), (3,)]
    assert cur.fetchall() == [(4,), (5,)]
    cur.close()
    conn.rollback()


def test_named_cursor_reads_a_returned_refcursor(db):
    db.admin(
        """
        CREATE OR REPLACE FUNCTION give_cursor(n int) RETURNS refcursor AS $$
        DECLARE c refcursor := 'given';
        BEGIN OPEN c FOR SELECT generate_series(1, n); RETURN c; END
        $$ LANGUAGE plpgsql
        """
    )
    conn = db.connect()
    cur = conn.cursor()
    cur.callproc("give_cursor", (3,))
    name = cur.fetchone()[0]
    assert [row for row in conn.cursor(name)] == [(1,), (2,), (3,)]
    conn.rollback()


def test_closing_an_unexecuted_named_cursor_closes_the_server_cursor(db):
    conn = db.connect()
    conn.cursor().execute("DECLARE to_close CURSOR FOR SELECT 1")
    conn.cursor("to_close").close()
    assert one(conn, "SELECT count(*) FROM pg_cursors WHERE name = 'to_close'") == 0
    conn.cursor("never_declared").close()  # nothing to close: no error
    assert conn.status == ext.STATUS_BEGIN
    conn.rollback()


def test_named_cursor_scroll(db):
    conn = db.connect()
    cur = conn.cursor("scrolling", scrollable=True)
    cur.execute("SELECT generate_series(1, 10)")
    assert cur.fetchmany(3) == [(1,), (2,), (3,)]
    cur.scroll(2)
    assert cur.fetchone() == (6,)
    cur.scroll(-3)
    assert cur.fetchone() == (4,)
    cur.scroll(8, mode="absolute")
    assert cur.fetchall() == [(9,), (10,)]
    # psycopg2: any mode but "absolute" is relative; after the last row
    # (past the end), -2 is on 9.
    cur.scroll(-2, mode="sideways")
    assert cur.fetchone() == (10,)
    conn.rollback()


def test_named_cursor_refusals(db):
    conn = db.connect()
    cur = conn.cursor("refusals")
    with pytest.raises(psycopg2.ProgrammingError):
        cur.executemany("SELECT %s", [(1,)])
    with pytest.raises(psycopg2.ProgrammingError):
        cur.callproc("lower", ("A",))
    cur.execute("SELECT 1")
    with pytest.raises(psycopg2.ProgrammingError, match="more than once"):
        cur.execute("SELECT 1")
    conn.rollback()
    conn.autocommit = True
    with pytest.raises(psycopg2.ProgrammingError, match="outside of transactions"):
        conn.cursor("in_autocommit").execute("SELECT 1")
    held = conn.cursor("held", withhold=True)
    held.execute("SELECT generate_series(1, 3)")
    assert held.fetchall() == [(1,), (2,), (3,)]
    held.close()
    assert one(conn, "SELECT count(*) FROM pg_cursors WHERE name = 'held'") == 0


# -- cursor factories ---------------------------------------------------------


@pytest.mark.parametrize("named", [False, True])
def test_cursor_factories(db, named):
    conn = db.connect()
    name = "factory" if named else None
    sql = "SELECT 1 AS a, 'x' AS b"

    cur = conn.cursor(name, cursor_factory=psycopg2.extras.DictCursor)
    assert isinstance(cur, psycopg2.extras.DictCursor)
    cur.execute(sql)
    row = cur.fetchone()
    assert (row["a"], row[1], dict(row)) == (1, "x", {"a": 1, "b": "x"})
    cur.close()

    cur = conn.cursor(name and "f2", cursor_factory=psycopg2.extras.RealDictCursor)
    cur.execute(sql)
    assert cur.fetchall() == [{"a": 1, "b": "x"}]
    cur.close()

    cur = conn.cursor(name and "f3", cursor_factory=psycopg2.extras.NamedTupleCursor)
    cur.execute(sql)
    row = cur.fetchone()
    assert (row.a, row.b) == (1, "x")
    cur.close()

    conn.rollback()
    conn.cursor_factory = psycopg2.extras.RealDictCursor
    cur = conn.cursor(name and "f4")
    assert isinstance(cur, psycopg2.extras.RealDictCursor)
    cur.execute(sql)
    assert list(cur) == [{"a": 1, "b": "x"}]
    conn.rollback()


def test_connect_factories_are_never_ignored(db):
    """
    psycopg2.connect() takes cursor_factory and connection_factory.
    txfiberdb.dbapi.connect() applies cursor_factory and refuses
    connection_factory clearly; it never ignores either.
    """
    factory = psycopg2.extras.DictCursor
    conn = db.connect(cursor_factory=factory)
    assert conn.cursor_factory is factory
    assert isinstance(conn.cursor(), factory)
    if db.name == "txfiberdb":  # an asynchronous connection is txpostgres's
        with pytest.raises(psycopg2.NotSupportedError, match="connection_factory"):
            db.connect(connection_factory=psycopg2.extensions.connection)


def test_refused_cursor_factories(db):
    """psycopg2's logging and replication cursors need a kind of connection
    that an asynchronous one cannot be: refused, with the reason."""
    conn = db.connect()
    if db.name == "txfiberdb":
        for factory in (psycopg2.extras.LoggingCursor, psycopg2.extras.ReplicationCursor):
            with pytest.raises(psycopg2.NotSupportedError, match=factory.__name__):
                conn.cursor(cursor_factory=factory)
    else:  # without a LoggingConnection psycopg2 fails at execute()
        with pytest.raises(AttributeError):
            conn.cursor(cursor_factory=psycopg2.extras.LoggingCursor).execute("SELECT 1")


def test_cursor_factory_must_be_a_cursor_class(db):
    conn = db.connect()
    with pytest.raises(TypeError, match="cursor factory must be subclass"):
        conn.cursor(cursor_factory=lambda *args: object())


# -- two-phase commit ---------------------------------------------------------


def test_tpc_prepare_then_commit(db):
    db.admin("CREATE TABLE IF NOT EXISTS tpc (id text)")
    conn = db.connect()
    xid = conn.xid(42, f"{db.name}-commit", "branch")
    assert tuple(xid) == (42, f"{db.name}-commit", "branch")
    conn.tpc_begin(xid)
    assert conn.status == ext.STATUS_BEGIN
    conn.cursor().execute("INSERT INTO tpc VALUES (%s)", (db.name,))
    with pytest.raises(psycopg2.ProgrammingError, match="two-phase"):
        conn.commit()
    conn.tpc_prepare()
    assert conn.status == ext.STATUS_PREPARED
    gids = [gid for (gid,) in db.admin("SELECT gid FROM pg_prepared_xacts")]
    assert str(xid) in gids
    with pytest.raises(psycopg2.ProgrammingError):
        conn.cursor().execute("SELECT 1")
    conn.tpc_commit()
    assert conn.status == ext.STATUS_READY
    assert (db.name,) in db.admin("SELECT id FROM tpc")
    assert str(xid) not in [g for (g,) in db.admin("SELECT gid FROM pg_prepared_xacts")]


def test_tpc_one_phase_and_rollback(db):
    conn = db.connect()
    conn.tpc_begin(conn.xid(1, f"{db.name}-one-phase", ""))
    conn.cursor().execute("SELECT 1")
    conn.tpc_commit()  # not prepared: a plain COMMIT
    assert conn.status == ext.STATUS_READY
    conn.tpc_begin(f"{db.name}-plain-string")
    conn.tpc_prepare()
    conn.tpc_rollback()
    assert db.admin("SELECT count(*) FROM pg_prepared_xacts WHERE gid = %s",
                    (f"{db.name}-plain-string",)) == [(0,)]


def test_tpc_recover_and_finish_elsewhere(db):
    conn = db.connect()
    xid = conn.xid(7, f"{db.name}-recover", "bq")
    conn.tpc_begin(xid)
    conn.tpc_prepare()
    conn.close()
    other = db.connect()
    other.tpc_begin(f"{db.name}-unparsed")
    other.tpc_prepare()
    other.close()

    conn = db.connect()
    recovered = {str(x): x for x in conn.tpc_recover()}
    assert conn.status == ext.STATUS_READY  # recovering left no transaction
    mine = recovered[str(xid)]
    assert (mine.format_id, mine.gtrid, mine.bqual) == (7, f"{db.name}-recover", "bq")
    assert tuple(mine) == (7, f"{db.name}-recover", "bq")
    assert isinstance(mine, ext.Xid)
    assert isinstance(mine.prepared, datetime.datetime)
    assert mine.owner == one(conn, "SELECT current_user")
    assert mine.database == one(conn, "SELECT current_database()")
    conn.rollback()
    unparsed = recovered[f"{db.name}-unparsed"]
    assert (unparsed.format_id, unparsed.gtrid, unparsed.bqual) == (
        None,
        f"{db.name}-unparsed",
        None,
    )
    conn.tpc_commit(mine)
    conn.tpc_rollback(unparsed)
    left = [str(x) for x in conn.tpc_recover()]
    assert str(xid) not in left and f"{db.name}-unparsed" not in left


def test_tpc_refusals(db):
    conn = db.connect()
    with pytest.raises(psycopg2.ProgrammingError, match="inside a two-phase"):
        conn.tpc_prepare()
    with pytest.raises(psycopg2.ProgrammingError, match="in a two-phase transaction"):
        conn.tpc_commit()
    conn.cursor().execute("SELECT 1")
    with pytest.raises(psycopg2.ProgrammingError, match="inside a transaction"):
        conn.tpc_begin(conn.xid(1, "x", "y"))
    with pytest.raises(psycopg2.ProgrammingError, match="outside a transaction"):
        conn.tpc_commit("some-gid")
    conn.rollback()
    with pytest.raises(TypeError):
        conn.tpc_begin(42)
    conn.autocommit = True
    with pytest.raises(psycopg2.ProgrammingError, match="autocommit"):
        conn.tpc_begin(conn.xid(1, "x", "y"))
