"""
Provisioning hooks for the compliance suite.

SQLAlchemy looks for a ``provision`` module next to a dialect
(``Dialect.load_provisioning()``: ``txfiberdb.provision``, which does not
exist); PostgreSQL's own hooks (``CREATE DATABASE`` for followers, dropping
enums and prepared transactions for ``--dropfirst``, ``TEMPORARY`` tables,
upserts, the ``citext``/``hstore`` extensions) are keyed on the backend name
``postgresql`` and serve every driver once imported.  conftest.py imports
this module.
"""

import sqlalchemy.dialects.postgresql.provision  # noqa: F401
