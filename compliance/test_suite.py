"""SQLAlchemy's dialect compliance suite, run as-is."""

from sqlalchemy.testing.suite import *  # noqa: F401,F403
