"""
Requirements for running SQLAlchemy's compliance suite on PostgreSQL.

``SuiteRequirements`` closes every optional capability; this class opens what
PostgreSQL (13 and later) supports, as SQLAlchemy's own ``test/requirements.py``
does for ``postgresql``.  It says what the *database* can do and must not
depend on the driver: the same class serves ``postgresql+psycopg2`` (the
reference) and ``postgresql+txpostgres``.  Capabilities that really are a
driver's (rowcounts, RETURNING, server-side cursors, lastrowid, executemany
with RETURNING, ...) are read from the dialect's flags by ``SuiteRequirements``
itself and are left alone here, so a driver that declares less gets fewer
tests rather than failures.  Items whose value is not simply "PostgreSQL can"
say why.
"""

import os

from sqlalchemy import exc, text
from sqlalchemy.testing import exclusions
from sqlalchemy.testing.exclusions import only_on, skip_if
from sqlalchemy.testing.requirements import SuiteRequirements

open_ = exclusions.open
closed = exclusions.closed


class Requirements(SuiteRequirements):
    # -- DDL ---------------------------------------------------------------

    @property
    def create_table_as(self):
        return open_()

    @property
    def create_temp_table_as(self):
        return open_()

    @property
    def table_ddl_if_exists(self):
        return open_()

    @property
    def index_ddl_if_exists(self):
        return open_()

    @property
    def deferrable_fks(self):
        return open_()

    @property
    def non_updating_cascade(self):
        # PostgreSQL does ON UPDATE CASCADE.
        return closed()

    @property
    def repeated_column_foreign_keys(self):
        # FOREIGN KEY (a, a) REFERENCES r (b, c) is accepted.
        return open_()

    @property
    def repeated_remote_col_foreign_keys(self):
        # REFERENCES r (c, c): "foreign key referenced-columns list must not
        # contain duplicates".
        return closed()

    @property
    def views(self):
        return open_()

    @property
    def temporary_views(self):
        return open_()

    @property
    def create_or_replace_view(self):
        return open_()

    @property
    def materialized_views(self):
        return open_()

    @property
    def materialized_views_reflect_pk(self):
        # A materialized view has no primary key in PostgreSQL.
        return closed()

    @property
    def schema_create_delete(self):
        return open_()

    @property
    def computed_columns(self):
        # Before PostgreSQL 18 a Computed() without "persisted" is created
        # STORED, with a warning; the suite asks for warns_if here.
        return only_on("postgresql >= 12") + exclusions.warns_if(
            "postgresql < 18",
            r"Computed column .* is being created as 'STORED'",
            assert_=False,
        )

    @property
    def computed_columns_stored(self):
        return self.computed_columns

    @property
    def computed_columns_virtual(self):
        # GENERATED ... VIRTUAL arrives with PostgreSQL 18.
        return only_on("postgresql >= 18")

    @property
    def computed_columns_default_persisted(self):
        # STORED by default before 18, VIRTUAL from 18 on.
        return only_on("postgresql < 18")

    @property
    def computed_columns_reflect_persisted(self):
        return self.computed_columns

    @property
    def identity_columns(self):
        return open_()

    @property
    def identity_columns_standard(self):
        return open_()

    @property
    def server_defaults(self):
        return open_()

    @property
    def expression_server_defaults(self):
        return open_()

    @property
    def indexes_with_expressions(self):
        return open_()

    @property
    def unicode_ddl(self):
        return open_()

    # -- SQL ---------------------------------------------------------------

    @property
    def table_value_constructor(self):
        return open_()

    @property
    def boolean_col_expressions(self):
        return open_()

    @property
    def nullsordering(self):
        return open_()

    @property
    def intersect(self):
        return open_()

    @property
    def except_(self):
        return open_()

    @property
    def window_functions(self):
        return open_()

    @property
    def window_range(self):
        return open_()

    @property
    def window_range_numeric(self):
        return open_()

    @property
    def window_range_non_numeric(self):
        return open_()

    @property
    def ctes(self):
        return open_()

    @property
    def ctes_with_update_delete(self):
        return open_()

    @property
    def ctes_with_values(self):
        return open_()

    @property
    def ctes_on_dml(self):
        return open_()

    @property
    def tuple_in(self):
        return open_()

    @property
    def update_from(self):
        return open_()

    @property
    def delete_from(self):
        return open_()

    @property
    def aggregate_order_by(self):
        return open_()

    @property
    def supports_distinct_on(self):
        return open_()

    @property
    def regexp_match(self):
        return open_()

    @property
    def regexp_replace(self):
        return open_()

    @property
    def fetch_first(self):
        return open_()

    @property
    def fetch_percent(self):
        # FETCH FIRST n PERCENT is not in PostgreSQL.
        return closed()

    @property
    def fetch_ties(self):
        return only_on("postgresql >= 13")

    @property
    def fetch_no_order_by(self):
        return open_()

    @property
    def fetch_offset_with_options(self):
        return open_()

    @property
    def fetch_expression(self):
        return open_()

    @property
    def supports_bitwise_or(self):
        return open_()

    @property
    def supports_bitwise_and(self):
        return open_()

    @property
    def supports_bitwise_not(self):
        return open_()

    @property
    def supports_bitwise_xor(self):
        return open_()

    @property
    def supports_bitwise_shift(self):
        return open_()

    @property
    def mod_operator_as_percent_sign(self):
        # The compiled SQL shows "%%", which a "format"/"pyformat" DBAPI
        # turns into "%": a question of paramstyle, read off the dialect.
        return exclusions.only_if(
            lambda config: config.db.dialect.paramstyle in ("format", "pyformat"),
            "the DBAPI's paramstyle does not double percent signs",
        )

    @property
    def percent_schema_names(self):
        return open_()

    @property
    def order_by_label_with_expression(self):
        # PostgreSQL only accepts simple labels in ORDER BY.
        return closed()

    def get_order_by_collation(self, config):
        return "POSIX"

    # -- transactions --------------------------------------------------------

    @property
    def savepoints(self):
        return open_()

    @property
    def two_phase_transactions(self):
        def no_prepared_transactions(config):
            with config.db.connect() as conn:
                try:
                    num = conn.scalar(
                        text(
                            "select cast(setting AS integer) from pg_settings "
                            "where name = 'max_prepared_transactions'"
                        )
                    )
                except exc.DBAPIError:
                    return True
                return not num

        return skip_if(
            no_prepared_transactions, "max_prepared_transactions is 0"
        )

    @property
    def isolation_level(self):
        return open_()

    @property
    def autocommit(self):
        return open_()

    @property
    def skip_autocommit_rollback(self):
        # PostgreSQL dialects implement detect_autocommit_setting() and use
        # the default do_rollback().
        return open_()

    # -- reflection -----------------------------------------------------------

    @property
    def cross_schema_fk_reflection(self):
        return open_()

    @property
    def foreign_key_constraint_name_reflection(self):
        return open_()

    @property
    def implicit_default_schema(self):
        return open_()

    @property
    def default_schema_name_switch(self):
        return open_()

    @property
    def reflects_pk_names(self):
        return open_()

    @property
    def reflect_tables_no_columns(self):
        return open_()

    @property
    def comment_reflection(self):
        return open_()

    @property
    def comment_reflection_full_unicode(self):
        return open_()

    @property
    def constraint_comment_reflection(self):
        return open_()

    @property
    def temp_table_comment_reflection(self):
        return open_()

    @property
    def column_collation_reflection(self):
        return open_()

    @property
    def foreign_key_constraint_option_reflection_ondelete(self):
        return open_()

    @property
    def fk_constraint_option_reflection_ondelete_restrict(self):
        return open_()

    @property
    def fk_constraint_option_reflection_ondelete_noaction(self):
        return open_()

    @property
    def foreign_key_constraint_option_reflection_onupdate(self):
        return open_()

    @property
    def fk_constraint_option_reflection_onupdate_restrict(self):
        return open_()

    @property
    def temp_table_names(self):
        return open_()

    @property
    def has_temp_table(self):
        return open_()

    @property
    def unique_constraints_reflect_as_index(self):
        # A UNIQUE constraint is backed by a unique index, reflected as such.
        return open_()

    @property
    def index_reflects_included_columns(self):
        return open_()

    @property
    def indexes_check_column_order(self):
        return open_()

    @property
    def reflect_indexes_with_expressions(self):
        return open_()

    @property
    def inline_check_constraint_reflection(self):
        return open_()

    @property
    def check_constraint_reflection(self):
        return open_()

    @property
    def reflect_table_options(self):
        return open_()

    # -- types ----------------------------------------------------------------

    @property
    def uuid_data_type(self):
        return open_()

    @property
    def datetime_interval(self):
        return open_()

    @property
    def datetime_literals(self):
        return open_()

    @property
    def datetime_timezone(self):
        return open_()

    @property
    def time_timezone(self):
        return open_()

    @property
    def timestamp_microseconds(self):
        return open_()

    @property
    def datetime_historic(self):
        return open_()

    @property
    def datetime_timezone_historic(self):
        return open_()

    @property
    def date_historic(self):
        return open_()

    @property
    def array_type(self):
        return open_()

    @property
    def json_type(self):
        return open_()

    @property
    def legacy_unconditional_json_extract(self):
        return open_()

    @property
    def precision_numerics_enotation_small(self):
        return open_()

    @property
    def precision_numerics_many_significant_digits(self):
        return open_()

    @property
    def precision_numerics_retains_significant_digits(self):
        return open_()

    @property
    def infinity_floats(self):
        return open_()

    @property
    def float_or_double_precision_behaves_generically(self):
        return open_()




# Through PgBouncer in transaction mode (compliance/pgbouncer.py), a temporary
# table lives on whichever server connection created it: the next transaction
# may run on another one, and the next client may get that one (it then sees
# the table: a leak into unrelated tests).  Session state that transaction
# pooling cannot carry, for any driver: closed there, so the suite neither
# creates temporary tables nor expects to find them.
if os.environ.get("COMPLIANCE_NO_TEMP_TABLES"):
    for _name in (
        "temporary_tables",
        "temporary_views",
        "create_temp_table_as",
        "temp_table_reflection",
        "temp_table_reflect_indexes",
        "temp_table_names",
        "temp_table_comment_reflection",
        "has_temp_table",
    ):
        setattr(Requirements, _name, property(lambda self: closed()))
