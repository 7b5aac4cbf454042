"""
Tests for what the package promises an installer: its metadata (version,
licence, extras) and the ``klein-demo`` twistd plugin's behaviour when a
dependency is missing or the start fails.

The sdist and wheel themselves are built and checked by ``make dist-check``
(``.ci/dist-check``, ``.ci/check_dist.py``): building needs a fresh build
environment, which is too slow for the test suite.
"""

import os
import subprocess
import sys
from importlib import metadata

from twisted.trial.unittest import SynchronousTestCase

import txfiberdb

#: Runs twistd in this interpreter with some modules made unimportable
#: (``sys.modules[name] = None`` makes ``import name`` raise ImportError).
_TWISTD_WITHOUT = """
import sys
for name in sys.argv[1].split(","):
    if name:
        sys.modules[name] = None
sys.argv = ["twistd"] + sys.argv[2:]
from twisted.scripts.twistd import run
run()
"""


def twistd(testcase, args, blocked=(), timeout=120):
    """
    Run ``twistd ARGS`` in a subprocess, in an empty folder (so the plugin is
    found through the installation, not the current directory); return its
    exit status, its output and the folder.
    """
    cwd = testcase.mktemp()
    os.makedirs(cwd)
    proc = subprocess.run(
        [sys.executable, "-c", _TWISTD_WITHOUT, ",".join(blocked), *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        timeout=timeout,
        text=True,
    )
    return proc.returncode, proc.stdout, cwd


class MetadataTests(SynchronousTestCase):
    def test_version_is_single_sourced(self):
        """``txfiberdb.__version__`` is the installed distribution's version."""
        self.assertEqual(metadata.version("txfiberdb"), txfiberdb.__version__)

    def test_licence(self):
        """
        The licence expression and file are in the metadata (that the file
        itself is in the wheel and sdist is checked by ``make dist-check``).
        """
        meta = metadata.metadata("txfiberdb")
        self.assertEqual(meta["License-Expression"], "MIT")
        self.assertEqual(meta.get_all("License-File"), ["LICENSE"])

    def test_psycopg2_is_chosen_by_extra(self):
        """No psycopg2 build is a hard requirement; each has its extra."""
        requires = metadata.requires("txfiberdb") or []
        hard = [r for r in requires if "extra ==" not in r]
        self.assertFalse([r for r in hard if r.lower().startswith("psycopg2")], hard)

        def extra(name):
            return [r for r in requires if f'extra == "{name}"' in r]

        self.assertTrue(any(r.startswith("psycopg2-binary") for r in extra("binary")))
        self.assertTrue(any(r.startswith("psycopg2>") for r in extra("psycopg2")))
        self.assertTrue(any(r.lower().startswith("klein") for r in extra("klein")))
        self.assertTrue(any(r.lower().startswith("klein") for r in extra("demo")))

    def test_classifiers(self):
        classifiers = metadata.metadata("txfiberdb").get_all("Classifier")
        for c in (
            "Framework :: Twisted",
            "Typing :: Typed",
            "Programming Language :: Python :: 3.11",
            "Programming Language :: Python :: 3.12",
            "Programming Language :: Python :: 3.13",
        ):
            self.assertIn(c, classifiers)


class PluginTests(SynchronousTestCase):
    def test_listed(self):
        code, out, _ = twistd(self, ["--help"])
        self.assertEqual(code, 0, out)
        self.assertIn("klein-demo", out)

    def test_missing_klein_names_the_extra(self):
        code, out, _ = twistd(self, ["-n", "klein-demo", "--help"], blocked=["klein"])
        self.assertEqual(code, 1, out)
        self.assertIn("Klein is not installed", out)
        self.assertIn("pip install 'txfiberdb[demo]'", out)
        self.assertNotIn("Traceback", out)

    def test_missing_psycopg2_names_the_extras(self):
        code, out, _ = twistd(
            self, ["-n", "klein-demo", "--help"], blocked=["psycopg2"]
        )
        self.assertEqual(code, 1, out)
        self.assertIn("psycopg2 is not installed", out)
        self.assertIn("pip install 'txfiberdb[binary]'", out)
        self.assertIn("txfiberdb[psycopg2]", out)
        self.assertNotIn("Traceback", out)

    def test_failed_start_leaves_no_pid_file(self):
        """
        A start that fails (here: nothing listens on port 1) exits with
        status 1 and removes twistd's pid file, as a clean stop does.
        """
        code, out, workdir = twistd(
            self,
            [
                "-n",
                "--pidfile",
                "twistd.pid",
                "klein-demo",
                "--dsn",
                "postgresql://nobody@127.0.0.1:1/nothing",
                "--listen",
                "tcp:0:interface=127.0.0.1",
            ],
        )
        self.assertEqual(code, 1, out)
        self.assertIn("klein-demo could not start", out)
        self.assertEqual(os.listdir(workdir), [])


class DialectTests(SynchronousTestCase):
    def test_missing_psycopg2_names_the_extras(self):
        code = (
            "import sys; sys.modules['psycopg2'] = None\n"
            "from sqlalchemy import create_engine\n"
            "create_engine('postgresql+txpostgres://u@127.0.0.1/db')\n"
        )
        proc = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
        )
        self.assertEqual(proc.returncode, 1)
        last = proc.stderr.strip().splitlines()[-1]
        self.assertIn("ModuleNotFoundError: postgresql+txpostgres needs psycopg2", last)
        self.assertIn("txfiberdb[binary]", last)
        self.assertIn("txfiberdb[psycopg2]", last)
