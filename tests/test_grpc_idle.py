"""A connection that makes no call is closed by the server after deployment.idle_timeout_s (gRPC's
max_connection_idle), on 127.0.0.1 with real TLS: an enrolled client cannot park connections for ever."""

from __future__ import annotations

import threading

import grpc

from _grpc_support import RawClient, make_pki
from fedtune.config.deployment import DeploymentConfig
from fedtune.transport.grpc.server import GrpcServerTransport, ServerTLS


def test_a_connection_with_no_calls_is_closed_after_the_idle_timeout(tmp_path):
    pki = make_pki(tmp_path)
    dep = DeploymentConfig(
        port=0, tls_ca=str(pki / "ca.pem"), tls_cert=str(pki / "server.pem"), tls_key=str(pki / "server.key"),
        min_clients=1, heartbeat_s=0.5, idle_timeout_s=1.0,
    )  # fmt: skip
    transport = GrpcServerTransport(dep, tls=ServerTLS.from_config(dep), config_yaml="seed: 0\n")
    transport.start()
    client = RawClient(transport.port, pki, "client_000")
    states: list[grpc.ChannelConnectivity] = []
    closed = threading.Event()

    def watch(state: grpc.ChannelConnectivity) -> None:
        states.append(state)
        # READY -> IDLE: the server sent GOAWAY (the client's own idle timeout is 30 minutes)
        if grpc.ChannelConnectivity.READY in states and state is grpc.ChannelConnectivity.IDLE:
            closed.set()

    try:
        client.join(wait=True)  # one call, then nothing
        client.channel.subscribe(watch, try_to_connect=False)
        assert closed.wait(120), f"the idle connection was not closed; states seen: {states}"
    finally:
        client.channel.unsubscribe(watch)
        client.close()
        transport.stop()
