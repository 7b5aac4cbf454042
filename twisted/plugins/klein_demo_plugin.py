"""
The ``klein-demo`` twistd plugin: ``twistd -n klein-demo --help``.

A dropin: kept tiny, imports nothing of the demo until the plugin is used
(``klein_demo.tap`` is imported when twistd asks for the plugin's options).
There is no ``__init__.py`` in ``twisted/`` or ``twisted/plugins/``:
Twisted's own ``twisted.plugins`` package finds this directory on
``sys.path``.

The demo needs more than a plain ``pip install txfiberdb`` brings (Klein, a
psycopg2 build, and the ``pgserver`` wheel when the machine has no PostgreSQL
binaries): when one of those is missing, twistd says which extra to install
instead of showing a traceback.
"""

from twisted.application.service import ServiceMaker

#: The distributions the demo imports that a plain install may lack, and the
#: extra of txfiberdb that brings each.
_EXTRAS = {
    "klein": ("Klein", "txfiberdb[demo]"),
    "werkzeug": ("Klein", "txfiberdb[demo]"),
    "psycopg2": ("psycopg2", "txfiberdb[binary] (or txfiberdb[psycopg2])"),
}


class _DemoMaker(ServiceMaker):
    """A ServiceMaker that turns a missing optional dependency into a message."""

    @property
    def options(self):
        try:
            return super().options
        except ImportError as e:
            top = (e.name or "").partition(".")[0]
            if top not in _EXTRAS:
                raise
            what, extra = _EXTRAS[top]
            raise SystemExit(
                f"twistd {self.tapname}: {what} is not installed (import of "
                f"{e.name!r} failed). Install the demo's dependencies with:\n"
                f"    pip install '{extra}'"
            ) from None


kleinDemo = _DemoMaker(
    "klein-demo",
    "klein_demo.tap",
    "A demo shop: Klein routes with plain SQLAlchemy in fibers (txfiberdb)",
    "klein-demo",
)
