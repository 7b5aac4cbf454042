"""
The public API, pinned: an accidental change to it fails here.
"""

from twisted.trial.unittest import SynchronousTestCase

import txfiberdb


class ExportTests(SynchronousTestCase):
    def test_all(self):
        self.assertEqual(
            sorted(txfiberdb.__all__),
            [
                "FiberQueuePool",
                "ListenerClosed",
                "Missed",
                "NotInFiberError",
                "Notification",
                "Subscription",
                "WaitTimeout",
                "await_deferred",
                "current_fiber",
                "fiber_scope",
                "fiber_scoped_session",
                "fiber_stats",
                "fibered",
                "in_fiber",
                "listen",
                "listener_stats",
                "on_fiber_exit",
                "pool_stats",
                "run_blocking",
                "run_in_fiber",
                "shield",
                "sleep",
            ],
        )

    def test_names_exist(self):
        for name in txfiberdb.__all__:
            self.assertTrue(hasattr(txfiberdb, name), name)

    def test_dialect_entry_point(self):
        from importlib.metadata import entry_points

        (ep,) = [
            e
            for e in entry_points(group="sqlalchemy.dialects")
            if e.name == "postgresql.txpostgres"
        ]
        self.assertEqual(ep.value, "txfiberdb.dialect:TxPostgresDialect")
