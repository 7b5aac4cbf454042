"""
Types a user's checker can use: a typed user module passes ``mypy --strict``,
and calls whose arguments do not match the function are refused (ParamSpec on
run_in_fiber, fibered, run_blocking and EngineService.run).
"""

import os
import subprocess
import sys

from twisted.trial.unittest import SkipTest, SynchronousTestCase

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "typed")


def mypy(*args):
    if not _has_mypy():
        raise SkipTest("mypy is not installed (it is in the 'lint' extra)")
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--no-incremental", *args],
        capture_output=True,
        text=True,
        cwd=HERE,
    )
    return result.returncode, result.stdout + result.stderr


def _has_mypy():
    try:
        import mypy  # noqa: F401
    except ImportError:
        return False
    return True


class TypingTests(SynchronousTestCase):
    def test_typed_user_module_passes_strict(self):
        code, out = mypy(
            "--strict",
            "--follow-imports=silent",
            "--ignore-missing-imports",
            "user_module.py",
        )
        self.assertEqual(code, 0, out)

    def test_mismatched_arguments_are_refused(self):
        code, out = mypy(
            "--follow-imports=silent", "--ignore-missing-imports", "misuse.py"
        )
        self.assertEqual(code, 1, out)
        for line in (10, 11, 12, 13):
            self.assertIn(f"misuse.py:{line}: error", out)
