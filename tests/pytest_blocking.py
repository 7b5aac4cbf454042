"""
run_blocking under pytest: pytest-twisted runs the reactor in a greenlet of
its own and calls each test from it, so a test that needs the database is
marked ``fiber``; run_blocking there is refused with a message naming the
marker.
"""

import pytest

from txfiberdb import in_fiber, run_blocking, sleep


def test_refused_in_a_pytest_twisted_test():
    with pytest.raises(RuntimeError, match=r"@pytest\.mark\.fiber"):
        run_blocking(lambda: None)


@pytest.mark.fiber
def test_the_marker_gives_a_fiber():
    assert in_fiber()
    sleep(0)
    with pytest.raises(RuntimeError, match="inside a fiber"):
        run_blocking(lambda: None)
