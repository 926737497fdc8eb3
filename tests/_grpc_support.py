"""Shared helpers for the gRPC tests: a throwaway PKI, free ports, a hand-driven raw client, processes."""

from __future__ import annotations

import glob
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import grpc
import yaml

from fedtune.deploy.certs import create_pki
from fedtune.transport.grpc import wire
from fedtune.transport.grpc.client import MAX_MESSAGE
from fedtune.transport.grpc.proto import fedtune_pb2 as pb
from fedtune.transport.grpc.proto import fedtune_pb2_grpc as pb_grpc

CLIENTS = [f"client_{i:03d}" for i in range(8)]
REPO = Path(__file__).resolve().parents[1]


def make_pki(root: Path) -> Path:
    """CA + server + CLIENTS + 'revoked' (listed in revoked.txt); an 'intruder' signed by another CA."""
    create_pki(root / "pki", [*CLIENTS, "revoked"])
    (root / "pki" / "revoked.txt").write_text("# test list\nrevoked\n")
    create_pki(root / "other", ["intruder"])  # a different CA: the server must not accept it
    return root / "pki"


@contextmanager
def server_starter(pki: Path, *, config_yaml: str = "seed: 0\n", **defaults: object) -> Iterator[Callable[..., object]]:
    """``make(**overrides)`` starts a GrpcServerTransport on a free port with this PKI's server certificate,
    ``defaults`` and then ``overrides`` as its deployment section, sending ``config_yaml`` to the clients that
    join; every server started is stopped at the end."""
    from fedtune.config.deployment import DeploymentConfig
    from fedtune.transport.grpc.server import GrpcServerTransport, ServerTLS

    started: list[GrpcServerTransport] = []

    def make(**overrides: object) -> GrpcServerTransport:
        tls = {"tls_ca": str(pki / "ca.pem"), "tls_cert": str(pki / "server.pem"), "tls_key": str(pki / "server.key")}
        dep = DeploymentConfig(**{"port": 0, **tls, **defaults, **overrides})
        transport = GrpcServerTransport(dep, tls=ServerTLS.from_config(dep), config_yaml=config_yaml)
        transport.start()
        started.append(transport)
        return transport

    try:
        yield make
    finally:
        for transport in started:
            transport.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate: Callable[[], object], timeout: float, what: str) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


# The deployment tests' model is the small digits CNN (_models.DIGITS_CNN), each client on its own
# (unequal) partition of the digits, exactly the shard the simulation gives it, so a networked run can be
# compared with a simulation.


def digits_data(num_clients: int) -> dict:
    """Unequal shares, so that example weighting matters: a misweighted fold fails a comparison."""
    return {"source": "digits", "partition": {"kind": "dirichlet_sizes", "num_clients": num_clients, "alpha": 2.0}}


# DP-FedAvg over SecAgg, with adaptive clipping: each client's clipping bit is summed securely too
DP_ADAPTIVE_SECAGG = {
    "server": {"weighting": "uniform"},
    "privacy": {
        "dp": {
            "clip": 0.5,
            "noise_multiplier": 0.1,
            "sampling": "fixed",
            "adaptive": {"target_quantile": 0.5, "lr": 0.2, "count_noise": 1.0},
        },
        "secure_aggregation": {"threshold": 0.6},
    },
}


def deployment_section(pki: Path, port: int, *, min_clients: int, **overrides: object) -> dict:
    """TLS from ``pki`` and timeouts lenient enough for a loaded 2-core machine."""
    return {
        "port": port,
        "tls_ca": str(pki / "ca.pem"),
        "tls_cert": str(pki / "server.pem"),
        "tls_key": str(pki / "server.key"),
        "revocation_list": str(pki / "revoked.txt"),
        "min_clients": min_clients,
        # lenient: a first training step imports torch._dynamo holding the GIL, which can starve the
        # heartbeat thread for seconds on a loaded machine
        "heartbeat_s": 1.0,
        "missed_heartbeats": 5,
        "poll_s": 2,
        "round_timeout_s": 60,
        "quorum_timeout_s": 60,
        "shutdown_grace_s": 3,
        **overrides,
    }


def client_args(port: int, pki: Path, name: str, data: str | None = None) -> list[str]:
    """``fedtune client`` arguments for ``name`` (a CLIENTS name, or 'intruder' from the other CA)."""
    folder = pki if (pki / "clients" / f"{name}.pem").exists() else pki.parent / "other"
    return [
        "--server", f"127.0.0.1:{port}", "--data", data or f"partition:{name}", "--ca", str(pki / "ca.pem"),
        "--cert", str(folder / "clients" / f"{name}.pem"), "--key", str(folder / "clients" / f"{name}.key"),
    ]  # fmt: skip


def find_run_dir(tmp: Path) -> Path:
    """The run directory a server started with out_dir ``tmp/runs`` creates."""
    # generous: on a loaded machine a server process takes a minute or more to import torch and build the model
    found = wait_until(lambda: glob.glob(str(tmp / "runs" / "run-*")), 300, "the run directory")
    return Path(sorted(found)[0])


def run_deployment(tmp: Path, config: dict, clients: Sequence[str], port: int, pki: Path, server_s: float) -> Path:
    """``fedtune server`` with ``config`` (written to ``tmp/config.yaml``) and a ``fedtune client`` per name in
    ``clients``, each with its own cache folder (``tmp/cache-<name>``, its own disk); waits for all to exit 0
    (the server within ``server_s``) and returns the run directory."""
    (tmp / "config.yaml").write_text(yaml.safe_dump(config))
    procs = Procs(tmp)
    try:
        procs.cli("server", "server", str(tmp / "config.yaml"))
        for name in clients:
            procs.env["FEDTUNE_CACHE"] = str(tmp / f"cache-{name}")
            procs.cli(name, "client", *client_args(port, pki, name))
        assert procs.wait("server", server_s) == 0, procs.log("server")[-3000:]
        for name in clients:
            assert procs.wait(name, 60) == 0, procs.log(name)[-3000:]
    finally:
        procs.kill_all()
    return find_run_dir(tmp)


class RawClient:
    """Speaks the protocol by hand, so a test can send exactly the bytes it wants."""

    def __init__(self, port: int, pki: Path, name: str, *, ca: Path | None = None) -> None:
        folder = pki if (pki / "clients" / f"{name}.pem").exists() else pki.parent / "other"
        creds = grpc.ssl_channel_credentials(
            (ca or pki / "ca.pem").read_bytes(),
            (folder / "clients" / f"{name}.key").read_bytes(),
            (folder / "clients" / f"{name}.pem").read_bytes(),
        )
        options = [("grpc.max_receive_message_length", MAX_MESSAGE), ("grpc.max_send_message_length", MAX_MESSAGE)]
        self.channel = grpc.secure_channel(f"127.0.0.1:{port}", creds, options=options)
        self.stub = pb_grpc.FederationStub(self.channel)
        self.raw_push = self.channel.stream_unary("/fedtune.v1.Federation/Push", None, pb.PushReply.FromString)
        self.session = ""
        self.joined: pb.JoinReply | None = None
        self.limits = wire.Limits(1 << 34, 1 << 20)

    def join(self, *, wait: bool = False, declared_examples: int = 0) -> pb.JoinReply:
        """Join (declaring ``declared_examples``); ``wait`` keeps trying (up to 120s) until the server listens."""
        request = pb.JoinRequest(protocol=wire.PROTOCOL, declared_examples=declared_examples)
        self.joined = self.stub.Join(request, timeout=120 if wait else 10, wait_for_ready=wait)
        self.session = self.joined.session
        return self.joined

    def heartbeat(self) -> None:
        self.stub.Heartbeat(pb.HeartbeatRequest(session=self.session), timeout=5)

    # ``timeout`` None: no deadline, for transfers whose time grows with their size and the machine's load
    # (gigabytes); the test's own timeout is then the hang guard.

    def pull(self, timeout: float | None = 30.0) -> wire.Payload:
        return wire.decode(self.stub.Pull(pb.PullRequest(session=self.session), timeout=timeout), self.limits)

    def pull_task(self, timeout: float | None = 10.0) -> wire.Payload:
        deadline = None if timeout is None else time.monotonic() + timeout
        while deadline is None or time.monotonic() < deadline:
            payload = self.pull(timeout=None if deadline is None else 30.0)
            if payload.header.kind in (pb.FIT, pb.EVALUATE):
                return payload
        raise AssertionError("no task arrived")

    def push(self, payload: wire.Payload, chunk_bytes: int = 1 << 20, timeout: float | None = 60.0) -> pb.PushReply:
        """Push ``payload``; a header naming no session is bound to this client's (as the real client does)."""
        if not payload.header.session:
            payload.header.session = self.session
        return self.stub.Push(wire.encode(payload, chunk_bytes=chunk_bytes), timeout=timeout)

    def push_raw(self, messages: Iterable[bytes]) -> pb.PushReply:
        return self.raw_push(iter(messages), timeout=30)

    def close(self) -> None:
        self.channel.close()


class Heartbeats:
    """Keep a RawClient alive from a thread (as the real client does while it trains)."""

    def __init__(self, client: RawClient, every: float) -> None:
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(client, every), daemon=True)
        self.thread.start()

    def _run(self, client: RawClient, every: float) -> None:
        while not self.stop.wait(every):
            try:
                client.heartbeat()
            except grpc.RpcError:
                return

    def end(self) -> None:
        self.stop.set()
        self.thread.join(10)


class Procs:
    """Start ``python -m fedtune.cli ...`` (or a helper script) processes; kill whatever is left at the end."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}

    def start(self, name: str, args: list[str]) -> subprocess.Popen:
        with open(self.workdir / f"{name}.log", "ab") as log:  # append: a restarted process keeps its history
            proc = subprocess.Popen(
                [sys.executable, *args], cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT, env=self.env
            )
        self.procs[name] = proc
        return proc

    def cli(self, name: str, *args: str) -> subprocess.Popen:
        return self.start(name, ["-m", "fedtune.cli", *args])

    def log(self, name: str) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def wait(self, name: str, timeout: float) -> int:
        try:
            return self.procs[name].wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{name} did not exit within {timeout}s; log:\n{self.log(name)[-3000:]}") from None

    def kill(self, name: str) -> None:
        proc = self.procs[name]
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)

    def kill_all(self) -> None:
        for name in list(self.procs):
            self.kill(name)

    def logs(self) -> str:
        return "\n".join(f"===== {n}\n{self.log(n)[-4000:]}" for n in self.procs)
