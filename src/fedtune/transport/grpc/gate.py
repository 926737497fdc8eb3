"""The connection gate: an accept-side front end that caps connections which have not authenticated.

gRPC (grpcio 1.85) has no quota for connections still in their TLS handshake: its
``grpc.max_allowed_incoming_connections`` counts every open connection, authenticated or not, so a flood
from one address that fills it keeps honest clients out too, and Python's server has no hook before a call
arrives. The gate sits in front instead. It owns the public port; the gRPC server listens on an ephemeral
port of 127.0.0.1 (the *backend*), and the gate relays each accepted connection's bytes to it unchanged
(TLS stays end to end: the gate never sees a key or a plaintext byte).

A connection is *pending* from accept until a call on it passes the server's Authenticator (a certificate
of the federation's CA, a CN allowed and not revoked): the Authenticator reports the call's peer, which is
the gate's own socket towards the backend, so the gate knows exactly which connection proved itself. At most
``max_unauthenticated_per_address`` pending connections per source address and ``max_unauthenticated`` in
all are kept; a connection beyond either is closed at once, costing the server no descriptor, thread or
handshake. Authenticated connections are not counted (gRPC's own connection cap still bounds them). A
pending connection ends when the backend closes it: gRPC's ``handshake_timeout_s`` (TLS not finished) or
``idle_timeout_s`` (no call).

Bytes are copied through one thread, at most one read (1 MiB) buffered per direction and connection: a
destination that does not read stops the gate reading its source (backpressure), so a slow peer holds at
most 2 MiB.

Not defended here (docs/THREATS.md): a flood from many addresses (more than max_unauthenticated /
max_unauthenticated_per_address of them) fills the total and keeps *new* connections out while it is
renewed; clients already authenticated are not affected. Each IPv6 address counts on its own.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import selectors
import socket
import threading
from dataclasses import dataclass, field

log = logging.getLogger("fedtune.server")

_CHUNK = 1 << 20  # bytes read from a socket at a time (large: one GIL turn moves more, for big updates)
_SELECT_S = 0.25  # how often the loop looks at the stop flag when nothing happens


@dataclass(eq=False)
class _Pipe:
    """One relayed connection: the client's socket and the gate's socket to the backend."""

    front: socket.socket
    back: socket.socket
    address: str  # the client's source address
    back_port: int  # the gate's port towards the backend: gRPC names the connection by it
    pending: bool = True
    closed: bool = False  # both sockets closed (the other socket may still be in the same select batch)
    to_back: bytearray = field(default_factory=bytearray)  # read from front, not yet written to back
    to_front: bytearray = field(default_factory=bytearray)


@dataclass(frozen=True)
class GateStats:
    pending: int  # connections not yet authenticated, all addresses
    authenticated: int  # open connections that have made an authenticated call
    refused: int  # connections closed at accept because a cap was reached (since start)
    pending_by_address: dict[str, int]
    refused_by_address: dict[str, int]


class ConnectionGate:
    def __init__(self, *, per_address: int, total: int) -> None:
        self.per_address, self.total = per_address, total
        self._lock = threading.Lock()
        self._pending: collections.Counter[str] = collections.Counter()
        self._refused: collections.Counter[str] = collections.Counter()
        self._by_back_port: dict[int, _Pipe] = {}
        self._selector = selectors.DefaultSelector()
        self._listener: socket.socket | None = None
        self._backend: tuple[str, int] | None = None
        self._stop = threading.Event()
        self._closing = threading.Event()  # no new connections; ends once the open ones have closed
        self._thread: threading.Thread | None = None
        self._last_warned: dict[str, int] = {}
        self._accept_failures = 0

    # ------------------------------------------------------------------------------------ public

    def start(self, address: str, port: int, backend_port: int) -> int:
        """Listen on ``address:port`` (0: any free port) and relay to 127.0.0.1:``backend_port``; the bound port."""
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        try:
            listener = socket.create_server((address, port), family=family, backlog=1024)
        except OSError as err:
            raise OSError(f"cannot listen on {address}:{port}: {err.strerror}") from None
        listener.setblocking(False)
        self._listener, self._backend = listener, ("127.0.0.1", backend_port)
        self._selector.register(listener, selectors.EVENT_READ, None)
        self._thread = threading.Thread(target=self._loop, name="fedtune-gate", daemon=True)
        self._thread.start()
        return listener.getsockname()[1]

    def authenticated(self, peer: str) -> None:
        """A call passed the Authenticator; ``peer`` is gRPC's name for its connection's far end
        (``ipv4:127.0.0.1:PORT``: the gate's socket to the backend). That connection stops being pending."""
        try:
            back_port = int(peer.rsplit(":", 1)[1])
        except (IndexError, ValueError):
            return
        with self._lock:
            pipe = self._by_back_port.get(back_port)
            if pipe is not None and pipe.pending:
                pipe.pending = False
                self._release(pipe.address)

    def stats(self) -> GateStats:
        with self._lock:
            pipes = list(self._by_back_port.values())
            return GateStats(
                pending=sum(self._pending.values()),
                authenticated=sum(not p.pending for p in pipes),
                refused=sum(self._refused.values()),
                pending_by_address=dict(self._pending),
                refused_by_address=dict(self._refused),
            )

    def stop(self, drain_s: float = 5.0) -> None:
        """Stop accepting; relay what is in flight until every connection has closed (the server behind has
        stopped: it closes them) or ``drain_s`` has passed; then close whatever is left."""
        self._closing.set()
        if self._thread is not None:
            self._thread.join(drain_s)
            self._stop.set()
            self._thread.join(10.0)
            self._thread = None

    # ------------------------------------------------------------------------------------ the loop

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                if self._closing.is_set():
                    if self._listener is not None:
                        self._selector.unregister(self._listener)
                        self._listener.close()
                        self._listener = None
                    with self._lock:
                        if not self._by_back_port:
                            return
                for key, mask in self._selector.select(_SELECT_S):
                    if key.data is None:
                        self._accept()
                    elif not key.data.closed:
                        try:
                            self._relay(key.fileobj, key.data, mask)  # type: ignore[arg-type]
                        except Exception:  # a defect of ours must cost one connection, never the gate
                            log.exception("connection gate: closing a connection after an internal error")
                            self._close(key.data)
        finally:
            for key in list(self._selector.get_map().values()):
                key.fileobj.close()  # type: ignore[union-attr]
            self._selector.close()

    def _accept(self) -> None:
        assert self._listener is not None and self._backend is not None
        for _ in range(256):  # drain the backlog, but let the relays run between batches
            try:
                front, addr = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:  # out of descriptors (ulimit -n): retried at the next turn of the loop
                self._accept_failures += 1
                if self._accept_failures in (1, 10, 100, 1000) or self._accept_failures % 10000 == 0:
                    log.warning("connection gate: accept failed %d time(s) (%s)", self._accept_failures, err.strerror)
                return
            address = addr[0]
            if not self._admit(address):
                front.close()
                continue
            try:
                back = socket.create_connection(self._backend, timeout=5.0)
            except OSError as err:
                log.warning("connection gate: cannot reach the gRPC server (%s)", err.strerror)
                front.close()
                with self._lock:
                    self._release(address)
                continue
            for sock in (front, back):
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            pipe = _Pipe(front, back, address, back.getsockname()[1])
            with self._lock:
                self._by_back_port[pipe.back_port] = pipe
            self._selector.register(front, selectors.EVENT_READ, pipe)
            self._selector.register(back, selectors.EVENT_READ, pipe)

    def _admit(self, address: str) -> bool:
        """Count a new pending connection from ``address``, or refuse it (a cap is reached)."""
        with self._lock:
            total = sum(self._pending.values())
            if self._pending[address] < self.per_address and total < self.total:
                self._pending[address] += 1
                return True
            self._refused[address] += 1
            refused = self._refused[address]
        # one warning per address at 1, 10, 100, ... refusals: a flood must not flood the log too
        if refused >= self._last_warned.get(address, 0) * 10:
            self._last_warned[address] = max(1, refused)
            cap = (
                f"deployment.max_unauthenticated_per_address={self.per_address}"
                if self._pending[address] >= self.per_address
                else f"deployment.max_unauthenticated={self.total}"
            )
            log.warning("connection gate: refused %d connection(s) from %s (%s)", refused, address, cap)
        return False

    def _release(self, address: str) -> None:
        """One pending connection of ``address`` is no longer pending (lock held)."""
        self._pending[address] -= 1
        if self._pending[address] <= 0:
            del self._pending[address]

    def _relay(self, sock: socket.socket, pipe: _Pipe, mask: int) -> None:
        """Move bytes for one ready socket; a buffer that is not empty stops reading its source (backpressure)."""
        out_of = pipe.to_back if sock is pipe.front else pipe.to_front  # what sock's reads fill
        into = pipe.to_front if sock is pipe.front else pipe.to_back  # what sock's writes drain
        other = pipe.back if sock is pipe.front else pipe.front
        try:
            if mask & selectors.EVENT_WRITE and into:
                del into[: sock.send(into)]
            if mask & selectors.EVENT_READ and not out_of:
                data = sock.recv(_CHUNK)
                if not data:
                    raise ConnectionResetError  # either side closing ends the connection
                sent = 0
                with contextlib.suppress(BlockingIOError):
                    sent = other.send(data)
                out_of.extend(memoryview(data)[sent:])
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            self._close(pipe)
            return
        self._watch(pipe.front, pipe, read=not pipe.to_back, write=bool(pipe.to_front))
        self._watch(pipe.back, pipe, read=not pipe.to_front, write=bool(pipe.to_back))

    def _watch(self, sock: socket.socket, pipe: _Pipe, *, read: bool, write: bool) -> None:
        events = (selectors.EVENT_READ if read else 0) | (selectors.EVENT_WRITE if write else 0)
        registered = sock in self._selector.get_map()
        if not events:
            if registered:
                self._selector.unregister(sock)
        elif registered:
            self._selector.modify(sock, events, pipe)
        else:
            self._selector.register(sock, events, pipe)

    def _close(self, pipe: _Pipe) -> None:
        if pipe.closed:
            return
        pipe.closed = True
        with self._lock:
            if self._by_back_port.get(pipe.back_port) is pipe:
                del self._by_back_port[pipe.back_port]
            if pipe.pending:
                pipe.pending = False
                self._release(pipe.address)
        for sock in (pipe.front, pipe.back):
            with contextlib.suppress(KeyError, ValueError):  # not registered (a full buffer stopped its reads)
                self._selector.unregister(sock)
            sock.close()
