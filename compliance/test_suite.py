"""
SQLAlchemy's dialect compliance suite, run as-is, with one adaptation.

``ServerSideCursorsTest._is_server_side`` recognises server-side cursors by a
hard-coded list of driver names (SQLAlchemy's comment there: "this is a huge
issue as it prevents these tests from being usable by third party
dialects"); any other driver gets ``False`` and every assertion that a
streaming cursor *is* server-side fails.  txfiberdb's cursors follow
psycopg2's convention (a named cursor is a server-side ``DECLARE``/``FETCH``
cursor; a plain one has ``name`` None), so ``txpostgres`` is checked exactly
as ``psycopg2`` is.  Every other driver goes through SQLAlchemy's own code.
"""

from sqlalchemy.testing.suite import *  # noqa: F401,F403
from sqlalchemy.testing.suite import (
    ServerSideCursorsTest as _ServerSideCursorsTest,
)


class ServerSideCursorsTest(_ServerSideCursorsTest):
    def _is_server_side(self, cursor):
        if self.engine.dialect.driver == "txpostgres":
            return bool(cursor.name)
        return super()._is_server_side(cursor)
