"""The ``deployment`` section: networked server/client settings (used by ``fedtune server``/``client``).

The simulation ignores this section. Every connection is TLS with client certificates (``fedtune certs``
makes a first set); a client's identity is the common name (CN) of its certificate.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from fedtune.config.base import PositiveFloat, PositiveInt, Section

TIME_BUDGET_OPTION = "time_budget_s"  # FitInstruction.options: seconds a fit may train (deployment.partial_work)


class DeploymentConfig(Section):
    address: str = "127.0.0.1"  # interface the server listens on ("0.0.0.0" for every interface)
    port: Annotated[int, Field(ge=0, le=65535)] = 50051  # TCP port (0: any free port, printed at start)
    tls_ca: str | None = None  # PEM of the CA that signed the client certificates (required by the server)
    tls_cert: str | None = None  # the server's certificate (PEM); its SANs must name the address clients dial
    tls_key: str | None = None  # the server's private key (PEM)
    revocation_list: str | None = None  # file of revoked clients: one CN or "serial:<hex>" a line; re-read live
    allowed_clients: list[str] | None = None  # if set, only these certificate CNs may join
    # example counts declared at enrolment (docs/THREATS.md): certificate CN -> the most training examples that
    # client may claim. A reply claiming more is weighted by the declared count ("cap") or refused ("refuse"),
    # the reason logged; a reply from a client with no declared count is refused.
    declared_examples: dict[str, PositiveInt] | None = None
    # a participant also declares its own count when it joins (its training examples, from its own data); a
    # later reply claiming more than that is likewise weighted as declared ("cap") or refused ("refuse")
    over_declared: Literal["cap", "refuse"] = "cap"
    require_declared_examples: bool = False  # refuse updates from a participant that declared no count at Join
    max_clients: PositiveInt = 256  # most concurrent sessions (the server's thread pool is sized from it)
    min_clients: PositiveInt = 2  # quorum: a round starts only when at least this many clients are connected
    quorum_timeout_s: PositiveFloat = 600.0  # give up (exit non-zero) if the quorum is not reached in time
    round_timeout_s: PositiveFloat = 600.0  # training deadline per round; later replies are dropped
    # stragglers send partial work instead of being dropped: each fit may train for partial_work_share x
    # round_timeout_s seconds, then the client sends the steps it finished, weighted by steps done / planned
    partial_work: bool = False
    partial_work_share: Annotated[float, Field(gt=0, lt=1)] = 0.8  # the rest of the deadline is for the upload
    eval_timeout_s: PositiveFloat | None = None  # evaluation deadline per round (default: round_timeout_s)
    heartbeat_s: PositiveFloat = 5.0  # clients send a heartbeat this often
    missed_heartbeats: PositiveInt = 3  # a client silent for this many intervals is presumed dead
    poll_s: PositiveFloat = 20.0  # how long a client's long poll for work waits before asking again
    max_message_mb: PositiveFloat = 4096.0  # largest payload (instruction or update) in MiB, either way
    chunk_kb: Annotated[int, Field(ge=1, le=16384)] = 1024  # streaming chunk size in KiB (one gRPC message)
    # update compression on the wire: none (float32), fp16, bf16, int8 (blockwise), topk (error feedback)
    codec: Literal["none", "fp16", "bf16", "int8", "topk"] = "none"
    codec_block: Annotated[int, Field(ge=1, le=1 << 20)] = 256  # int8: values per scale
    topk_fraction: Annotated[float, Field(gt=0, le=1)] = 0.01  # topk: share of entries sent per round
    shutdown_grace_s: Annotated[float, Field(ge=0)] = 5.0  # after the last round, wait this long for clients to hear
    # resource limits (docs/THREATS.md): what one client, or a flood of connections, can hold on the server
    max_streams_per_client: PositiveInt = 3  # concurrent Pull/Push streams per client certificate; more are refused
    max_concurrent_rpcs: PositiveInt | None = None  # all calls at once (default max_clients*(streams+1)+16)
    upload_timeout_s: PositiveFloat = 600.0  # a result upload not complete within this is cancelled by the server
    max_connections: PositiveInt | None = None  # open connections, authenticated or not (default 4*max_clients+64)
    # the connection gate (transport/grpc/gate.py): a front end on the public port that keeps at most this many
    # connections which have not yet made an authenticated call, per source address and in all; more are closed
    # at accept. Off: gRPC accepts directly (max_connections is then the only cap, shared with honest clients).
    connection_gate: bool = True
    max_unauthenticated: PositiveInt = 128
    max_unauthenticated_per_address: PositiveInt = 8
    handshake_timeout_s: PositiveFloat = 10.0  # a connection that has not finished TLS by then is closed
    idle_timeout_s: PositiveFloat = 600.0  # a connection with no call for this long is closed
    keepalive_s: PositiveFloat = 30.0  # the server pings each connection this often and drops it after no answer

    @model_validator(mode="after")
    def _check(self) -> DeploymentConfig:
        tls = [self.tls_ca, self.tls_cert, self.tls_key]
        if any(tls) and not all(tls):
            raise ValueError("set all of deployment.tls_ca, deployment.tls_cert and deployment.tls_key, or none")
        if self.allowed_clients is not None and len(self.allowed_clients) < self.min_clients:
            raise ValueError(
                f"deployment.min_clients={self.min_clients} can never be met by "
                f"{len(self.allowed_clients)} deployment.allowed_clients"
            )
        if self.declared_examples is not None and self.allowed_clients is not None:
            undeclared = sorted(set(self.allowed_clients) - set(self.declared_examples))
            unknown = sorted(set(self.declared_examples) - set(self.allowed_clients))
            if undeclared or unknown:
                raise ValueError(
                    "deployment.declared_examples must name exactly deployment.allowed_clients: "
                    + "; ".join(
                        ([f"no count for {', '.join(undeclared)}"] if undeclared else [])
                        + ([f"{', '.join(unknown)} not allowed to join"] if unknown else [])
                    )
                )
        if self.min_clients > self.max_clients:
            raise ValueError("deployment.min_clients exceeds deployment.max_clients")
        if self.idle_timeout_s < 2 * self.heartbeat_s:
            raise ValueError(
                f"deployment.idle_timeout_s={self.idle_timeout_s:g} would close connections of clients that send a "
                f"heartbeat every deployment.heartbeat_s={self.heartbeat_s:g}s: make it at least twice that"
            )
        if self.max_connections is not None and self.max_connections < self.max_clients:
            raise ValueError("deployment.max_connections is below deployment.max_clients")
        if self.max_unauthenticated_per_address > self.max_unauthenticated:
            raise ValueError("deployment.max_unauthenticated_per_address exceeds deployment.max_unauthenticated")
        return self

    @property
    def dead_after_s(self) -> float:
        """Seconds of silence after which a client is presumed dead."""
        return self.heartbeat_s * self.missed_heartbeats

    @property
    def rpc_limit(self) -> int:
        """Calls the server runs at once (and threads it may use): every client's streams plus a unary call."""
        return self.max_concurrent_rpcs or self.max_clients * (self.max_streams_per_client + 1) + 16

    @property
    def connection_limit(self) -> int:
        return self.max_connections or 4 * self.max_clients + 64

    @property
    def max_payload_bytes(self) -> int:
        return int(self.max_message_mb * 2**20)
