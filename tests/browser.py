"""
Headless Chromium for tests, driven over the Chrome DevTools protocol on a
pipe (``--remote-debugging-pipe``: JSON messages ended by NUL on file
descriptors 3 and 4), so that no websocket client is needed and nothing
listens on a port.  Everything waits through the reactor (the page under
test is served by the same reactor).
"""

import json
import os
import shutil

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol
from twisted.trial.unittest import SkipTest

from txfiberdb import WaitTimeout, await_deferred

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")


def find_chromium():
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


class CDPError(Exception):
    """The browser answered a command with an error."""


class _Pipe(ProcessProtocol):
    def __init__(self):
        self.buffer = b""
        self.pending = {}
        self.next_id = 0
        self.output = b""
        self.ended = Deferred()
        self.running = True

    def childDataReceived(self, fd, data):
        if fd != 4:
            self.output = (self.output + data)[-4000:]
            return
        self.buffer += data
        while b"\0" in self.buffer:
            raw, self.buffer = self.buffer.split(b"\0", 1)
            message = json.loads(raw)
            d = self.pending.pop(message.get("id"), None)
            if d is None:
                continue  # an event: not needed here
            if "error" in message:
                d.errback(CDPError(message["error"].get("message", message["error"])))
            else:
                d.callback(message.get("result", {}))

    def send(self, method, params=None, session_id=None):
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params or {}}
        if session_id is not None:
            message["sessionId"] = session_id
        d = Deferred()
        self.pending[self.next_id] = d
        self.transport.writeToChild(3, json.dumps(message).encode() + b"\0")
        return d

    def processEnded(self, reason):
        self.running = False
        pending, self.pending = self.pending, {}
        for d in pending.values():
            d.errback(CDPError("the browser exited"))
        self.ended.callback(None)


class Browser:
    """One headless Chromium with one page; call in a fiber."""

    def __init__(self, testcase):
        path = find_chromium()
        if path is None:
            raise SkipTest(
                "headless Chromium is not installed (Debian package 'chromium'; "
                ".ci/run installs it)"
            )
        profile = testcase.mktemp()
        os.makedirs(profile)
        self.proto = _Pipe()
        args = [
            path,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            f"--user-data-dir={os.path.abspath(profile)}",
            "--remote-debugging-pipe",
            "about:blank",
        ]
        reactor.spawnProcess(
            self.proto,
            path,
            args,
            env={"HOME": os.path.abspath(profile), "PATH": os.environ.get("PATH", "")},
            childFDs={0: "w", 1: "r", 2: "r", 3: "w", 4: "r"},
        )
        testcase.addCleanup(self.close)
        self.session = None

    def command(self, method, params=None, timeout=60):
        try:
            return await_deferred(
                self.proto.send(method, params, self.session), timeout=timeout
            )
        except WaitTimeout:
            raise AssertionError(
                f"the browser did not answer {method} within {timeout} s; its "
                f"output: {self.proto.output.decode('utf-8', 'replace')}"
            ) from None

    def open(self, url):
        """Open ``url`` in a new page and attach to it."""
        target = self.command("Target.createTarget", {"url": url})["targetId"]
        self.session = self.command(
            "Target.attachToTarget", {"targetId": target, "flatten": True}
        )["sessionId"]

    def evaluate(self, expression):
        """The value of a JavaScript expression in the page."""
        result = self.command(
            "Runtime.evaluate", {"expression": expression, "returnByValue": True}
        )
        if "exceptionDetails" in result:
            raise CDPError(result["exceptionDetails"].get("text", "exception"))
        return result["result"].get("value")

    def close(self):
        if not self.proto.running:
            return
        self.session = None
        try:
            self.command("Browser.close", timeout=10)
        except (CDPError, AssertionError):
            pass
        if self.proto.running:
            try:
                await_deferred(self.proto.ended, timeout=10)
            except WaitTimeout:
                self.proto.transport.signalProcess("KILL")
                await_deferred(self.proto.ended)
