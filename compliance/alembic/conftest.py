"""
pytest set-up for Alembic's dialect test suite (``alembic.testing.suite``):
the same as SQLAlchemy's compliance suite next door (``../fiber_session.py``:
the whole session in one fiber, PostgreSQL's provisioning), with this
directory as pytest's rootdir so that ``setup.cfg`` here names Alembic's
requirements.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fiber_session import *  # noqa: E402,F401,F403
