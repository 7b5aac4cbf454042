"""
Check the file lists of a built sdist and wheel (``.ci/dist-check`` runs it).

    python .ci/check_dist.py DIST_DIR [SOURCE_TREE]

The wheel must hold the packages, ``py.typed``, the twistd dropin (without an
``__init__.py`` beside it) and the licence, and nothing of the tests; its
metadata must carry the licence expression, the version of
``txfiberdb.__version__`` and both entry points.  The sdist must hold every
file that git tracks in SOURCE_TREE (the test suite, the compliance suite, the
documentation, the benchmarks: what a packager needs to run the tests), and
no build litter.  Exits 1 naming what is wrong.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import tarfile
import zipfile
from email.parser import Parser
from pathlib import Path

#: Tracked files an sdist does not need.
NOT_IN_SDIST = {".gitignore"}


def version_of(tree: Path) -> str:
    """``txfiberdb.__version__`` as written in the source, without importing."""
    module = ast.parse((tree / "txfiberdb" / "__init__.py").read_text())
    for node in module.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__version__" for t in node.targets
        ):
            return ast.literal_eval(node.value)
    raise SystemExit("txfiberdb/__init__.py has no __version__")


def check_wheel(path: Path, version: str) -> list[str]:
    problems = []
    with zipfile.ZipFile(path) as whl:
        names = set(whl.namelist())
        dist_info = f"txfiberdb-{version}.dist-info"
        metadata = Parser().parsestr(whl.read(f"{dist_info}/METADATA").decode())
        entry_points = whl.read(f"{dist_info}/entry_points.txt").decode()
    required = {
        "txfiberdb/__init__.py",
        "txfiberdb/py.typed",
        "txfiberdb/testing/__init__.py",
        "txfiberdb/testing/pytest_plugin.py",
        "klein_demo/__init__.py",
        "klein_demo/tap.py",
        "twisted/plugins/klein_demo_plugin.py",
        f"{dist_info}/licenses/LICENSE",
    }
    problems += [f"wheel lacks {name}" for name in sorted(required - names)]
    for name in sorted(names):
        top = name.split("/", 1)[0]
        if top not in {"txfiberdb", "klein_demo", "twisted", dist_info}:
            problems.append(f"wheel holds {name} (not a package of ours)")
        if name in {"twisted/__init__.py", "twisted/plugins/__init__.py"}:
            problems.append(f"wheel holds {name}: it would shadow Twisted")
        if "__pycache__" in name or name.endswith((".pyc", "dropin.cache")):
            problems.append(f"wheel holds build litter {name}")
    if metadata["License-Expression"] != "MIT":
        problems.append(f"License-Expression is {metadata['License-Expression']!r}")
    if metadata["Version"] != version:
        problems.append(f"wheel version {metadata['Version']} != {version}")
    for needle in (
        "postgresql.txpostgres = txfiberdb.dialect:TxPostgresDialect",
        "txfiberdb = txfiberdb.testing.pytest_plugin",
    ):
        if needle not in entry_points:
            problems.append(f"entry point missing: {needle}")
    extras = set(metadata.get_all("Provides-Extra") or [])
    for extra in ("binary", "psycopg2", "klein", "demo", "test", "docs"):
        if extra not in extras:
            problems.append(f"extra {extra!r} missing")
    return problems


def check_sdist(path: Path, version: str, tree: Path | None) -> list[str]:
    problems = []
    prefix = f"txfiberdb-{version}/"
    with tarfile.open(path) as sdist:
        names = {
            m.name[len(prefix) :]
            for m in sdist.getmembers()
            if m.isfile() and m.name.startswith(prefix)
        }
    required = {
        "LICENSE",
        "README.md",
        "CHANGELOG.md",
        "pyproject.toml",
        "setup.py",
        "Makefile",
        "tox.ini",
        "tests/__init__.py",
        "compliance/run.sh",
        "doc/conf.py",
        "doc/index.md",
        "bench/README.md",
        "twisted/plugins/klein_demo_plugin.py",
    }
    if tree is not None and (tree / ".git").exists():
        tracked = subprocess.run(
            ["git", "ls-files"], cwd=tree, check=True, capture_output=True, text=True
        ).stdout.split()
        required |= set(tracked) - NOT_IN_SDIST
    problems += [f"sdist lacks {name}" for name in sorted(required - names)]
    for name in sorted(names):
        if "__pycache__" in name or name.endswith((".pyc", "dropin.cache")):
            problems.append(f"sdist holds build litter {name}")
        if name.startswith(("doc/_build/", ".venv/", ".tox/")):
            problems.append(f"sdist holds {name}")
    return problems


def main(argv: list[str]) -> int:
    dist = Path(argv[1])
    tree = Path(argv[2]) if len(argv) > 2 else None
    version = version_of(tree or Path(__file__).resolve().parent.parent)
    (wheel,) = dist.glob("txfiberdb-*.whl")
    (sdist,) = dist.glob("txfiberdb-*.tar.gz")
    problems = check_wheel(wheel, version) + check_sdist(sdist, version, tree)
    for problem in problems:
        print(f"check_dist: {problem}")
    if problems:
        return 1
    print(f"check_dist: {wheel.name} and {sdist.name} hold what they should")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
