"""
Tests for Alembic with postgresql+txpostgres: txfiberdb.migrations (the
env.py recipe and its template), the shop's migrations (klein_demo.migrations)
run in fibers and from the alembic command line, against the test server.
"""

import contextlib
import io
import os
import re
import subprocess
import sys

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import create_engine, inspect, text
from twisted.trial.unittest import SynchronousTestCase

from klein_demo import migrations as shop_migrations
from klein_demo.models import Base
from txfiberdb import await_deferred, in_fiber, run_blocking
from txfiberdb.migrations import TEMPLATE_DIRECTORY, init, run_online
from txfiberdb.testing import create_database, drop_database, dsn_to_url

from .support import DatabaseTestCase

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHOP_INI = os.path.join(ROOT, "klein_demo", "migrations", "alembic.ini")
TABLES = {"customers", "order_lines", "orders", "products"}


def head():
    return ScriptDirectory(shop_migrations.DIRECTORY).get_current_head()


class RunOnlineTests(SynchronousTestCase):
    def test_outside_a_fiber_blocks(self):
        self.assertEqual(run_online(in_fiber), True)

    def test_inside_a_fiber_calls_directly(self):
        self.assertEqual(run_blocking(run_online, lambda x: (in_fiber(), x), 1), (True, 1))


class ShopMigrationsInFiberTests(DatabaseTestCase):
    """
    In a FiberTestCase (as in twistd's start-up fiber): the engine's
    connection handed to Alembic, and env.py opening its own.
    """

    def setUp(self):
        self.engine = create_engine(self.url)
        self.addCleanup(self.engine.dispose)
        self.addCleanup(self.reset)

    def reset(self):
        with self.engine.begin() as conn:
            conn.execute(
                text(
                    "drop table if exists order_lines, orders, products, "
                    "customers, alembic_version cascade"
                )
            )

    def tables(self):
        with self.engine.connect() as conn:
            return set(inspect(conn).get_table_names())

    def test_upgrade_and_downgrade_on_a_connection(self):
        with self.engine.begin() as conn:
            self.assertIsNone(shop_migrations.current_revision(conn))
            shop_migrations.upgrade(conn)
            self.assertEqual(shop_migrations.current_revision(conn), head())
        self.assertEqual(self.tables(), TABLES | {"alembic_version"})
        with self.engine.begin() as conn:
            command.downgrade(shop_migrations.alembic_config(connection=conn), "base")
        self.assertEqual(self.tables(), {"alembic_version"})

    def test_env_py_opens_its_own_connection(self):
        """No connection given: the stock path (NullPool engine) in a fiber."""
        config = shop_migrations.alembic_config(url=self.url)
        command.upgrade(config, "head")
        command.check(config)  # raises when the models differ
        command.downgrade(config, "base")
        command.upgrade(config, "head")
        self.assertEqual(self.tables(), TABLES | {"alembic_version"})

    def test_models_match_the_migrations(self):
        """Autogenerate against the models finds no difference."""
        with self.engine.begin() as conn:
            shop_migrations.upgrade(conn)
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        self.assertEqual(diff, [])

    def test_check_finds_a_difference(self):
        """The comparison can fail: a column the models lack is reported."""
        with self.engine.begin() as conn:
            shop_migrations.upgrade(conn)
            conn.execute(text("alter table products add column extra int"))
        config = shop_migrations.alembic_config(url=self.url)
        with self.assertRaises(CommandError) as caught:
            command.check(config)
        self.assertIn("remove_column", str(caught.exception))

    def test_schema_made_by_create_all_is_adopted(self):
        """A shop made before migrations existed is stamped, then upgraded."""
        Base.metadata.create_all(self.engine)
        with self.engine.begin() as conn:
            shop_migrations.upgrade(conn)
            self.assertEqual(shop_migrations.current_revision(conn), head())


def alembic(*args, env=None):
    """Run the alembic command line; return (status, output)."""
    out = subprocess.run(
        [sys.executable, "-m", "alembic", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=dict(os.environ, **(env or {})),
    )
    return out.returncode, out.stdout + out.stderr


class CommandLineTests(SynchronousTestCase):
    """The alembic command, as a user types it."""

    def setUp(self):
        self.dsn = create_database("txfiberdb_migrations")
        self.addCleanup(drop_database, self.dsn)
        # A plain postgresql:// URL: env.py uses it with txpostgres.
        self.url = dsn_to_url(self.dsn).replace("+txpostgres", "")

    def test_shop_commands(self):
        x = ["-c", SHOP_INI, "-x", f"url={self.url}"]
        status, out = alembic(*x, "upgrade", "head")
        self.assertEqual(status, 0, out)
        self.assertIn("Running upgrade  -> 0001", out)
        status, out = alembic(*x, "current")
        self.assertEqual(status, 0, out)
        self.assertIn("0001 (head)", out.splitlines())
        status, out = alembic(*x, "check")
        self.assertEqual(status, 0, out)
        self.assertIn("No new upgrade operations detected", out)
        status, out = alembic(*x, "downgrade", "base")
        self.assertEqual(status, 0, out)
        self.assertIn("Running downgrade 0001 -> ", out)
        # DATABASE_URL instead of -x url=
        status, out = alembic(
            "-c", SHOP_INI, "upgrade", "head", env={"DATABASE_URL": self.url}
        )
        self.assertEqual(status, 0, out)

    def test_shop_offline_sql(self):
        """--sql writes the DDL without connecting (the server is not asked)."""
        status, out = alembic(
            "-c",
            SHOP_INI,
            "-x",
            "url=postgresql://nobody@127.0.0.1:1/nothing",
            "upgrade",
            "head",
            "--sql",
        )
        self.assertEqual(status, 0, out)
        self.assertIn("CREATE TABLE products", out)
        self.assertIn("INSERT INTO alembic_version (version_num) VALUES ('0001')", out)

    def test_no_url_message(self):
        env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
        out = subprocess.run(
            [sys.executable, "-m", "alembic", "-c", SHOP_INI, "current"],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=env,
        )
        self.assertNotEqual(out.returncode, 0)
        self.assertIn("no database to migrate: pass -x url=", out.stderr)
        self.assertNotIn("Traceback", out.stderr)


class TemplateTests(SynchronousTestCase):
    """
    ``python -m txfiberdb.migrations init``: Alembic's generic environment
    with one changed line, driven by the alembic command line (autogenerate,
    upgrade, check, downgrade, --sql) and by alembic.command in-process
    (several commands in one process).
    """

    def setUp(self):
        self.dsn = create_database("txfiberdb_template")
        self.addCleanup(drop_database, self.dsn)
        self.url = dsn_to_url(self.dsn)
        self.work = os.path.abspath(self.mktemp())
        os.makedirs(self.work)
        self.ini = os.path.join(self.work, "alembic.ini")
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "txfiberdb.migrations",
                "init",
                os.path.join(self.work, "migrations"),
                "-c",
                self.ini,
            ],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        self.assertEqual(out.returncode, 0, out.stderr)
        # What a user edits after `init`: the URL and the models.
        with open(self.ini) as f:
            ini = f.read()
        ini = re.sub(
            r"(?m)^sqlalchemy.url = .*$",
            "sqlalchemy.url = " + self.url.replace("%", "%%"),
            ini,
        )
        with open(self.ini, "w") as f:
            f.write(ini)
        env_py = os.path.join(self.work, "migrations", "env.py")
        with open(env_py) as f:
            source = f.read()
        source = source.replace(
            "target_metadata = None",
            "from klein_demo.models import Base\ntarget_metadata = Base.metadata",
        )
        with open(env_py, "w") as f:
            f.write(source)

    def test_env_py_is_the_stock_one_with_one_changed_line(self):
        import alembic

        stock = os.path.join(
            os.path.dirname(alembic.__file__), "templates", "generic", "env.py"
        )
        with open(stock) as f:
            stock_lines = f.read().splitlines()
        with open(os.path.join(TEMPLATE_DIRECTORY, "txfiberdb", "env.py")) as f:
            ours = f.read().splitlines()
        added = [line for line in ours if line not in stock_lines]
        removed = [line for line in stock_lines if line not in ours]
        self.assertEqual(
            added,
            [
                "from txfiberdb.migrations import run_online",
                "    run_online(run_migrations_online)  # the one changed line",
            ],
        )
        self.assertEqual(removed, ["    run_migrations_online()"])

    def test_command_line(self):
        c = ["-c", self.ini]
        status, out = alembic(*c, "revision", "--autogenerate", "-m", "shop")
        self.assertEqual(status, 0, out)
        self.assertIn("Detected added table 'products'", out)
        status, out = alembic(*c, "upgrade", "head")
        self.assertEqual(status, 0, out)
        status, out = alembic(*c, "check")
        self.assertEqual(status, 0, out)
        self.assertIn("No new upgrade operations detected", out)
        status, out = alembic(*c, "downgrade", "base")
        self.assertEqual(status, 0, out)
        status, out = alembic(*c, "upgrade", "head", "--sql")
        self.assertEqual(status, 0, out)
        self.assertIn("CREATE TABLE products", out)

    def test_many_commands_in_one_process(self):
        """What broke with reactor.run() in env.py: ReactorNotRestartable."""
        from alembic.config import Config

        # Built in code, as a program does: no file, so env.py leaves this
        # process's logging alone (fileConfig is only for alembic.ini).
        config = Config(stdout=io.StringIO())
        config.set_main_option("script_location", os.path.join(self.work, "migrations"))
        config.set_main_option("sqlalchemy.url", self.url.replace("%", "%%"))
        with contextlib.redirect_stdout(io.StringIO()):
            command.revision(config, message="shop", autogenerate=True)
        command.upgrade(config, "head")
        command.check(config)
        command.downgrade(config, "base")
        command.upgrade(config, "head")
        engine = create_engine(self.url)
        try:
            names = run_blocking(lambda: set(inspect(engine.connect()).get_table_names()))
        finally:
            engine.dispose()
        self.assertEqual(names, TABLES | {"alembic_version"})

    def test_init_refuses_a_non_empty_directory(self):
        status = subprocess.run(
            [sys.executable, "-m", "txfiberdb.migrations", "init", self.work],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        self.assertEqual(status.returncode, 1)
        self.assertIn("error:", status.stderr)
        self.assertNotIn("Traceback", status.stderr)

    def test_init_function(self):
        target = os.path.join(self.work, "other")
        with contextlib.redirect_stdout(io.StringIO()):
            init(target, config_file=os.path.join(self.work, "other.ini"))
        self.assertTrue(os.path.exists(os.path.join(target, "env.py")))
        self.assertTrue(os.path.exists(os.path.join(self.work, "other.ini")))


class DocTests(SynchronousTestCase):
    """doc/howto/migrations.md shows code that the tests above run."""

    def test_python_blocks_are_the_tested_files(self):
        with open(os.path.join(ROOT, "doc", "howto", "migrations.md")) as f:
            blocks = re.findall(r"```python\n(.*?)```", f.read(), re.S)
        self.assertTrue(blocks)
        sources = []
        for path in (
            os.path.join(TEMPLATE_DIRECTORY, "txfiberdb", "env.py"),
            os.path.join(shop_migrations.DIRECTORY, "env.py"),
            os.path.join(ROOT, "klein_demo", "tap.py"),
        ):
            with open(path) as f:
                sources.append(f.read())
        words = [" ".join(source.split()) for source in sources]
        for block in blocks:
            # Whitespace-insensitive: the doc dedents what it quotes.
            self.assertTrue(
                any(" ".join(block.split()) in text for text in words),
                f"not in a tested file:\n{block}",
            )


class ShopStartTests(DatabaseTestCase):
    """``twistd klein-demo``'s start-up: migrations in the start-up fiber."""

    def setUp(self):
        self.engine = create_engine(self.url)
        self.addCleanup(self.engine.dispose)
        ShopMigrationsInFiberTests.reset(self)
        self.addCleanup(ShopMigrationsInFiberTests.reset, self)

    def start(self, **kwargs):
        from klein_demo.tap import ShopService

        shop = ShopService(url=self.url, listen="tcp:0:interface=127.0.0.1", **kwargs)
        shop.startService()
        self.addCleanup(lambda: shop.running and await_deferred(shop.stopService()))
        await_deferred(shop.listening)
        return shop

    def test_start_migrates_to_head(self):
        self.start(sample_data=True)
        with self.engine.connect() as conn:
            self.assertEqual(shop_migrations.current_revision(conn), head())
            self.assertEqual(conn.scalar(text("select count(*) from products")), 20)

    def test_no_migrate(self):
        self.start(migrate=False, sample_data=False)
        with self.engine.connect() as conn:
            self.assertEqual(set(inspect(conn).get_table_names()), set())

    def test_option(self):
        from klein_demo.tap import Options, makeService

        options = Options()
        options.parseOptions(["--dsn", self.url, "--no-migrate"])
        self.assertFalse(makeService(options).migrate)
        options = Options()
        options.parseOptions(["--dsn", self.url])
        self.assertTrue(makeService(options).migrate)
