#!/usr/bin/env bash
# SQLAlchemy's dialect compliance suite against postgresql+txpostgres, and the
# same suite with the same requirements against postgresql+psycopg2 (the
# reference), on one throwaway PostgreSQL server.
#
#   compliance/run.sh [extra pytest args, e.g. -k RowCountTest]
#
# Environment:
#   PYTHON               interpreter with txfiberdb, SQLAlchemy and pytest
#                        (default: /work/main/.venv/bin/python if present,
#                        else python3)
#   TXFIBERDB_TEST_DSN   use this server instead of starting one (libpq DSN
#                        or URL; needs CREATE DATABASE rights and
#                        max_prepared_transactions > 0 for the two-phase tests)
#   COMPLIANCE_LOG_DIR   where the logs and junit reports go (default: a new
#                        temporary directory)
#
# Exit status: 0 when the txpostgres run has no failures or errors and passes
# every test the psycopg2 run passes; otherwise the txpostgres run's pytest
# status (1: failures), or 6 when only the comparison found a difference.
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
logs="${COMPLIANCE_LOG_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/txfiberdb-compliance.XXXXXX")}"
mkdir -p "$logs"

run() {  # run DRIVER URL [pytest args...]
    local driver="$1" url="$2"
    shift 2
    echo "=== compliance suite: postgresql+$driver ($url)"
    "$PYTHON" -m pytest test_suite.py \
        -p no:twisted -p no:txfiberdb -p no:randomly -p no:cacheprovider \
        -q --dropfirst --dburi "$url" \
        --junitxml "$logs/$driver.xml" "$@" 2>&1 | tee "$logs/$driver.log"
    return "${PIPESTATUS[0]}"
}

run txpostgres "$COMPLIANCE_URL_TXPOSTGRES" "$@"
tx_rc=$?
run psycopg2 "$COMPLIANCE_URL_PSYCOPG2" "$@"
pg_rc=$?
# Once more with auto-prepare at threshold 0: every statement the driver can
# prepare goes through PREPARE/EXECUTE (doc/howto/performance.md).
case "$COMPLIANCE_URL_TXPOSTGRES" in
    *\?*) prepared_url="$COMPLIANCE_URL_TXPOSTGRES&prepare_threshold=0" ;;
    *) prepared_url="$COMPLIANCE_URL_TXPOSTGRES?prepare_threshold=0" ;;
esac
run txpostgres-prepared "$prepared_url" "$@"
tp_rc=$?

summary() { tail -n 1 "$logs/$1.log"; }
echo
echo "=== summaries"
echo "postgresql+txpostgres: $(summary txpostgres)   (pytest exit $tx_rc)"
echo "postgresql+psycopg2:   $(summary psycopg2)   (pytest exit $pg_rc)"
echo "postgresql+txpostgres, prepare_threshold=0: $(summary txpostgres-prepared)   (pytest exit $tp_rc)"
cmp_rc=0
if [ -s "$logs/psycopg2.xml" ] && [ -s "$logs/txpostgres.xml" ]; then
    "$PYTHON" compare.py "$logs/psycopg2.xml" "$logs/txpostgres.xml"
    cmp_rc=$?
fi
if [ -s "$logs/psycopg2.xml" ] && [ -s "$logs/txpostgres-prepared.xml" ]; then
    echo "prepare_threshold=0:"
    "$PYTHON" compare.py "$logs/psycopg2.xml" "$logs/txpostgres-prepared.xml" || cmp_rc=$?
fi
if [ "$pg_rc" -ne 0 ]; then
    echo "note: the psycopg2 reference run did not pass cleanly: a server or" \
         "requirements matter, not txpostgres's"
fi
echo "logs and junit reports: $logs"

if [ "$tx_rc" -ne 0 ]; then
    exit "$tx_rc"
fi
if [ "$tp_rc" -ne 0 ]; then
    exit "$tp_rc"
fi
if [ "$cmp_rc" -ne 0 ]; then
    exit 6
fi
exit 0
