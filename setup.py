from setuptools import find_packages, setup

with open("README.md", encoding="utf-8") as f:
    long_description = f.read()

setup(
    name="txfiberdb",
    version="0.1.0.dev0",
    description=(
        "Plain synchronous SQLAlchemy in Twisted: each unit of work runs in a "
        "greenlet that parks on txpostgres Deferreds"
    ),
    long_description=long_description,
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.11",
    # twisted/plugins/ is a dropin directory (no __init__.py), shipped as a
    # package so that `twistd --help` lists klein-demo after installation.
    packages=find_packages(include=["txfiberdb", "txfiberdb.*", "klein_demo", "klein_demo.*"])
    + ["twisted.plugins"],
    package_data={
        "txfiberdb": ["py.typed", "alembic_templates/txfiberdb/*"],
        "klein_demo": [
            "migrations/alembic.ini",
            "migrations/script.py.mako",
            "migrations/versions/*.py",
        ],
        "twisted": ["plugins/*.py"],
    },
    install_requires=[
        # 25.5: trial's coroutine _deferSetUp/_run(func, ...), which
        # txfiberdb.testing.FiberTestCase hooks to run a test in one fiber
        # (the suite passes on 25.5.0 with SQLAlchemy 2.0.20; 24.11 fails).
        "Twisted>=25.5",
        "txpostgres>=1.7",
        "psycopg2-binary>=2.9",
        "greenlet>=3.0",
        "SQLAlchemy>=2.0.20",
    ],
    extras_require={
        "test": [
            "pytest>=7",
            "pytest-twisted>=1.14",
            "pgserver>=0.1.4",
            "treq>=22.1",
            "klein>=23.5",
            "alembic>=1.16",
        ],
        "demo": ["klein>=23.5", "pgserver>=0.1.4", "alembic>=1.16"],
        # txfiberdb.migrations: Alembic's Config.get_template_directory and
        # the alembic.ini of its 1.16 templates (path_separator).
        "migrations": ["alembic>=1.16"],
        "bench": ["asyncpg>=0.29"],
        "lint": ["ruff", "mypy"],
    },
    entry_points={
        "sqlalchemy.dialects": [
            "postgresql.txpostgres = txfiberdb.dialect:TxPostgresDialect",
        ],
        "pytest11": ["txfiberdb = txfiberdb.testing.pytest_plugin"],
    },
    classifiers=[
        "Framework :: Twisted",
        "Programming Language :: Python :: 3",
        "Topic :: Database",
    ],
)
