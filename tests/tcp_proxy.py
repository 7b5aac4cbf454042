"""
A TCP proxy in a process of its own, for tests that need a hop between the
client and PostgreSQL (as PgBouncer or a load balancer would be) which keeps
working while the test's own reactor is busy.

    python -m tests.tcp_proxy <client endpoint of the target>

Listens on a free port of 127.0.0.1, prints it on stdout, forwards each
connection to the target (``tcp:host=...:port=...`` or ``unix:path=...``).
"""

import sys

from twisted.internet import endpoints, reactor
from twisted.protocols.portforward import ProxyClientFactory, ProxyFactory, ProxyServer


class Forward(ProxyServer):
    def connectionMade(self):
        self.transport.pauseProducing()
        client = ProxyClientFactory()
        client.setServer(self)
        target = endpoints.clientFromString(reactor, self.factory.target)
        target.connect(client).addErrback(lambda _: self.transport.loseConnection())


def main(target):
    factory = ProxyFactory("unused", 0)
    factory.protocol = Forward
    factory.target = target

    def listening(port):
        print(port.getHost().port, flush=True)

    endpoints.serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(
        factory
    ).addCallback(listening)
    reactor.run()


if __name__ == "__main__":
    main(sys.argv[1])
