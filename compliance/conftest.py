"""
pytest set-up for SQLAlchemy's dialect compliance suite: the whole session
runs in one fiber (see :mod:`fiber_session`, shared with Alembic's suite in
``alembic/``).
"""

from fiber_session import *  # noqa: F401,F403
