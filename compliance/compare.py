"""
Compare two junit XML reports of the compliance suite.

    python compare.py REFERENCE.xml CANDIDATE.xml

Test ids are normalised (SQLAlchemy appends ``_<backend>+<driver>_<version>``
to class names), then every test that passed in REFERENCE (psycopg2) and did
not pass in CANDIDATE (txpostgres) is listed.  Exit status 0 when there is
none, 1 otherwise.
"""

from __future__ import annotations

import re
import sys
import xml.etree.ElementTree as ET

_SUFFIX = re.compile(r"_postgresql\+\w+_[\d_]+")


def outcomes(path: str) -> dict[str, str]:
    result = {}
    for case in ET.parse(path).iter("testcase"):
        name = _SUFFIX.sub("", f"{case.get('classname')}::{case.get('name')}")
        if case.find("failure") is not None:
            outcome = "failed"
        elif case.find("error") is not None:
            outcome = "error"
        elif case.find("skipped") is not None:
            outcome = "skipped"
        else:
            outcome = "passed"
        # a test can be reported twice (call, then an error at teardown)
        if result.get(name, "passed") == "passed":
            result[name] = outcome
    return result


def main(reference: str, candidate: str) -> int:
    ref, cand = outcomes(reference), outcomes(candidate)
    missing = sorted(
        (name, cand.get(name, "not run"))
        for name, outcome in ref.items()
        if outcome == "passed" and cand.get(name) != "passed"
    )
    extra = sorted(
        name
        for name, outcome in cand.items()
        if outcome == "passed" and ref.get(name) != "passed"
    )
    print(
        f"compare: {sum(o == 'passed' for o in ref.values())} passed on the "
        f"reference, {sum(o == 'passed' for o in cand.values())} on the "
        f"candidate; {len(missing)} passed on the reference only, "
        f"{len(extra)} on the candidate only"
    )
    for name, outcome in missing:
        print(f"  reference only: {name} ({outcome} on the candidate)")
    for name in extra:
        print(f"  candidate only: {name}")
    return 1 if missing else 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1], sys.argv[2]))
