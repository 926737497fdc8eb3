"""The connection gate on its own (transport/grpc/gate.py), in front of a plain TCP echo server: bytes pass
unchanged both ways (with backpressure), and connections that have not authenticated are counted and capped
per source address and in all. The gate in front of the gRPC server, under floods: test_grpc_limits.py."""

from __future__ import annotations

import hashlib
import socket
import socketserver
import threading

import pytest

from _grpc_support import wait_until
from fedtune.transport.grpc.gate import ConnectionGate


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(1 << 16):
            self.request.sendall(data)


@pytest.fixture
def gate():
    echo = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    echo.daemon_threads = True
    threading.Thread(target=echo.serve_forever, daemon=True).start()
    made: list[ConnectionGate] = []

    def make(per_address: int, total: int) -> tuple[ConnectionGate, int]:
        g = ConnectionGate(per_address=per_address, total=total)
        made.append(g)
        return g, g.start("127.0.0.1", 0, echo.server_address[1])

    yield make
    for g in made:
        g.stop()
    echo.shutdown()
    echo.server_close()


def _connect(port: int, source: str) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=60, source_address=(source, 0))


def test_bytes_pass_unchanged_both_ways(gate):
    _, port = gate(per_address=4, total=8)
    payload = bytes(range(256)) * (32 * 1024)  # 8 MiB: far more than the socket buffers, so backpressure acts
    with _connect(port, "127.0.0.1") as sock:
        sender = threading.Thread(target=sock.sendall, args=(payload,), daemon=True)
        sender.start()
        got, digest = 0, hashlib.sha256()
        while got < len(payload):
            chunk = sock.recv(1 << 16)
            assert chunk, "the gate closed the connection"
            digest.update(chunk)
            got += len(chunk)
        sender.join(60)
    assert got == len(payload) and digest.digest() == hashlib.sha256(payload).digest()


def test_unauthenticated_connections_are_capped_per_address_and_in_all(gate):
    g, port = gate(per_address=2, total=3)
    held = [_connect(port, "127.0.0.2") for _ in range(4)]  # 2 kept, 2 closed at accept
    wait_until(lambda: g.stats().refused == 2, 60, "the gate to refuse two")
    assert g.stats().pending_by_address == {"127.0.0.2": 2}
    other = [_connect(port, "127.0.0.3") for _ in range(2)]  # the total (3) leaves room for one
    wait_until(lambda: g.stats().refused == 3, 60, "the gate to refuse the fourth in all")
    assert g.stats().pending == 3 and g.stats().refused_by_address == {"127.0.0.2": 2, "127.0.0.3": 1}

    # a connection that authenticates is no longer counted: the gate knows it by its port towards the server
    kept = next(s for s in other if _alive(s))
    with g._lock:  # the one pipe of 127.0.0.3 (test-only look inside, to name its backend port)
        (back_port,) = [p for p, pipe in g._by_back_port.items() if pipe.address == "127.0.0.3"]
    g.authenticated(f"ipv4:127.0.0.1:{back_port}")
    assert g.stats().pending == 2 and g.stats().authenticated == 1
    assert _alive(kept)  # and it still relays
    late = _connect(port, "127.0.0.4")
    wait_until(lambda: g.stats().pending == 3, 60, "a new connection to take the freed slot")
    assert _alive(late)

    # a closed pending connection frees its slot
    for sock in held:
        sock.close()
    wait_until(lambda: "127.0.0.2" not in g.stats().pending_by_address, 60, "closed connections to be released")
    for sock in [*other, late]:
        sock.close()


def _alive(sock: socket.socket) -> bool:
    """True when the connection relays (an echo comes back); False when the gate closed it."""
    try:
        sock.sendall(b"ping")
        return sock.recv(4) == b"ping"
    except OSError:
        return False
