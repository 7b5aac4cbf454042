"""Alembic's test suite for third-party dialects, run as-is."""

from alembic.testing.suite import *  # noqa: F401,F403
