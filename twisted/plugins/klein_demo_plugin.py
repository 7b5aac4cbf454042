"""
The ``klein-demo`` twistd plugin: ``twistd -n klein-demo --help``.

A dropin: kept tiny, imports nothing of the demo until the plugin is used
(``klein_demo.tap`` is imported lazily by ServiceMaker).  There is no
``__init__.py`` in ``twisted/`` or ``twisted/plugins/``: Twisted's own
``twisted.plugins`` package finds this directory on ``sys.path``.
"""

from twisted.application.service import ServiceMaker

kleinDemo = ServiceMaker(
    "klein-demo",
    "klein_demo.tap",
    "A demo shop: Klein routes with plain SQLAlchemy in fibers (txfiberdb)",
    "klein-demo",
)
