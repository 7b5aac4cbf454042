"""
doc/howto/testing.md shows code that runs: each of its Python code blocks is
an example region (``# --- example: NAME`` to ``# --- end example``) of a
test module that the suite runs, kept identical here.
"""

import os
import re

from twisted.trial.unittest import SynchronousTestCase

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGE = os.path.join(ROOT, "doc", "howto", "testing.md")
EXAMPLES = [
    "tests/test_example_trial.py",  # trial
    "tests/pytest_example_fixtures.py",  # pytest
    "tests/pytest_example_mixed.py",  # pytest
]


def read(path):
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return f.read()


def regions():
    """name -> code of each example region of the example modules."""
    found = {}
    for path in EXAMPLES:
        for name, code in re.findall(
            r"^# --- example: ([^\n]+)\n(.*?)^# --- end example$",
            read(path),
            re.M | re.S,
        ):
            found[f"{path}: {name}"] = code.rstrip("\n")
    return found


def code_blocks(markdown):
    """The bodies of the page's fenced code blocks, with their language."""
    return re.findall(r"^```(\w*)\n(.*?)^```$", markdown, re.M | re.S)


class HowtoTestingTests(SynchronousTestCase):
    def test_every_code_block_is_a_tested_example(self):
        examples = regions()
        self.assertEqual(len(examples), 3, examples.keys())
        blocks = code_blocks(read(PAGE))
        self.assertTrue(blocks)
        for language, body in blocks:
            self.assertEqual(language, "python", body[:80])
            matches = [k for k, code in examples.items() if code == body.rstrip("\n")]
            self.assertEqual(
                len(matches),
                1,
                "a code block of doc/howto/testing.md differs from every "
                f"example region of {EXAMPLES}; copy the region into the page:\n"
                + body[:200],
            )

    def test_every_example_is_shown(self):
        page = read(PAGE)
        for name, code in regions().items():
            self.assertIn(f"```python\n{code}\n```", page, name)

    def test_examples_are_collected(self):
        """The example modules are where trial and pytest look for tests."""
        self.assertTrue(os.path.basename(EXAMPLES[0]).startswith("test_"))
        for path in EXAMPLES[1:]:
            self.assertTrue(os.path.basename(path).startswith("pytest_"))
