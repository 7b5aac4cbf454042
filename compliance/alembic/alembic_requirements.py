"""
Requirements for Alembic's dialect suite on PostgreSQL: Alembic's
``SuiteRequirements`` (which closes what not every database has) over the
PostgreSQL requirements of SQLAlchemy's compliance suite
(``../requirements.py``), with what PostgreSQL has opened, as Alembic's own
test requirements do for ``postgresql``.  About the database, not the
driver: the same class serves ``postgresql+psycopg2`` (the reference) and
``postgresql+txpostgres``.
"""

from alembic.testing.requirements import SuiteRequirements
from requirements import Requirements as PostgresRequirements
from sqlalchemy.testing import exclusions

open_ = exclusions.open


class Requirements(SuiteRequirements, PostgresRequirements):
    @property
    def autocommit_isolation(self):
        return open_()

    @property
    def reflects_pk_names(self):
        return open_()

    @property
    def reflects_fk_options(self):
        return open_()

    @property
    def fk_ondelete_is_reflected(self):
        return open_()

    @property
    def fk_onupdate_is_reflected(self):
        return open_()

    @property
    def fk_initially(self):
        return open_()

    @property
    def fk_deferrable(self):
        return open_()

    @property
    def fk_deferrable_is_reflected(self):
        return open_()

    @property
    def computed_columns(self):
        return open_()

    @property
    def identity_columns(self):
        return open_()

    @property
    def identity_columns_alter(self):
        return open_()
