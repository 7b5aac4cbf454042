"""
Sphinx configuration of txfiberdb's documentation site.

Build: ``make docs`` or ``tox -e docs`` (``sphinx -W --keep-going``: a
warning fails the build).  Pages are Markdown (MyST); the API reference comes
from the docstrings (autodoc); the benchmark charts are drawn at build time
from ``doc/bench-data.json`` by ``doc/bench_plots.py``.
"""

import os
import sys

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(here))  # the checkout's txfiberdb
sys.path.insert(0, here)  # bench_plots

import txfiberdb  # noqa: E402

project = "txfiberdb"
author = "the txfiberdb authors"
copyright = "the txfiberdb authors"  # noqa: A001
release = txfiberdb.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.viewcode",
]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build", "_generated"]
templates_path: list[str] = []

# MyST: `{directive}` fences, `:::` fences, anchors for ## and ### headings
# (so pages can link to #a-section), no "h1 must be first" fuss.
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

# autodoc: members in source order, with their signatures' type hints in the
# description; modules are imported from this checkout.
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {
    "members": True,
    "show-inheritance": True,
}
# Our docstrings only: overrides of SQLAlchemy methods would otherwise show
# SQLAlchemy's own docstrings, with its Sphinx roles and labels.
autodoc_inherit_docstrings = False

html_theme = "furo"
html_title = f"txfiberdb {release}"
html_static_path: list[str] = []


def _draw_benchmark_charts(app):
    """Draw the charts of benchmarks.md from the committed measurements."""
    import bench_plots

    bench_plots.draw(
        os.path.join(here, "bench-data.json"), os.path.join(here, "_generated")
    )


def setup(app):
    app.connect("builder-inited", _draw_benchmark_charts)
