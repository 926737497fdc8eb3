"""What one client, or a flood of connections, may hold on the server: gRPC server options and per-client
stream slots.

Every limit is a ``deployment`` key (docs/DEPLOYMENT.md, docs/THREATS.md):

* connections: at most ``connection_limit`` open at once (gRPC closes the rest at accept); one that has not
  finished its TLS handshake (so has not shown a certificate from the federation's CA) is closed after
  ``handshake_timeout_s``; one with no call for ``idle_timeout_s`` is closed; every connection is pinged
  each ``keepalive_s`` and dropped when it does not answer;
* calls: at most ``rpc_limit`` at once (gRPC refuses more with RESOURCE_EXHAUSTED), which also sizes the
  thread pool, so a flood of calls cannot grow the server's threads;
* per client (certificate CN): at most ``max_streams_per_client`` Pull/Push streams at once (StreamSlots);
  every upload is cancelled by the server ``upload_timeout_s`` after it started, whatever the client's own
  deadline says.
"""

from __future__ import annotations

import collections
import threading

from fedtune.config.deployment import DeploymentConfig


def server_options(dep: DeploymentConfig) -> list[tuple[str, int]]:
    """The gRPC core options that bound connections (besides the message sizes of ``grpc_options``)."""
    return [
        ("grpc.max_allowed_incoming_connections", dep.connection_limit),
        ("grpc.server_handshake_timeout_ms", int(dep.handshake_timeout_s * 1000)),
        ("grpc.max_connection_idle_ms", int(dep.idle_timeout_s * 1000)),
        ("grpc.keepalive_time_ms", int(dep.keepalive_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(min(dep.keepalive_s, 20.0) * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),  # clients ping while they train, between calls
        ("grpc.http2.max_pings_without_data", 0),  # our keepalive pings go on while a connection is quiet
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 5000),  # clients ping every 10s
        # unlimited strikes, as before: gRPC's own flow-control (BDP) pings could count as strikes and get an
        # honest client's connection closed mid-round (ENHANCE_YOUR_CALM "too_many_pings"); a ping flood from
        # an enrolled client costs CPU only (docs/THREATS.md, "What is not defended")
        ("grpc.http2.max_ping_strikes", 0),
        # streams per connection: an honest client has a poll or an upload, a heartbeat and maybe a stale poll
        ("grpc.max_concurrent_streams", dep.max_streams_per_client + 4),
    ]


class StreamSlots:
    """Counts each client's open streams; ``take`` refuses one beyond ``per_client``."""

    def __init__(self, per_client: int) -> None:
        self.per_client = per_client
        self._open: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()

    def take(self, client_id: str) -> bool:
        with self._lock:
            if self._open[client_id] >= self.per_client:
                return False
            self._open[client_id] += 1
            return True

    def give(self, client_id: str) -> None:
        with self._lock:
            self._open[client_id] -= 1
            if self._open[client_id] <= 0:
                del self._open[client_id]

    def held(self, client_id: str) -> int:
        with self._lock:
            return self._open[client_id]
