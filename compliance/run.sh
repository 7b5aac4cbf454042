#!/usr/bin/env bash
# SQLAlchemy's dialect compliance suite and Alembic's dialect suite
# (alembic/) against postgresql+txpostgres, and the same suites with the same
# requirements against postgresql+psycopg2 (the reference), on one throwaway
# PostgreSQL server.
#
#   compliance/run.sh [extra pytest args, e.g. -k RowCountTest]
#
# Environment:
#   PYTHON               interpreter with txfiberdb, SQLAlchemy and pytest
#                        (default: the checkout's .venv/bin/python if present,
#                        else python3)
#   TXFIBERDB_TEST_DSN   use this server instead of starting one (libpq DSN
#                        or URL; needs CREATE DATABASE rights and
#                        max_prepared_transactions > 0 for the two-phase tests)
#   COMPLIANCE_LOG_DIR   where the logs and junit reports go (default: a new
#                        temporary directory, removed when all went well)
#   COMPLIANCE_SUITES    "sqlalchemy alembic" (default), or one of them
#   COMPLIANCE_PREPARED  0: no third run of SQLAlchemy's suite with
#                        prepare_threshold=0 (default: run it)
#
# Exit status: 0 when each txpostgres run has no failures or errors and passes
# every test its psycopg2 run passes; otherwise the first failing txpostgres
# run's pytest status (1: failures), or 6 when only a comparison found a
# difference.
set -u

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$here/../.venv/bin/python" ]; then
        PYTHON="$here/../.venv/bin/python"
    else
        PYTHON=python3
    fi
fi
export PYTHON

# First pass: get a server (pg_server.py sets COMPLIANCE_URL_*), run again.
if [ -z "${COMPLIANCE_URL_TXPOSTGRES:-}" ] || [ -z "${COMPLIANCE_URL_PSYCOPG2:-}" ]; then
    exec "$PYTHON" "$here/pg_server.py" -- bash "$here/run.sh" "$@"
fi

cd "$here" || exit 2
own_logs=
if [ -z "${COMPLIANCE_LOG_DIR:-}" ]; then
    logs="$(mktemp -d "${TMPDIR:-/tmp}/txfiberdb-compliance.XXXXXX")"
    own_logs=1
else
    logs="$COMPLIANCE_LOG_DIR"
fi
mkdir -p "$logs"

run() {  # run SUITE DIR FILE DRIVER URL [pytest args...]
    local suite="$1" dir="$2" file="$3" driver="$4" url="$5"
    shift 5
    echo "=== $suite suite: postgresql+$driver ($url)"
    (cd "$here/$dir" && "$PYTHON" -m pytest "$file" \
        -p no:twisted -p no:txfiberdb -p no:randomly -p no:cacheprovider \
        -q --dropfirst --dburi "$url" \
        --junitxml "$logs/$suite-$driver.xml" "$@" 2>&1) | tee "$logs/$suite-$driver.log"
    return "${PIPESTATUS[0]}"
}

summary() { tail -n 1 "$logs/$1.log"; }

status=0
compare_suite() {  # compare_suite SUITE DIR FILE [pytest args...]
    local suite="$1" dir="$2" file="$3" tx_rc pg_rc cmp_rc=0
    shift 3
    run "$suite" "$dir" "$file" txpostgres "$COMPLIANCE_URL_TXPOSTGRES" "$@"
    tx_rc=$?
    run "$suite" "$dir" "$file" psycopg2 "$COMPLIANCE_URL_PSYCOPG2" "$@"
    pg_rc=$?
    echo
    echo "=== $suite suite summaries"
    echo "postgresql+txpostgres: $(summary "$suite-txpostgres")   (pytest exit $tx_rc)"
    echo "postgresql+psycopg2:   $(summary "$suite-psycopg2")   (pytest exit $pg_rc)"
    if [ -s "$logs/$suite-psycopg2.xml" ] && [ -s "$logs/$suite-txpostgres.xml" ]; then
        "$PYTHON" "$here/compare.py" "$logs/$suite-psycopg2.xml" "$logs/$suite-txpostgres.xml"
        cmp_rc=$?
    fi
    if [ "$suite" = sqlalchemy ] && [ "${COMPLIANCE_PREPARED:-1}" != 0 ]; then
        # Once more with auto-prepare at threshold 0: every statement the
        # driver can prepare goes through PREPARE/EXECUTE
        # (doc/howto/performance.md).
        local prepared_url tp_rc
        case "$COMPLIANCE_URL_TXPOSTGRES" in
            *\?*) prepared_url="$COMPLIANCE_URL_TXPOSTGRES&prepare_threshold=0" ;;
            *) prepared_url="$COMPLIANCE_URL_TXPOSTGRES?prepare_threshold=0" ;;
        esac
        run "$suite" "$dir" "$file" txpostgres-prepared "$prepared_url" "$@"
        tp_rc=$?
        echo "postgresql+txpostgres, prepare_threshold=0: $(summary "$suite-txpostgres-prepared")   (pytest exit $tp_rc)"
        if [ -s "$logs/$suite-psycopg2.xml" ] && [ -s "$logs/$suite-txpostgres-prepared.xml" ]; then
            echo "prepare_threshold=0:"
            "$PYTHON" "$here/compare.py" "$logs/$suite-psycopg2.xml" "$logs/$suite-txpostgres-prepared.xml" || cmp_rc=$?
        fi
        if [ "$tp_rc" -ne 0 ] && [ "$tx_rc" -eq 0 ]; then
            tx_rc="$tp_rc"
        fi
    fi
    if [ "$pg_rc" -ne 0 ]; then
        echo "note: the psycopg2 reference run did not pass cleanly: a server or" \
             "requirements matter, not txpostgres's"
    fi
    if [ "$tx_rc" -ne 0 ] && [ "$status" -eq 0 ]; then
        status="$tx_rc"
    elif [ "$cmp_rc" -ne 0 ] && [ "$status" -eq 0 ]; then
        status=6
    fi
}

# COMPLIANCE_SUITES: which suites (default both): "sqlalchemy", "alembic".
for suite in ${COMPLIANCE_SUITES:-sqlalchemy alembic}; do
    case "$suite" in
        sqlalchemy) compare_suite sqlalchemy . test_suite.py "$@" ;;
        alembic) compare_suite alembic alembic test_alembic_suite.py "$@" ;;
        *) echo "unknown suite in COMPLIANCE_SUITES: $suite" >&2; exit 2 ;;
    esac
    echo
done

if [ -n "$own_logs" ] && [ "$status" -eq 0 ]; then
    rm -rf "$logs"
else
    echo "logs and junit reports: $logs"
fi
exit "$status"
