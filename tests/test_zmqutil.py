"""Closing a bound ZeroMQ socket and rebinding its port at once (real sockets, loopback)."""

from __future__ import annotations

import zmq

from tests.servers import free_port
from trollmoves.zmqutil import ReleaseWatch, close_and_wait


def test_port_is_free_once_close_and_wait_returns() -> None:
    context = zmq.Context.instance()
    port = free_port()
    for _ in range(200):
        server = context.socket(zmq.ROUTER)
        server.bind(f"tcp://*:{port}")  # raises "Address already in use" if not released
        client = context.socket(zmq.REQ)
        client.connect(f"tcp://127.0.0.1:{port}")
        client.send(b"ping")
        identity, _, _ = server.recv_multipart()
        server.send_multipart([identity, b"", b"pong"])
        assert client.recv() == b"pong"
        client.close(linger=0)
        assert close_and_wait(server, linger=1000)


def test_watch_a_socket_closed_elsewhere_and_unbound_sockets() -> None:
    context = zmq.Context.instance()
    port = free_port()
    publisher = context.socket(zmq.PUB)
    publisher.bind(f"tcp://*:{port}")
    released = ReleaseWatch(publisher)
    publisher.close()
    assert released.wait()
    again = context.socket(zmq.PUB)
    again.bind(f"tcp://*:{port}")  # free again
    assert close_and_wait(again)
    assert close_and_wait(context.socket(zmq.PUB))  # never bound: nothing to wait for
