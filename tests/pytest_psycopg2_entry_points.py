"""
psycopg2's functions that take a connection or a cursor never crash the
process when handed txfiberdb's objects: each works, or raises TypeError.

Each call runs in a process of its own (tests/psycopg2_probes.py), so that a
crash (psycopg2's C code reading a foreign object as its own struct, as its
typecasters once did with a txfiberdb cursor) fails one test instead of
killing the test runner.

What works: txfiberdb cursors are psycopg2 cursors, so everything that takes
a cursor takes them (including register_hstore/register_composite/
register_range, whose look-up queries go through the fiber); functions that
only need the psycopg2 connection work with ``conn.raw_connection``.  What
raises TypeError: a txfiberdb *connection* where psycopg2's C code wants its
own connection type (psycopg2's message: "must be a connection or a
cursor"; pass a txfiberdb cursor or ``conn.raw_connection``), and
``sql.Literal`` of a string rendered with a cursor (its adapter wants the
psycopg2 connection: render with ``conn.raw_connection``, or pass the
Composable to ``execute()``/``mogrify()``).
"""

import os
import subprocess
import sys

import pytest

from tests.psycopg2_probes import PROBES
from txfiberdb.testing import create_database, drop_database

TYPE_ERROR = {
    "register_type_on_connection",
    "register_uuid_on_connection",
    "register_default_json_on_connection",
    "register_hstore_on_connection",
    "register_composite_on_connection",
    "quote_ident_with_connection",
    "composable_string_literal_as_string_with_cursor",
    "composable_as_string_with_connection",
    "encrypt_password_with_connection",
    "psycopg2_cursor_on_connection",
    "adapter_prepare_with_connection",
}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def dsn():
    dsn = create_database("txfiberdb_probes")
    yield dsn
    drop_database(dsn)


@pytest.mark.parametrize("name", sorted(PROBES))
def test_entry_point(dsn, name):
    done = subprocess.run(
        [sys.executable, "-m", "tests.psycopg2_probes", dsn, name],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, (
        f"the probe process ended with {done.returncode} "
        f"(negative: killed by that signal)\n{done.stderr[-3000:]}"
    )
    outcome = done.stdout.strip().splitlines()[-1]
    if name in TYPE_ERROR:
        assert outcome.startswith("TypeError: "), outcome
    else:
        assert outcome == "ok", f"{outcome}\n{done.stderr[-3000:]}"
