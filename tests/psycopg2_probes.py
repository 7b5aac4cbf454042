"""
psycopg2 functions that take a connection or a cursor, handed txfiberdb's
objects.  ``python -m tests.psycopg2_probes DSN NAME`` runs one probe in a
fiber and prints ``ok``, or the name of the exception it raised; a probe that
crashes the interpreter (psycopg2's C code reading a foreign object as its
own) shows as the process dying, which is what the caller checks for
(tests/pytest_psycopg2_entry_points.py).

Each probe gets the txfiberdb connection and a cursor, and asserts the effect
of the call when the call works.
"""

import sys

import psycopg2
import psycopg2.extensions as ext
import psycopg2.extras
from psycopg2 import sql

PROBES = {}


def probe(f):
    PROBES[f.__name__] = f
    return f


def scalar(cur, query, params=None):
    cur.execute(query, params)
    return cur.fetchone()[0]


# -- typecasters, which psycopg2 calls with a cursor ----------------------------


@probe
def every_typecaster_with_cursor(conn, cur):
    # The C casters read the cursor's connection (encoding, tzinfo_factory)
    # without checking its type: this crashed before cursors were psycopg2's.
    for caster in {id(c): c for c in ext.string_types.values()}.values():
        for value in ("1", "2024-01-02 03:04:05+02", "{1,2}", "t", "04:05:06+02"):
            try:
                caster(value, cur)
            except Exception:  # bad values for that type: only crashes matter
                pass
    assert ext.PYDATETIMETZ("2024-01-02 03:04:05+02", cur).utcoffset().seconds == 7200
    assert ext.UNICODE("abc", cur) == "abc"


@probe
def cursor_cast(conn, cur):
    assert cur.cast(1184, "2024-01-02 03:04:05+02").utcoffset().seconds == 7200


# -- register_type and friends -------------------------------------------------


def upper_text():
    return ext.new_type((25,), "UPPER_TEXT", lambda v, c: v and v.upper())


@probe
def register_type_on_cursor(conn, cur):
    ext.register_type(upper_text(), cur)
    assert scalar(cur, "SELECT 'x'::text") == "X"
    assert scalar(conn.cursor(), "SELECT 'x'::text") == "x"  # that cursor only


@probe
def register_type_on_raw_connection(conn, cur):
    ext.register_type(upper_text(), conn.raw_connection)
    assert scalar(conn.cursor(), "SELECT 'x'::text") == "X"


@probe
def register_type_on_connection(conn, cur):
    ext.register_type(upper_text(), conn)


@probe
def register_uuid_on_cursor(conn, cur):
    psycopg2.extras.register_uuid(conn_or_curs=cur)
    assert scalar(cur, "SELECT gen_random_uuid()").version == 4


@probe
def register_uuid_on_connection(conn, cur):
    psycopg2.extras.register_uuid(conn_or_curs=conn)


@probe
def register_default_json_on_raw_connection(conn, cur):
    psycopg2.extras.register_default_json(conn.raw_connection, loads=lambda s: "json")
    psycopg2.extras.register_default_jsonb(conn.raw_connection, loads=lambda s: "jsonb")
    assert scalar(conn.cursor(), "SELECT '1'::json") == "json"
    assert scalar(conn.cursor(), "SELECT '1'::jsonb") == "jsonb"


@probe
def register_default_json_on_cursor(conn, cur):
    psycopg2.extras.register_default_jsonb(cur, loads=lambda s: "jsonb")
    assert scalar(cur, "SELECT '1'::jsonb") == "jsonb"


@probe
def register_default_json_on_connection(conn, cur):
    psycopg2.extras.register_default_json(conn)


@probe
def register_ipaddress_on_cursor(conn, cur):
    psycopg2.extras.register_ipaddress(cur)
    assert str(scalar(cur, "SELECT '10.0.0.1'::inet").ip) == "10.0.0.1"


@probe
def register_hstore_on_cursor(conn, cur):
    # Looks the OIDs up with queries through the cursor's connection: they
    # park the fiber like any other query.
    conn.autocommit = True
    cur.execute("CREATE EXTENSION IF NOT EXISTS hstore")
    conn.autocommit = False
    psycopg2.extras.register_hstore(cur)
    assert scalar(cur, "SELECT 'a=>1'::hstore") == {"a": "1"}


@probe
def register_hstore_on_connection(conn, cur):
    conn.autocommit = True
    cur.execute("CREATE EXTENSION IF NOT EXISTS hstore")
    conn.autocommit = False
    psycopg2.extras.register_hstore(conn)


@probe
def register_composite_on_cursor(conn, cur):
    cur.execute("CREATE TYPE probe_pair AS (a int, b text)")
    caster = psycopg2.extras.register_composite("probe_pair", cur)
    row = scalar(cur, "SELECT (1, 'x')::probe_pair")
    assert (row.a, row.b) == (1, "x"), row
    assert caster.name == "probe_pair"


@probe
def register_composite_on_connection(conn, cur):
    cur.execute("CREATE TYPE probe_pair AS (a int, b text)")
    psycopg2.extras.register_composite("probe_pair", conn)


@probe
def register_range_on_cursor(conn, cur):
    cur.execute("CREATE TYPE probe_range AS RANGE (subtype = float8)")
    psycopg2.extras.register_range("probe_range", "ProbeRange", cur)
    value = scalar(cur, "SELECT '[1.5, 2.5)'::probe_range")
    assert (type(value).__name__, value.lower, value.upper) == ("ProbeRange", 1.5, 2.5)


# -- quoting and composing SQL --------------------------------------------------


@probe
def quote_ident_with_cursor(conn, cur):
    assert ext.quote_ident('a "b"', cur) == '"a ""b"""'


@probe
def quote_ident_with_raw_connection(conn, cur):
    assert ext.quote_ident("a b", conn.raw_connection) == '"a b"'


@probe
def quote_ident_with_connection(conn, cur):
    ext.quote_ident("a", conn)


QUERY = sql.SQL("SELECT {} FROM {}").format(sql.Literal("it's"), sql.Identifier("t"))


@probe
def composable_as_string_with_raw_connection(conn, cur):
    assert QUERY.as_string(conn.raw_connection) == "SELECT 'it''s' FROM \"t\""


@probe
def composable_identifier_as_string_with_cursor(conn, cur):
    assert sql.Identifier("a b").as_string(cur) == '"a b"'
    assert sql.Literal(42).as_string(cur) == "42"


@probe
def composable_string_literal_as_string_with_cursor(conn, cur):
    QUERY.as_string(cur)


@probe
def composable_as_string_with_connection(conn, cur):
    QUERY.as_string(conn)


@probe
def composable_through_execute_and_mogrify(conn, cur):
    assert cur.mogrify(QUERY) == b"SELECT 'it''s' FROM \"t\""
    cur.execute(sql.SQL("SELECT {}").format(sql.Literal("it's")))
    assert cur.fetchone() == ("it's",)


@probe
def encrypt_password_with_algorithm(conn, cur):
    for scope in (cur, conn.raw_connection):
        hashed = ext.encrypt_password("secret", "someone", scope, "scram-sha-256")
        assert hashed.startswith("SCRAM-SHA-256$")


@probe
def encrypt_password_with_connection(conn, cur):
    ext.encrypt_password("secret", "someone", conn, "scram-sha-256")


# -- helpers that take a cursor ------------------------------------------------


@probe
def execute_batch_and_values(conn, cur):
    cur.execute("CREATE TEMP TABLE probe_rows (a int, b text)")
    psycopg2.extras.execute_batch(
        cur, "INSERT INTO probe_rows VALUES (%s, %s)", [(1, "a"), (2, "b")]
    )
    rows = psycopg2.extras.execute_values(
        cur,
        "INSERT INTO probe_rows VALUES %s RETURNING a",
        [(3, "c"), (4, "d")],
        fetch=True,
    )
    assert rows == [(3,), (4,)]
    assert scalar(cur, "SELECT count(*) FROM probe_rows") == 4


@probe
def psycopg2_cursor_on_connection(conn, cur):
    ext.cursor(conn)


@probe
def adapter_prepare_with_connection(conn, cur):
    ext.adapt("x").prepare(conn)


def main(dsn, name):
    from twisted.internet import reactor

    from txfiberdb import dbapi, run_in_fiber

    outcome = []

    def body():
        conn = dbapi.connect(dsn)
        try:
            PROBES[name](conn, conn.cursor())
        finally:
            conn.close()

    def start():
        d = run_in_fiber(body)
        d.addCallbacks(
            lambda _: outcome.append("ok"),
            lambda f: outcome.append(f"{f.type.__name__}: {f.getErrorMessage()}"),
        )
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(start)
    reactor.run()
    print(outcome[0])


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
