"""
The documentation's code, run as written: the tutorial (``doc/tutorial.md``)
from an empty folder to a served and tested Klein service, the README's
example, and the Python blocks of the installation page.

The tutorial's blocks are taken in order:

- a ``{code-block} python`` with a ``:caption:`` is a file: it is written at
  that path in an empty folder;
- a ``console`` block holds commands (``$ ...``), each followed by the output
  it shows, if any.  Each command runs in that folder, with ``python`` being
  this interpreter and ``$LIBRARY_DB`` a fresh database on the test server.
  The shown output must appear in the real one (JSON compared as JSON).
  Three kinds are not run as such: ``pip install`` (checked instead: the
  extras it names exist and what they bring is installed here), ``export
  LIBRARY_DB=...`` (the test's database stands in), and the server command
  ``python -m twisted library ...``, which is started in the background,
  waited for, and stopped (SIGTERM) at the end, when it must exit cleanly.
  Port 8080 is replaced by a free port.
"""

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from importlib import metadata

from twisted.trial.unittest import SynchronousTestCase

from txfiberdb.testing import create_database, drop_database, dsn_to_url, test_server

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "doc")

_FENCE = re.compile(r"^(`{3,})\s*(\{code-block\}\s*)?([\w{}-]*)\s*(.*)$")


def code_blocks(path):
    """
    The fenced blocks of a Markdown (MyST) page, in order, as
    ``(language, options, text)``; ``options`` are a ``{code-block}``
    directive's ``:name: value`` lines.
    """
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m or not (m.group(2) or m.group(3)):
            i += 1
            continue
        fence, language = m.group(1), m.group(3)
        i += 1
        options = {}
        if m.group(2):
            while i < len(lines) and lines[i].startswith(":"):
                key, _, value = lines[i][1:].partition(":")
                options[key.strip()] = value.strip()
                i += 1
        body = []
        while i < len(lines) and lines[i].strip() != fence:
            body.append(lines[i])
            i += 1
        i += 1
        yield language, options, "\n".join(body).strip("\n") + "\n"


def console_commands(text):
    """``$ command`` lines of a console block, each with its shown output."""
    commands = []
    for line in text.splitlines():
        if line.startswith("$ "):
            commands.append((line[2:], []))
        elif commands and line.strip():
            commands[-1][1].append(line)
        elif line.strip():
            raise ValueError(f"output before any command: {line!r}")
    return commands


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class OutputMismatch(AssertionError):
    pass


def check_output(command, actual, expected):
    """Every line of ``expected`` appears in ``actual`` (JSON as JSON)."""
    for line in expected:
        try:
            wanted = json.loads(line)
        except ValueError:
            if line.strip() not in [a.strip() for a in actual.splitlines()]:
                raise OutputMismatch(
                    f"{command!r}: no line {line!r} in its output:\n{actual}"
                ) from None
            continue
        try:
            got = json.loads(actual)
        except ValueError:
            raise OutputMismatch(f"{command!r}: not JSON:\n{actual}") from None
        if got != wanted:
            raise OutputMismatch(f"{command!r}: got {got!r}, the page shows {wanted!r}")


def check_pip_install(command):
    """The extras and packages a ``pip install`` line names are what we ship."""
    args = shlex.split(command)[2:]
    provided = set(metadata.metadata("txfiberdb").get_all("Provides-Extra") or [])
    requires = metadata.requires("txfiberdb") or []
    for arg in args:
        name, _, extras = arg.partition("[")
        if name != "txfiberdb":
            metadata.distribution(name)  # installed here, or PackageNotFoundError
            continue
        for extra in extras.rstrip("]").split(","):
            if extra not in provided:
                raise AssertionError(f"{command!r}: txfiberdb has no extra {extra!r}")
            for req in requires:
                if f'extra == "{extra}"' in req:
                    dist = re.match(r"[A-Za-z0-9._-]+", req).group(0)
                    metadata.distribution(dist)


class TutorialTests(SynchronousTestCase):
    def test_tutorial(self):
        workdir = os.path.abspath(self.mktemp())
        os.makedirs(workdir)
        dsn = create_database("tutorial")
        self.addCleanup(drop_database, dsn)
        env = dict(
            os.environ,
            LIBRARY_DB=dsn_to_url(dsn),
            TXFIBERDB_TEST_DSN=test_server(),
            PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
            PYTHONUNBUFFERED="1",
        )
        env.pop("PYTHONPATH", None)
        port = str(free_port())
        server = None
        ran = []

        for language, options, text in code_blocks(os.path.join(DOC, "tutorial.md")):
            if language == "python":
                path = os.path.join(workdir, options["caption"])
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "w", encoding="utf-8") as f:
                    f.write(text)
                ran.append(options["caption"])
                continue
            self.assertEqual(language, "console", f"unexpected block:\n{text}")
            for command, expected in console_commands(text):
                command = command.replace("8080", port)
                ran.append(command)
                if command.startswith("pip install "):
                    check_pip_install(command)
                elif command.startswith("export LIBRARY_DB="):
                    pass
                elif command.startswith("python -m twisted library"):
                    server = self.start_server(command, workdir, env, int(port))
                else:
                    proc = subprocess.run(
                        command,
                        shell=True,
                        cwd=workdir,
                        env=env,
                        stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT,
                        text=True,
                        timeout=300,
                    )
                    self.assertEqual(
                        proc.returncode, 0, f"{command!r} failed:\n{proc.stdout}"
                    )
                    check_output(command, proc.stdout, expected)

        self.assertIsNotNone(server, "the tutorial never starts its server")
        out = self.stop_server(server)
        self.assertNotIn("Traceback", out)
        self.assertNotIn("Unhandled", out)
        # The whole page ran: files, the schema, the server, curl, trial.
        self.assertIn("library/test_app.py", ran)
        self.assertIn("python -m twisted.trial library", ran)

    def start_server(self, command, workdir, env, port):
        log = open(os.path.join(workdir, "server.log"), "w+")
        self.addCleanup(log.close)
        proc = subprocess.Popen(
            shlex.split(command),
            cwd=workdir,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.addCleanup(self.kill, proc)
        proc.log = log
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                log.seek(0)
                self.fail(f"{command!r} exited ({proc.returncode}):\n{log.read()}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return proc
            except OSError:
                if time.monotonic() > deadline:
                    self.fail(f"{command!r} never listened on {port}")
                time.sleep(0.1)

    def stop_server(self, proc):
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.fail("the server did not stop within 60 s of SIGTERM")
        proc.log.seek(0)
        out = proc.log.read()
        # twist stops on SIGTERM and exits as killed by it, or with 0.
        self.assertIn(proc.returncode, (0, -signal.SIGTERM), out)
        return out

    @staticmethod
    def kill(proc):
        if proc.poll() is None:
            proc.kill()
            proc.wait()


class ReadmeTests(SynchronousTestCase):
    def run_python(self, source, **env):
        path = os.path.join(os.path.abspath(self.mktemp()) + ".py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(source)
        proc = subprocess.run(
            [sys.executable, path],
            env=dict(os.environ, **env),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=120,
        )
        self.assertEqual(proc.returncode, 0, proc.stdout)
        return proc.stdout

    def test_readme_example(self):
        """The README's example runs as written and prints what it says."""
        (example,) = [
            text
            for language, _, text in code_blocks(os.path.join(ROOT, "README.md"))
            if language == "python"
        ]
        self.assertIn("# prints 15", example)
        dsn = create_database("readme")
        self.addCleanup(drop_database, dsn)
        out = self.run_python(example, DATABASE_URL=dsn_to_url(dsn))
        self.assertEqual(out.strip().splitlines()[-1], "15")

    def test_install_page(self):
        blocks = [
            text
            for language, _, text in code_blocks(os.path.join(DOC, "install.md"))
            if language == "python"
        ]
        self.assertTrue(blocks)
        for text in blocks:
            out = self.run_python(text)
            if "__version__" in text:
                self.assertEqual(out.strip(), metadata.version("txfiberdb"))


class ParserTests(SynchronousTestCase):
    """The block parser that the tests above rely on."""

    def test_blocks(self):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(
                "# Title\n\n```{code-block} python\n:caption: a/b.py\n\nx = 1\n```\n"
                "\n```console\n$ echo hi\nhi\n$ true\n```\n"
                "\n```{toctree}\n:glob:\n\n*\n```\n"
            )
        blocks = list(code_blocks(path))
        self.assertEqual(
            blocks[:2],
            [
                ("python", {"caption": "a/b.py"}, "x = 1\n"),
                ("console", {}, "$ echo hi\nhi\n$ true\n"),
            ],
        )
        self.assertEqual(blocks[2][0], "{toctree}")
        self.assertEqual(
            console_commands(blocks[1][2]), [("echo hi", ["hi"]), ("true", [])]
        )

    def test_output_check_can_fail(self):
        check_output("c", '{"a": 1}', ['{"a": 1}'])
        check_output("c", "x\nPASSED (successes=3)\n", ["PASSED (successes=3)"])
        with self.assertRaises(OutputMismatch):
            check_output("c", '{"a": 2}', ['{"a": 1}'])
        with self.assertRaises(OutputMismatch):
            check_output("c", "FAILED (failures=1)", ["PASSED (successes=3)"])


class BenchDataTests(SynchronousTestCase):
    """doc/bench-data.json, which the benchmark charts are drawn from."""

    def test_data_is_the_measured_tables(self):
        """
        The committed data is bench/README.md's tables, copied: a figure
        changed (or invented) in one and not the other fails here.
        ``make bench-plots`` brings them back in line.
        """
        sys.path.insert(0, DOC)
        self.addCleanup(sys.path.remove, DOC)
        import bench_plots

        with open(os.path.join(DOC, "bench-data.json"), encoding="utf-8") as f:
            data = json.load(f)
        with open(os.path.join(ROOT, "bench", "README.md"), encoding="utf-8") as f:
            readme = bench_plots.sections_of_readme(f.read())
        for name in bench_plots.NAMES:
            if data["source"][name] == "bench/README.md":
                self.assertEqual(data["tables"][name], readme[name], name)
            self.assertTrue(data["tables"][name][0]["rows"], name)
