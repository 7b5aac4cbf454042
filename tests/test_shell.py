"""
Tests for the interactive shells (txfiberdb.shell, klein_demo.shell): real
processes whose console is driven through stdin, against the test server.
"""

import os
import re
import signal
import subprocess
import sys
import threading
import uuid

from twisted.trial.unittest import SynchronousTestCase

from txfiberdb.shell import to_txpostgres_url
from txfiberdb.testing import create_database, drop_database, dsn_to_url

from .test_blocking import default_sigint, wait_for_query

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Console:
    """A shell process; ``send`` a line, ``expect`` a line of its stdout."""

    def __init__(self, case, *args, env=None):
        environ = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
        environ.update(env or {})
        self.proc = subprocess.Popen(
            [sys.executable, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env=environ,
            preexec_fn=default_sigint,
        )
        case.addCleanup(self.kill)
        # A console that never answers must not hang the suite: killed after
        # a generous deadline, its pipes close and the test fails.
        self.watchdog = threading.Timer(120, self.proc.kill)
        self.watchdog.start()
        case.addCleanup(self.watchdog.cancel)

    def send(self, line):
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def expect(self, text):
        """Read stdout lines until one ends with ``text`` (prompts precede it)."""
        seen = []
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise AssertionError(f"{text!r} never came; stdout: {seen}")
            seen.append(line)
            if line.rstrip("\n").endswith(text):
                return

    def expect_error(self, text):
        """Read stderr lines until one ends with ``text``."""
        seen = []
        while True:
            line = self.proc.stderr.readline()
            if not line:
                raise AssertionError(f"{text!r} never came; stderr: {seen}")
            seen.append(line)
            if line.rstrip("\n").endswith(text):
                return

    def finish(self, stdin_text=""):
        out, err = self.proc.communicate(stdin_text, timeout=120)
        return self.proc.returncode, out, err

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


def shell(case, url, *args, env=None):
    return Console(case, "-m", "txfiberdb.shell", url, *args, env=env)


class ShellTests(SynchronousTestCase):
    def setUp(self):
        self.dsn = create_database("txfiberdb_shell")
        self.addCleanup(drop_database, self.dsn)
        # As a user types it: a plain postgresql:// URL.
        self.url = dsn_to_url(self.dsn).replace("+txpostgres", "")

    def test_session_lives_across_inputs(self):
        """One transaction over several inputs: same connection, rollback works."""
        c = shell(self, self.url)
        status, out, err = c.finish(
            "session.execute(text('create table t (x int)'))\n"
            "session.execute(text('insert into t values (41)'))\n"
            "pid = session.scalar(text('select pg_backend_pid()'))\n"
            "print('value', session.scalar(text('select x + 1 from t')))\n"
            "print('same', pid == session.scalar(text('select pg_backend_pid()')))\n"
            "session.rollback()\n"
            "with engine.connect() as conn:\n"
            "    print('tables', conn.scalar(text(\"select count(*) from pg_tables"
            " where tablename = 't'\")))\n"
            "\n"
        )
        self.assertEqual(status, 0, err)
        self.assertIn("value 42\n", out)
        self.assertIn("same True\n", out)
        self.assertIn("tables 0\n", out)
        self.assertNotIn("Traceback", err)

    def test_models_imported_and_orm(self):
        c = shell(self, self.url, "--import", "klein_demo.models")
        status, out, err = c.finish(
            "Base.metadata.create_all(engine)\n"
            "session.add(Product(sku='S1', name='Cup', price_cents=100, stock=2))\n"
            "session.commit()\n"
            "print('stock', session.scalars(select(Product.stock)).all())\n"
        )
        self.assertEqual(status, 0, err)
        self.assertIn("stock [2]\n", out)
        self.assertIn("imported from klein_demo.models", err)

    def test_error_shows_the_users_frames_only(self):
        c = shell(self, self.url)
        status, out, err = c.finish(
            "session.execute(text('select 1/0'))\nprint('next', 1 + 1)\n"
        )
        self.assertEqual(status, 0, err)
        # The user's frame and the error; not the frames of SQLAlchemy, the
        # driver or the console's machinery, nor psycopg2's chained error.
        self.assertIn(
            "Traceback (most recent call last):\n"
            '  File "<console>", line 1, in <module>\n'
            "sqlalchemy.exc.DataError: (psycopg2.errors.DivisionByZero) division "
            "by zero\n\n[SQL: select 1/0]\n",
            err,
        )
        self.assertNotIn("txfiberdb/", err)
        self.assertNotIn("sqlalchemy/", err)
        self.assertEqual(err.count("Traceback"), 1)
        self.assertIn("next 2\n", out)

    def test_python_error_keeps_its_frames(self):
        c = shell(self, self.url)
        status, out, err = c.finish("def f():\n    return 1/0\n\nf()\n")
        self.assertEqual(status, 0, err)
        self.assertIn(
            "Traceback (most recent call last):\n"
            '  File "<console>", line 1, in <module>\n'
            '  File "<console>", line 2, in f\n'
            "ZeroDivisionError: division by zero\n",
            err,
        )

    def test_exit_status(self):
        status, out, err = shell(self, self.url).finish("exit(3)\n")
        self.assertEqual(status, 3)
        self.assertNotIn("Traceback", err)

    def test_ctrl_d(self):
        status, out, err = shell(self, self.url).finish("")
        self.assertEqual(status, 0)
        self.assertIn("txfiberdb shell on postgresql+txpostgres://", err)
        self.assertNotIn("Traceback", err)

    def test_url_from_the_environment(self):
        c = shell(self, "--echo", env={"DATABASE_URL": self.url})
        status, out, err = c.finish("print(engine.url.drivername)\n")
        self.assertEqual(status, 0, err)
        self.assertIn("postgresql+txpostgres\n", out)

    def test_ctrl_c_cancels_a_running_query(self):
        c = shell(self, self.url)
        c.send("print('connected', session.scalar(text('select 1')))")
        c.expect("connected 1")
        c.send("session.execute(text('select pg_sleep(60)'))")
        # Ctrl-C once the query runs on the server (earlier, it would
        # interrupt Python code, which is another test).
        wait_for_query(self.dsn, "select pg_sleep(60)")
        c.proc.send_signal(signal.SIGINT)
        c.expect_error("KeyboardInterrupt (the statement's query was cancelled)")
        status, out, err = c.finish(
            "session.rollback()\n"
            "print('active', session.scalar(text(\"select count(*) from "
            "pg_stat_activity where query like 'select pg_sleep(60)%' "
            "and state = 'active'\")))\n"
        )
        self.assertEqual(status, 0, err)
        self.assertIn("active 0\n", out)
        self.assertNotIn("Traceback", err)

    def test_ctrl_c_while_computing(self):
        """
        Ctrl-C while a statement computes without waiting is reported when
        it ends, and does not cancel the next statement's query.
        """
        flag = os.path.abspath(self.mktemp())
        c = shell(self, self.url)
        c.send("import os")
        c.send(f"flag = {flag!r}")
        c.send("print('spinning', flush=True); exec('while not os.path.exists(flag): pass')")
        c.expect("spinning")
        c.proc.send_signal(signal.SIGINT)
        open(flag, "w").close()
        c.expect_error("KeyboardInterrupt")
        status, out, err = c.finish("print('after', session.scalar(text('select 7')))\n")
        self.assertEqual(status, 0, err)
        self.assertIn("after 7\n", out)
        self.assertNotIn("Traceback", err)

    def test_ctrl_c_at_the_prompt(self):
        c = shell(self, self.url)
        c.send("print('ready')")
        c.expect("ready")
        c.proc.send_signal(signal.SIGINT)
        # Typed after the console has shown the interrupt (a pipe's buffered
        # input may be lost to an interrupted read, as in any Python console).
        c.expect_error("KeyboardInterrupt")
        status, out, err = c.finish("print('after', session.scalar(text('select 7')))\n")
        self.assertEqual(status, 0, err)
        self.assertIn("after 7\n", out)


class ShellErrorTests(SynchronousTestCase):
    """Bad input: one line on stderr, status 2, no traceback."""

    def check(self, *args, message, env=None):
        out = subprocess.run(
            [sys.executable, "-m", "txfiberdb.shell", *args],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env={k: v for k, v in os.environ.items() if k != "DATABASE_URL"},
            stdin=subprocess.DEVNULL,
        )
        self.assertEqual(out.returncode, 2, out.stderr)
        self.assertRegex(out.stderr, message)
        self.assertNotIn("Traceback", out.stderr)

    def test_no_url(self):
        self.check(message="no database: give a URL or set DATABASE_URL")

    def test_not_a_url(self):
        self.check("not a url", message="not a database URL")

    def test_other_database(self):
        self.check("mysql://u@h/db", message="not mysql")

    def test_unreachable(self):
        self.check(
            "postgresql://nobody@127.0.0.1:1/nothing",
            message="error: cannot use the database: .*",
        )

    def test_missing_database(self):
        from sqlalchemy.engine import make_url

        dsn = create_database("txfiberdb_shell")
        self.addCleanup(drop_database, dsn)
        url = make_url(dsn_to_url(dsn)).set(database=f"missing_{uuid.uuid4().hex[:8]}")
        self.check(
            url.render_as_string(hide_password=False),
            message='database "missing_[0-9a-f]+" does not exist',
        )

    def test_bad_import(self):
        dsn = create_database("txfiberdb_shell")
        self.addCleanup(drop_database, dsn)
        self.check(
            dsn_to_url(dsn), "--import", "no_such_module",
            message="--import: No module named 'no_such_module'",
        )


class UrlTests(SynchronousTestCase):
    def test_forms(self):
        self.assertEqual(
            to_txpostgres_url("postgres://u:p@h:5/db"), "postgresql+txpostgres://u:p@h:5/db"
        )
        self.assertEqual(
            to_txpostgres_url("postgresql+txpostgres://u@h/db"),
            "postgresql+txpostgres://u@h/db",
        )
        with self.assertRaises(ValueError):
            to_txpostgres_url("postgresql+psycopg2://u@h/db")


class DemoShellTests(SynchronousTestCase):
    def test_doc_session(self):
        """doc/howto/shell.md's session, typed into the demo's shell."""
        with open(os.path.join(ROOT, "doc", "howto", "shell.md")) as f:
            (block,) = re.findall(r"```pycon\n(.*?)```", f.read(), re.S)
        inputs, expected = [], []
        for line in block.splitlines():
            if line.startswith((">>> ", "... ")):
                inputs.append(line[4:])
            else:
                expected.append(line)
        status, out, err = Console(self, "-m", "klein_demo.shell").finish(
            "\n".join(inputs) + "\n"
        )
        self.assertEqual(status, 0, err)
        printed = out.replace(">>> ", "").replace("... ", "").splitlines()
        self.assertEqual(printed, expected)

    def test_throwaway_server_with_sample_data(self):
        c = Console(self, "-m", "klein_demo.shell")
        status, out, err = c.finish(
            "print('products', session.scalar(select(func.count()).select_from(Product)))\n"
            "print('lines', len(session.get(Customer, 1).orders[0].lines))\n"
        )
        self.assertEqual(status, 0, err)
        self.assertIn("products 20\n", out)
        self.assertIn("lines 2\n", out)
        self.assertIn("throwaway PostgreSQL", err)
        self.assertNotIn("Traceback", err)

    def test_dsn(self):
        dsn = create_database("txfiberdb_shell")
        self.addCleanup(drop_database, dsn)
        c = Console(self, "-m", "klein_demo.shell", "--dsn", dsn_to_url(dsn))
        status, out, err = c.finish("print(Order.__tablename__, engine.url.database)\n")
        self.assertEqual(status, 0, err)
        self.assertIn("orders txfiberdb_shell_", out)
