"""
The one thing pyproject.toml cannot say: the package list.

The metadata, dependencies and entry points are in pyproject.toml.  What is
left here is the twisted/plugins/ dropin: a folder with no ``__init__.py`` (a
dropin must not have one; Twisted's own ``twisted.plugins`` package finds it
on ``sys.path``), shipped as the package ``twisted.plugins`` so that
``twistd --help`` lists ``klein-demo`` after installation.  setuptools'
declarative package discovery would either miss it or treat ``twisted`` as a
namespace package of ours.
"""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["txfiberdb", "txfiberdb.*", "klein_demo", "klein_demo.*"])
    + ["twisted.plugins"],
    package_data={
        "txfiberdb": ["py.typed", "alembic_templates/txfiberdb/*"],
        "klein_demo": [
            "migrations/alembic.ini",
            "migrations/script.py.mako",
            "migrations/versions/*.py",
        ],
        "twisted.plugins": ["*.py"],
    },
)
